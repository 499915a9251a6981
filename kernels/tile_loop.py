"""What the grid-MLP and output-head tile loops share: input checks, reusable scratch buffers, the
precision of each kind of GEMM, and the scoped cuBLAS precision of their weight-gradient GEMMs.

Precision of a tile loop (``precision`` argument of the launchers, chosen by the plan):

==========  ===========================  ============================  ==========================
precision   weight GEMMs (w1, w2, w3,     projection GEMMs (to_grid,    weight gradients
            and the input gradients)      from_grid, sh, V)             (torch.addmm, cuBLAS)
==========  ===========================  ============================  ==========================
fp32        IEEE float32 (FMA units)      IEEE float32                  float32, tf32 off
tf32        tf32 tensor cores             tf32 tensor cores             tf32 on
bf16        bf16 operands, float32 acc.   tf32 (float32 activations)    tf32 on
==========  ===========================  ============================  ==========================

In bf16 the weights are converted to bfloat16 once per call; activations are converted in
registers inside the GEMM. The weight-gradient GEMMs contract over a whole tile's rows (K in the
tens of thousands, small outputs): cuBLAS's split-K kernels suit them; their precision is set for
the duration of the call (``torch.backends.cuda.matmul.fp32_precision``, or ``allow_tf32`` on
older torch, restored afterwards), so the global flag never decides it.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from . import gemm

__all__ = [
    "Buffers",
    "check_inputs",
    "cublas_scope",
    "projection_precision",
    "row_sums",
    "tiles_of",
    "weight_dtype",
    "weight_grad",
]

_FLOATS = (torch.float32, torch.float64)


def check_inputs(tensors: dict[str, torch.Tensor], what: str) -> torch.device:
    """The device of ``tensors`` after checking dtype (float32/float64, one for all), device and
    contiguity; CPU only under the interpreter, meta only to describe launches."""
    first = next(iter(tensors.values()))
    for name, t in tensors.items():
        if t.dtype not in _FLOATS:
            raise TypeError(
                f"{name}: the Triton {what} kernels support float32 and float64, not {t.dtype}"
            )
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{name}: all tensors must share one dtype and device")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    device = first.device
    if device.type == "cpu" and not gemm.is_interpreted():
        raise ValueError(
            "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before triton is imported); "
            "the compiled kernels run on CUDA"
        )
    if device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"no Triton code for device type {device.type!r}")
    return device


def tiles_of(n_atoms: int, tile_atoms: int) -> list[tuple[int, int]]:
    """(first atom, atoms) of each tile: tiles of ``tile_atoms`` atoms (the last one shorter)."""
    nt = max(1, min(tile_atoms, n_atoms))
    return [(z0, min(nt, n_atoms - z0)) for z0 in range(0, n_atoms, nt)]


def projection_precision(precision: str) -> str:
    """Precision of the projection GEMMs (float32 operands on both sides): tf32 in tf32 and bf16."""
    return "fp32" if precision == "fp32" else "tf32"


def weight_dtype(precision: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the weights are given to the weight GEMMs in (bfloat16 in bf16)."""
    return torch.bfloat16 if precision == "bf16" else dtype


@contextlib.contextmanager
def cublas_scope(device: torch.device, precision: str):
    """cuBLAS float32 GEMMs (the weight gradients) in ``precision`` for the block: tf32 on for
    tf32 and bf16, off for fp32; the previous setting is restored. No-op off CUDA. Uses
    ``torch.backends.cuda.matmul.fp32_precision`` where torch has it (reading the legacy
    ``allow_tf32`` fails once a program has set the new one), else ``allow_tf32``."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    if hasattr(flags, "fp32_precision"):
        name, value = "fp32_precision", ("ieee" if precision == "fp32" else "tf32")
    else:
        name, value = "allow_tf32", precision != "fp32"
    old = getattr(flags, name)
    setattr(flags, name, value)
    try:
        yield
    finally:
        setattr(flags, name, old)


class Buffers:
    """Flat scratch buffers reused across tiles; ``get(name, *shape)`` views a prefix."""

    def __init__(self, like: torch.Tensor, sizes: dict[str, int]) -> None:
        self._flat = {k: like.new_empty(v) for k, v in sizes.items()}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        return self._flat[name][:numel].view(*shape)


_ROW_SUMS: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def row_sums(t: torch.Tensor) -> torch.Tensor:
    """t.sum(1) of a constant matrix (e.g. from_grid), computed once per tensor: kept while ``t``
    lives and its version (in-place writes) is unchanged, so a step launches no reduction for it."""
    hit = _ROW_SUMS.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    sums = t.sum(1)
    key = id(t)
    _ROW_SUMS[key] = (weakref.ref(t, lambda _, key=key: _ROW_SUMS.pop(key, None)), t._version, sums)
    return sums


def weight_grad(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """out = a @ b for the first tile, out += a @ b for the others (cuBLAS, in the call's scope)."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)
