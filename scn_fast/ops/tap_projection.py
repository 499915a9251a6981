"""``scn_fast::tap_projection`` and ``scn_fast::gated_tap_projection``: upstream's ``fc1_edge_proj``
applied to every tap, without the tap-repeated input and with 41% of its FLOPs (docs/algebra.md),
optionally followed by upstream's activation and distance gate in the same op.

Upstream feeds fc1_edge_proj the rotated features of every tap, a_t = [Q_t y_src, Q_t y_tgt]
(E*T rows of width 2*R*C, Q_t a signed row permutation). With 4 taps the m = 0 rows are equal in all
taps and, on the m = +-1 rows, tap 2 = -tap 0 and tap 3 = -tap 1. Splitting the weight's columns
into the m = 0 part W0 and the m = +-1 part W1, with y0 / y1 the matching rows of y and y1' tap 1's
arrangement of y1 (within each degree the m = -1 and m = +1 rows swapped, with fixed signs):

    A = W0 y0 + b,  [B0; B1] = W1 [y1; y1']                  (two GEMMs)
    pre[:, 0] = A + B0,  pre[:, 1] = A + B1,  pre[:, 2] = A - B0,  pre[:, 3] = A - B1

(R0 + 2 R1) row blocks of GEMM instead of 4 R, exactly, in forward and backward. With one tap it is
the plain linear map. ``gated_tap_projection`` returns silu(pre) * gate and keeps A and B (3 E H
numbers) for its backward instead of pre and silu(pre) (8 E H).

Data movement: y (E, 2, R, C) and the weight (H, 2, R, C) are viewed as 2R rows of C channels; one
``index_select`` per operand gathers the rows a GEMM needs into a contiguous buffer (for y: y0, and
[y1 | y1'] side by side so that (E, 2 * 2R1 * C) is read as the (2E, 2R1 * C) matrix [y1; y1']
interleaved by edge; for the weight: [W0 | W1] as column blocks of one buffer that the GEMMs read with
a leading dimension). The weight gradient is written by the GEMMs straight into such a buffer and
gathered back to upstream's column order in one pass.
The fused model holds the weight in tap order already (``weight_order="tap"``, ``scn_fast.tap_order``):
W0 and W1 are then its two column blocks, nothing of the weight is gathered, and the weight
gradient is written in place; the extension splits y in one pass (``tap_split``) and assembles dy
in one (``tap_assemble``).

Shapes: y (E, 2, R, C), weight (H, 2*R*C), bias (H,), gate (E, H) -> (E, T, H).
Precision: "fp32" (or float64 inputs) runs the GEMMs as given; "tf32" / "bf16" round every GEMM
operand (forward and backward) as ``scn_fast.precision`` does for a Linear, natively or emulated.
"""

from __future__ import annotations

import torch

from .layout import tap_symmetry
from .tap_buffers import scratch
from .tap_gate import _gate_impl
from .tap_gemm import _combine, _project, _project_backward, _project_backward_ab
from .tap_projection_split import gated_tap_projection_split
from .tap_rows import TapRows, has_tap_order, tap_rows
from .tap_weights import _tap_ordered, from_tap_order, to_tap_order

__all__ = [
    "TapRows",
    "from_tap_order",
    "gated_tap_projection",
    "gated_tap_projection_split",
    "has_tap_order",
    "scratch",
    "tap_projection",
    "tap_rows",
    "to_tap_order",
]


# ----------------------------------------------------------------------------- ungated op
@torch.library.custom_op("scn_fast::tap_projection", mutates_args=())
def _tap_projection(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    lmax: int,
    mmax: int,
    num_taps: int,
    precision: str,
    native: bool,
    backend: str,
    tap_ordered: bool,
    gemm: str = "",
) -> torch.Tensor:
    meta = (lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm)
    p = _project(y.contiguous(), weight, bias, *meta)
    out = p.a.unsqueeze(1) if p.b is None else _combine(p.a, p.b)
    return out.to(y.dtype)


def bias_like(weight: torch.Tensor) -> torch.Tensor:
    """An uninitialised (H,) tensor for the bias gradient of a (H, K) weight."""
    return weight.new_empty(weight.shape[0])


def _fake_out(y, weight, lmax, mmax, num_taps):
    t = tap_symmetry(lmax, mmax, num_taps).num_taps
    return y.new_empty((y.shape[0], t, weight.shape[0]))


@_tap_projection.register_fake
def _(y, weight, bias, lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm=""):
    return _fake_out(y, weight, lmax, mmax, num_taps)


def _setup_context(ctx, inputs, output):
    y, weight, _bias, *meta = inputs
    ctx.save_for_backward(y, weight)
    ctx.meta = tuple(meta)


@torch.library.custom_op("scn_fast::tap_projection_backward", mutates_args=())
def _tap_projection_backward(
    dpre: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    lmax: int,
    mmax: int,
    num_taps: int,
    precision: str,
    native: bool,
    backend: str,
    tap_ordered: bool,
    gemm: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    meta = (lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm)
    dy, dw, db = _project_backward(dpre.to(y.dtype), y.contiguous(), weight, *meta)
    return dy.to(y.dtype), dw.contiguous(), db


@_tap_projection_backward.register_fake
def _(dpre, y, weight, lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm=""):
    return torch.empty_like(y), torch.empty_like(weight), bias_like(weight)


def _backward(ctx, dpre):
    y, weight = ctx.saved_tensors
    dy, dw, db = _tap_projection_backward(dpre, y, weight, *ctx.meta)
    return dy, dw, db, None, None, None, None, None, None, None, None


_tap_projection.register_autograd(_backward, setup_context=_setup_context)


def tap_projection(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    lmax: int,
    mmax: int,
    num_taps: int,
    precision: str = "fp32",
    native: bool = True,
    backend: str = "reference",
    weight_order: str = "upstream",
) -> torch.Tensor:
    """Pre-activations (E, T, H) of fc1_edge_proj for every tap of the rotated features y (E, 2, R, C).
    ``backend``: "extension" gathers the weight with the extension's one-pass kernel (where the
    gathered form runs); anything else uses ATen ops. ``weight_order``: the weight's columns as
    upstream holds them ("upstream") or in tap order ("tap", :func:`to_tap_order`; 4 taps only)."""
    tap_ordered = _tap_ordered(weight_order, lmax, mmax, num_taps)
    return _tap_projection(
        y, weight, bias, lmax, mmax, num_taps, precision, native, backend, tap_ordered
    )


# ----------------------------------------------------------------------------- gated op
def _gated_forward(y, weight, bias, gate, *meta):
    p = _project(y.contiguous(), weight, bias, *meta)
    backend = meta[5]
    a = p.a.to(y.dtype)
    b = a.new_empty((a.shape[0], 0, a.shape[1])) if p.b is None else p.b.to(y.dtype)
    forward, _ = _gate_impl(backend, a.dtype)
    return forward(a, b, gate.contiguous()), a, b


@torch.library.custom_op("scn_fast::gated_tap_projection", mutates_args=())
def _gated(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate: torch.Tensor,
    lmax: int,
    mmax: int,
    num_taps: int,
    precision: str,
    native: bool,
    backend: str,
    tap_ordered: bool,
    gemm: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(silu(pre) * gate, A, B): A and B are what the backward needs (dropped by the caller when
    nothing is recorded for autograd). The backward splits y again (one pass) rather than keeping
    the split: y1' repeats y1, so the split is 1.6x y's size at L = 6."""
    meta = (lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm)
    return _gated_forward(y, weight, bias, gate, *meta)


@_gated.register_fake
def _(
    y, weight, bias, gate, lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm=""
):
    out = _fake_out(y, weight, lmax, mmax, num_taps)
    e, t, h = out.shape
    return out, y.new_empty((e, h)), y.new_empty((e, 2 if t == 4 else 0, h))


def _gated_setup(ctx, inputs, output):
    y, weight, _bias, gate, *meta = inputs
    _, a, b = output
    ctx.save_for_backward(y, weight, gate, a, b)
    ctx.meta = tuple(meta)
    # a and b are outputs only to be saved: no zero-filled (E, T, H)-sized gradients for them
    ctx.set_materialize_grads(False)


@torch.library.custom_op("scn_fast::gated_tap_projection_backward", mutates_args=())
def _gated_tap_projection_backward(
    dout: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    lmax: int,
    mmax: int,
    num_taps: int,
    precision: str,
    native: bool,
    backend: str,
    tap_ordered: bool,
    gemm: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _, backward = _gate_impl(backend, a.dtype)
    dpre_a, dpre_b, dgate = backward(dout.to(a.dtype).contiguous(), a, b, gate.contiguous())
    meta = (lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm)
    if b.shape[1] == 0:
        dy, dw, dbias = _project_backward(dpre_a.unsqueeze(1), y.contiguous(), weight, *meta)
    else:
        dy, dw, dbias = _project_backward_ab(dpre_a, dpre_b, y.contiguous(), weight, *meta)
    return dy.to(y.dtype), dw.contiguous(), dbias, dgate.to(gate.dtype)


@_gated_tap_projection_backward.register_fake
def _(dout, y, weight, gate, a, b, *meta):
    """(dy, dweight, dbias, dgate): the inputs' shapes (meta: the op's scalar arguments)."""
    return torch.empty_like(y), torch.empty_like(weight), bias_like(weight), torch.empty_like(gate)


def _gated_backward(ctx, dout, _da, _db):
    if dout is None:  # the output took no part in the loss
        return (None,) * 12
    y, weight, gate, a, b = ctx.saved_tensors
    dy, dw, dbias, dgate = _gated_tap_projection_backward(dout, y, weight, gate, a, b, *ctx.meta)
    return dy, dw, dbias, dgate, None, None, None, None, None, None, None, None


_gated.register_autograd(_gated_backward, setup_context=_gated_setup)


def gated_tap_projection(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate: torch.Tensor,
    lmax: int,
    mmax: int,
    num_taps: int,
    precision: str = "fp32",
    native: bool = True,
    backend: str = "reference",
    weight_order: str = "upstream",
    gemm: str = "",
) -> torch.Tensor:
    """silu(pre) * gate (E, T, H): upstream's ``act(fc1_edge_proj(a_t)) * act(fc1_dist(x_edge))`` for
    every tap, from the rotated features y (E, 2, R, C) and gate (E, H). ``backend``: whose fused
    kernels run the elementwise epilogue ("extension", "triton"; anything else: ATen ops);
    ``weight_order``: "upstream" or "tap" (as in :func:`tap_projection`); ``gemm``: the plan's GEMM
    strategy ("row_blocked", "gathered", "tap_ordered", "dense"; "" chooses by device)."""
    tap_ordered = _tap_ordered(weight_order, lmax, mmax, num_taps)
    meta = (lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm)
    return _gated(y, weight, bias, gate, *meta)[0]
