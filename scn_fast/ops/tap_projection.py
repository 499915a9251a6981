"""``scn_fast::tap_projection``: upstream's ``fc1_edge_proj`` applied to every tap, without the
tap-repeated input and with 41% of its FLOPs (DESIGN.md section 3).

Upstream feeds fc1_edge_proj the rotated features of every tap, a_t = [Q_t y_src, Q_t y_tgt]
(E*T rows of width 2*R*C, Q_t a signed row permutation). With 4 taps the m = 0 rows are equal in all
taps and, on the m = +-1 rows, tap 2 = -tap 0 and tap 3 = -tap 1. Splitting the weight's columns
into the m = 0 part W0 and the m = +-1 part W1, with y0 / y1 the matching rows of y and y1' tap 1's
arrangement of y1 (a signed row permutation):

    A = W0 y0,  B0 = W1 y1,  B1 = W1 y1'
    pre[:, 0] = A + B0 + b,  pre[:, 1] = A + B1 + b,  pre[:, 2] = A - B0 + b,  pre[:, 3] = A - B1 + b

(R0 + 2 R1) row blocks of GEMM instead of 4 R, exactly, in forward and backward. With one tap it is
the plain linear map. y (E, 2, R, C), weight (H, 2*R*C), bias (H,)  ->  pre (E, T, H).
"""

from __future__ import annotations

import torch

from .layout import tap_symmetry


def _split_weight(weight: torch.Tensor, sym, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W0 (H, 2*R0*C) and W1 (H, 2*R1*C): the columns of weight (H, 2*R*C) on m = 0 / m = +-1 rows."""
    h = weight.shape[0]
    w = weight.view(h, 2, r, c)
    w0 = w.index_select(2, sym.rows0.to(weight.device)).reshape(h, -1)
    w1 = w.index_select(2, sym.rows1.to(weight.device)).reshape(h, -1)
    return w0, w1


def _split_input(y: torch.Tensor, sym) -> tuple[torch.Tensor, torch.Tensor]:
    """y0 (E, 2*R0*C) and y1q (2E, 2*R1*C) = [y1; tap 1's arrangement of y1] from y (E, 2, R, C)."""
    e = y.shape[0]
    y0 = y.index_select(2, sym.rows0.to(y.device)).reshape(e, -1)
    y1 = y.index_select(2, sym.rows1.to(y.device))
    sign = sym.sign1.to(device=y.device, dtype=y.dtype).view(1, 1, -1, 1)
    y1_tap1 = y1.index_select(2, sym.perm1.to(y.device)) * sign
    return y0, torch.cat([y1, y1_tap1], dim=0).reshape(2 * e, -1)


@torch.library.custom_op("scn_fast::tap_projection", mutates_args=())
def _tap_projection(
    y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lmax: int, mmax: int, num_taps: int
) -> torch.Tensor:
    sym = tap_symmetry(lmax, mmax, num_taps)
    e, _, r, c = y.shape
    if sym.num_taps == 1:
        return torch.addmm(bias, y.reshape(e, -1), weight.t()).view(e, 1, -1)
    w0, w1 = _split_weight(weight, sym, r, c)
    y0, y1q = _split_input(y, sym)
    a = torch.addmm(bias, y0, w0.t())
    b = (y1q @ w1.t()).view(2, e, -1)  # B0 and B1 in one GEMM
    return torch.stack([a + b[0], a + b[1], a - b[0], a - b[1]], dim=1)


@_tap_projection.register_fake
def _(y, weight, bias, lmax, mmax, num_taps):
    t = tap_symmetry(lmax, mmax, num_taps).num_taps
    return y.new_empty((y.shape[0], t, weight.shape[0]))


def _setup_context(ctx, inputs, output):
    y, weight, _bias, lmax, mmax, num_taps = inputs
    ctx.save_for_backward(y, weight)
    ctx.meta = (lmax, mmax, num_taps)


def _backward(ctx, dpre):
    y, weight = ctx.saved_tensors
    sym = tap_symmetry(*ctx.meta)
    e, _, r, c = y.shape
    h = weight.shape[0]
    if sym.num_taps == 1:
        d = dpre.reshape(e, h)
        dy = (d @ weight).view_as(y)
        dw = d.t() @ y.reshape(e, -1)
        return dy, dw, d.sum(0), None, None, None
    da = dpre.sum(1)
    db = torch.cat([dpre[:, 0] - dpre[:, 2], dpre[:, 1] - dpre[:, 3]], dim=0)  # (2E, H)
    w0, w1 = _split_weight(weight, sym, r, c)
    y0, y1q = _split_input(y, sym)
    rows0, rows1 = sym.rows0.to(y.device), sym.rows1.to(y.device)
    # dy: m = 0 rows from A; m = +-1 rows from B0 plus tap 1's arrangement undone on B1's part.
    dy1q = (db @ w1).view(2, e, 2, -1, c)
    sign = sym.sign1.to(device=y.device, dtype=y.dtype).view(1, 1, -1, 1)
    undo = torch.zeros_like(dy1q[1]).index_add_(2, sym.perm1.to(y.device), dy1q[1] * sign)
    dy = y.new_zeros(y.shape)
    dy.index_copy_(2, rows0, (da @ w0).view(e, 2, -1, c))
    dy.index_copy_(2, rows1, dy1q[0] + undo)
    dw = weight.new_zeros((h, 2, r, c))
    dw.index_copy_(2, rows0, (da.t() @ y0).view(h, 2, -1, c))
    dw.index_copy_(2, rows1, (db.t() @ y1q).view(h, 2, -1, c))
    return dy, dw.view(h, -1), da.sum(0), None, None, None


_tap_projection.register_autograd(_backward, setup_context=_setup_context)


def tap_projection(
    y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lmax: int, mmax: int, num_taps: int
) -> torch.Tensor:
    """Pre-activations (E, T, H) of fc1_edge_proj for every tap of the rotated features y (E, 2, R, C)."""
    return _tap_projection(y, weight, bias, lmax, mmax, num_taps)
