"""``scn_fast::gated_tap_projection_split``: :func:`~.tap_projection.gated_tap_projection` (4 taps,
weight in tap order) from the two GEMM operands that the split rotation (``edge_rotation_split``)
writes itself: y0 (E, n0, C), pair (E, 2 n1, C), gate (E, H) -> (E, 4, H). Its backward returns
(dy0, dpair) unassembled, for the split rotation's backward. float32/float64 GEMMs as given.
"""

from __future__ import annotations

import torch

from .tap_gate import _gate_impl
from .tap_gemm import _tap_ordered_weight_grad


@torch.library.custom_op("scn_fast::gated_tap_projection_split", mutates_args=())
def _gated_split(
    y0: torch.Tensor,
    pair: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(silu(pre) * gate, A, B) from the split operands (module doc): A = y0 W0^T + b, B = [y1; y1']
    W1^T, W0 and W1 the tap-ordered weight's two column blocks. float32/float64 GEMMs as given."""
    e, n0, c = y0.shape
    h, cut = weight.shape[0], n0 * c
    a = torch.mm(y0.view(e, cut), weight[:, :cut].t()).add_(bias)
    b = torch.mm(pair.view(2 * e, pair.shape[1] // 2 * c), weight[:, cut:].t()).view(e, 2, h)
    forward, _ = _gate_impl(backend, a.dtype)
    return forward(a, b, gate.contiguous()), a, b


@_gated_split.register_fake
def _(y0, pair, weight, bias, gate, backend):
    e, h = y0.shape[0], weight.shape[0]
    return y0.new_empty((e, 4, h)), y0.new_empty((e, h)), y0.new_empty((e, 2, h))


def _gated_split_setup(ctx, inputs, output):
    y0, pair, weight, _bias, gate, backend = inputs
    _, a, b = output
    ctx.save_for_backward(y0, pair, weight, gate, a, b)
    ctx.backend = backend
    ctx.set_materialize_grads(False)


@torch.library.custom_op("scn_fast::gated_tap_projection_split_backward", mutates_args=())
def _gated_split_backward_op(
    dout: torch.Tensor,
    y0: torch.Tensor,
    pair: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy0, dpair, dweight, dbias, dgate): dy0 = dA W0, dpair = [dB0; dB1] W1 (not assembled: the
    split rotation's backward does that), dweight = [dA^T y0 | dB^T [y1; y1']] written in place."""
    e, n0, c = y0.shape
    h, cut = weight.shape[0], n0 * c
    n_pair = pair.shape[1]
    _, backward = _gate_impl(backend, a.dtype)
    da, db, dgate = backward(dout.contiguous(), a, b, gate.contiguous())
    db = db.reshape(2 * e, h)
    dy0 = torch.mm(da, weight[:, :cut]).view(e, n0, c)
    dpair = torch.mm(db, weight[:, cut:]).view(e, n_pair, c)
    y0_2d, pair_2d = y0.view(e, cut), pair.view(2 * e, n_pair // 2 * c)
    dw = _tap_ordered_weight_grad(da, db, y0_2d, pair_2d, weight, "fp32", True, backend)
    return dy0, dpair, dw, da.sum(0), dgate


@_gated_split_backward_op.register_fake
def _(dout, y0, pair, weight, gate, a, b, backend):
    h = weight.shape[0]
    return (
        torch.empty_like(y0),
        torch.empty_like(pair),
        torch.empty_like(weight),
        weight.new_empty(h),
        torch.empty_like(gate),
    )


def _gated_split_backward(ctx, dout, _da, _db):
    if dout is None:
        return (None,) * 6
    y0, pair, weight, gate, a, b = ctx.saved_tensors
    dy0, dpair, dw, dbias, dgate = _gated_split_backward_op(
        dout, y0, pair, weight, gate, a, b, ctx.backend
    )
    return dy0, dpair, dw, dbias, dgate, None


_gated_split.register_autograd(_gated_split_backward, setup_context=_gated_split_setup)


def gated_tap_projection_split(
    y0: torch.Tensor,
    pair: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate: torch.Tensor,
    backend: str = "extension",
) -> torch.Tensor:
    """:func:`gated_tap_projection` (4 taps, weight in tap order) from the split operands that
    ``edge_rotation_split`` writes: y0 (E, n0, C), pair (E, 2 n1, C), gate (E, H) -> (E, 4, H). The
    backward returns (dy0, dpair) unassembled, for the split rotation's backward."""
    return _gated_split(y0, pair, weight, bias, gate, backend)[0]
