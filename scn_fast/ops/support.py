"""What each backend of each fused op supports, declared as data, and the one-sentence reasons it
refuses a request.

A :class:`Support` row says, for one (op, backend): the dtypes it runs per device type, the lmax
range and mmax values it handles, and which runtime it needs (the C++ extension, Triton, or none).
:func:`refusal` turns a request into ``None`` (supported) or the first reason it is not, in a fixed
order: shape limits, then the runtime, then the device type, then the dtype. The runtime facts
(is the extension buildable, is Triton installed, does its CPU interpreter run) are read once per
process; a request for a device that is not present (a plan for CUDA built on a CPU machine) is
judged on the same data.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import cache

import torch

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
_FLOATS = (F32, F64)
_GPU_TYPES = (F32, F64, BF16, F16)
RUNTIMES = ("reference", "extension", "triton")


@dataclass(frozen=True)
class Support:
    """One backend of one op: ``dtypes`` per device type ("cpu", "cuda"; "cpu" for Triton means its
    interpreter), ``lmax`` (inclusive range), ``mmax`` (values), ``what`` (the subject of the
    refusal sentences, e.g. "the CPU edge kernels")."""

    runtime: str
    what: str
    dtypes: dict[str, tuple[torch.dtype, ...]]
    lmax: tuple[int, int] = (0, 10)
    mmax: tuple[int, ...] = (0, 1)


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


_ANY = {"cpu": (*_GPU_TYPES,), "cuda": (*_GPU_TYPES,), "mps": (*_GPU_TYPES,), "xpu": (*_GPU_TYPES,)}
_REFERENCE = Support("reference", "upstream's PyTorch code", _ANY, (0, 10), (0, 1))
_EDGE_EXT = {"cpu": _FLOATS, "cuda": _GPU_TYPES}
_EDGE_TRITON = {"cpu": (*_FLOATS, BF16), "cuda": _GPU_TYPES}
_FLOAT_OPS = {"cpu": _FLOATS, "cuda": _FLOATS}

SUPPORT: dict[str, dict[str, Support]] = {
    "edge_rotation": {
        "reference": _REFERENCE,
        "extension": Support("extension", "the extension's edge kernels", _EDGE_EXT),
        "triton": Support("triton", "the Triton edge kernels", _EDGE_TRITON),
    },
    "scatter_aggregation": {
        "reference": _REFERENCE,
        "extension": Support("extension", "the extension's edge kernels", _EDGE_EXT),
        "triton": Support("triton", "the Triton edge kernels", _EDGE_TRITON),
    },
    "gated_tap_projection": {
        "reference": _REFERENCE,
        "extension": Support("extension", "the extension's tap gate", _FLOAT_OPS),
        "triton": Support("triton", "the Triton tap gate", _FLOAT_OPS),
    },
    "tap_combine": {
        "reference": _REFERENCE,
        "extension": Support("extension", "the extension's tap combination", _FLOAT_OPS),
        "triton": Support("triton", "the Triton tap combination", _FLOAT_OPS),
    },
    "grid_projection": {
        "reference": _REFERENCE,
        "extension": Support("extension", "the grid ops", _FLOAT_OPS, (1, 10)),
        "triton": Support("triton", "the Triton grid kernels", _FLOAT_OPS, (1, 10)),
    },
    "output_heads": {
        "reference": _REFERENCE,
        "extension": Support("extension", "the extension's output heads", _FLOAT_OPS, (1, 10)),
        "triton": Support("triton", "the Triton output heads", _FLOAT_OPS, (1, 10)),
    },
}


# Where a backend supports an op but another backend's code is better on a device type, the plan
# runs the preferred one (when it supports the request) and records why the other was passed over:
# (op, device type) -> (preferred, passed over, reason). On CUDA the extension's gate, combine,
# split and assemble are ATen compositions (csrc/message_gate.cpp, message_combine.cpp: their CUDA
# kernels in csrc/cuda/message_kernels.cu are not registered yet), with (E, 4, H) and (E, 4R, C)
# temporaries; Triton has fused kernels for all four (kernels/tap_elementwise.py).
PREFERRED: dict[tuple[str, str], tuple[str, str, str]] = {
    ("gated_tap_projection", "cuda"): (
        "triton",
        "extension",
        "the extension's CUDA gate, split and assemble are ATen compositions with (E, 4, H) "
        "temporaries; Triton has fused kernels",
    ),
    ("tap_combine", "cuda"): (
        "triton",
        "extension",
        "the extension's CUDA tap combination is an ATen composition with (E, 4R, C) "
        "temporaries; Triton has a fused kernel",
    ),
}


def preferred(op: str, backend: str, device_type: str) -> tuple[str, str] | None:
    """(preferred backend, reason) when :data:`PREFERRED` passes ``backend`` over for ``op`` on
    ``device_type``, else None (the caller still checks that the preferred one supports the
    request)."""
    entry = PREFERRED.get((op, device_type))
    if entry is None or entry[1] != backend:
        return None
    return entry[0], entry[2]


# ----------------------------------------------------------------------------- runtime facts
def extension_unavailable() -> str | None:
    """Why the C++ extension cannot run at all (None when it can or may still build)."""
    from ..extension import extension_status

    ok, why = extension_status()
    return None if ok else f"the C++ extension is unavailable: {why}"


@cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """Whether the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 set before
    the kernels were first imported; read from the kernel module once it is imported)."""
    import sys

    mod = sys.modules.get("scn_fast.kernels.edge_rotation")
    if mod is None:
        if not _triton_installed():
            return False
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            return False
        from ..kernels import edge_rotation as mod
    return bool(mod.is_interpreted())


def triton_unavailable(device_type: str) -> str | None:
    """Why Triton kernels cannot run on ``device_type`` at all: not installed, a CPU device without
    the interpreter, or another device type."""
    if not _triton_installed():
        return "triton is not installed (pip install triton, on Linux)"
    if device_type == "cuda" or (device_type == "cpu" and triton_interpreter_enabled()):
        return None
    if device_type == "cpu":
        return (
            "Triton runs on CUDA devices (set TRITON_INTERPRET=1 to run it on CPU tensors, slowly)"
        )
    return f"no Triton code for device type {device_type!r}"


def _runtime_refusal(runtime: str, device_type: str) -> str | None:
    if runtime == "extension":
        why = extension_unavailable()
        if why is None and device_type == "cuda" and torch.version.cuda is None:
            why = "torch is not a CUDA build, so the extension's CUDA code was not built"
        return why
    if runtime == "triton":
        return triton_unavailable(device_type)
    return None


def refusal(op: str, backend: str, device_type: str, dtype: torch.dtype, lmax: int, mmax: int):
    """None when ``backend`` runs ``op`` for this request, else the reason it does not (one
    sentence). ``device_type`` need not be present on this machine."""
    s = SUPPORT[op][backend]
    lo, hi = s.lmax
    if not lo <= lmax <= hi:
        return f"lmax={lmax} is outside {lo}..{hi}"
    if mmax not in s.mmax:
        return f"mmax={mmax} is not supported ({' or '.join(map(str, s.mmax))})"
    why = _runtime_refusal(s.runtime, device_type)
    if why:
        return why
    if device_type not in s.dtypes:
        return f"{s.what} have no code for device type {device_type!r}"
    if dtype not in s.dtypes[device_type]:
        return f"{s.what} support {_names(s.dtypes[device_type])} on {device_type}, not {dtype}"
    return None
