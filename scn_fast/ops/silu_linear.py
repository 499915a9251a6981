"""``scn_fast::silu_mm``: upstream's ``fc2_edge(act(h))`` (without fc2_edge's bias, which ``tap_combine``
adds) keeping only h for the backward.

    z = silu(h) W^T          h (M, K), W (N, K) -> z (M, N)

Autograd would keep two (M, K) tensors for this: SiLU's input h and the Linear's input silu(h). This
op keeps h alone and recomputes silu(h) in its backward (one elementwise pass):

    s = silu(h),  dW = dz^T s,  dh = (dz W) * silu'(h)

At scn-t4-b2 that is 2.75 MB (L = 6) + 1.6 MB (L = 4) less per message block of a training step, for
~0.2 ms of recomputation. float32/float64 GEMMs as given (precision "fp32"; the low-precision modes
take the Linear's own path). ``impl="triton"`` (the plan's ``edge_mlp``): one Triton GEMM forward
with SiLU in its A prologue, two backward (silu' in the epilogue of dh; dW^T = silu(h)^T dz with
SiLU in the prologue): ``kernels/edge_mlp.py``, precision fp32 or tf32.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _kernels():
    from ..kernels import edge_mlp

    return edge_mlp


@torch.library.custom_op("scn_fast::silu_mm", mutates_args=())
def _silu_mm(h: torch.Tensor, weight: torch.Tensor, impl: str, precision: str) -> torch.Tensor:
    if impl == "triton":
        return _kernels().silu_mm_forward(h.contiguous(), weight, precision)
    return torch.mm(F.silu(h), weight.t())


@_silu_mm.register_fake
def _(h, weight, impl, precision):
    return h.new_empty((h.shape[0], weight.shape[0]))


@torch.library.custom_op("scn_fast::silu_mm_backward", mutates_args=())
def _silu_mm_backward(
    dz: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, impl: str, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if impl == "triton":
        return _kernels().silu_mm_backward(dz, h, weight, precision)
    dw = torch.mm(dz.t(), F.silu(h))
    dh = torch.ops.aten.silu_backward(torch.mm(dz, weight), h)
    return dh, dw


@_silu_mm_backward.register_fake
def _(dz, h, weight, impl, precision):
    return torch.empty_like(h), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    h, weight, impl, precision = inputs
    ctx.save_for_backward(h, weight)
    ctx.meta = (impl, precision)


def _backward(ctx, dz):
    h, weight = ctx.saved_tensors
    dh, dw = _silu_mm_backward(dz.contiguous(), h, weight, *ctx.meta)
    return dh, dw, None, None


_silu_mm.register_autograd(_backward, setup_context=_setup_context)


def silu_mm(
    h: torch.Tensor, weight: torch.Tensor, impl: str = "aten", precision: str = "fp32"
) -> torch.Tensor:
    """silu(h) W^T for h (M, K) and W (N, K), keeping only h for the backward (module doc); impl
    "aten" (precision fp32 only) or "triton"."""
    if impl not in ("aten", "triton") or (impl == "aten" and precision != "fp32"):
        raise ValueError(
            f"silu_mm: impl 'aten' (precision 'fp32') or 'triton', got {impl!r} / {precision!r}"
        )
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"silu_mm needs h (M, K) and weight (N, K), got {tuple(h.shape)} and "
            f"{tuple(weight.shape)}"
        )
    return _silu_mm(h, weight, impl, precision)
