"""The backends of the edge primitives (``SPEC.md``) and what each supports.

Each backend provides ``gather_rotate`` and ``rotate_scatter`` and a ``refusal(request)`` that returns
None when it can run the request, else the reason it cannot (the dispatcher reports these).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..dispatch import Implementation, OpRequest, register

_FLOATS = (torch.float32, torch.float64)
_GPU_TYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class EdgeBackend:
    name: str
    gather_rotate: Callable[..., torch.Tensor]
    rotate_scatter: Callable[..., torch.Tensor]
    refusal: Callable[[OpRequest], str | None]


def _common_refusal(request: OpRequest) -> str | None:
    if request.mmax not in (0, 1):
        return f"mmax={request.mmax} is not supported (0 or 1)"
    if not 0 <= request.lmax <= 10:
        return f"lmax={request.lmax} is outside 0..10"
    return None


# ----------------------------------------------------------------------------- shared checks
def extension_unavailable() -> str | None:
    """Why the C++ extension cannot run at all (None when it can or may still build)."""
    from ..extension import extension_status

    ok, why = extension_status()
    return None if ok else f"the C++ extension is unavailable: {why}"


def triton_unavailable(device: torch.device, is_interpreted: Callable[[], bool]) -> str | None:
    """Why Triton kernels cannot run on ``device`` at all: not installed, a CPU device without the
    interpreter (``is_interpreted()`` of the kernel module), or another device type."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton, on Linux)"
    if device.type == "cuda" or (device.type == "cpu" and is_interpreted()):
        return None
    if device.type == "cpu":
        return (
            "Triton runs on CUDA devices (set TRITON_INTERPRET=1 to run it on CPU tensors, slowly)"
        )
    return f"no Triton code for device type {device.type!r}"


# ----------------------------------------------------------------------------- C++ extension
def _ext():
    from ..extension import load_extension

    return load_extension()


def _ext_gather_rotate(x, wig, idx, lmax, mmax):
    return _ext().gather_rotate(x, wig, idx, lmax, mmax)


def _ext_rotate_scatter(m, wig, perm, ptr, lmax, mmax, num_nodes):
    return _ext().rotate_scatter(m, wig, perm, ptr, lmax, mmax, num_nodes)


def _ext_refusal(request: OpRequest) -> str | None:
    reason = _common_refusal(request) or extension_unavailable()
    if reason:
        return reason
    if request.device.type == "cpu":
        if request.dtype not in _FLOATS:
            return f"the CPU twin supports float32 and float64, not {request.dtype}"
        return None
    if request.device.type == "cuda":
        if torch.version.cuda is None:
            return "torch is not a CUDA build, so the extension's CUDA code was not built"
        if request.dtype not in _GPU_TYPES:
            return f"the CUDA code does not support {request.dtype}"
        return None
    return f"no extension code for device type {request.device.type!r}"


# ----------------------------------------------------------------------------- Triton
def _triton_module():
    from ..kernels import edge_rotation

    return edge_rotation


def _triton_gather_rotate(x, wig, idx, lmax, mmax):
    return _triton_module().gather_rotate(x, wig, idx, lmax, mmax)


def _triton_rotate_scatter(m, wig, perm, ptr, lmax, mmax, num_nodes):
    return _triton_module().rotate_scatter(m, wig, perm, ptr, lmax, mmax, num_nodes)


def triton_interpreter_enabled() -> bool:
    """Whether the Triton kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 set
    before triton was first imported)."""
    return _triton_module().is_interpreted()


def _triton_refusal(request: OpRequest) -> str | None:
    reason = _common_refusal(request) or triton_unavailable(
        request.device, triton_interpreter_enabled
    )
    if reason:
        return reason
    supported = _GPU_TYPES if request.device.type == "cuda" else (*_FLOATS, torch.bfloat16)
    if request.dtype not in supported:
        return f"the Triton kernels do not support {request.dtype} on {request.device.type}"
    return None


BACKENDS: dict[str, EdgeBackend] = {
    "extension": EdgeBackend("extension", _ext_gather_rotate, _ext_rotate_scatter, _ext_refusal),
    "triton": EdgeBackend("triton", _triton_gather_rotate, _triton_rotate_scatter, _triton_refusal),
}


def get_backend(name: str) -> EdgeBackend:
    if name not in BACKENDS:
        raise ValueError(f"edge ops have no backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name]


for _op in ("edge_rotation", "scatter_aggregation"):
    for _b in BACKENDS.values():
        register(Implementation(_op, _b.name, _b.refusal))
