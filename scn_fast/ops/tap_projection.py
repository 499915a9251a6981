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


def _split_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (B, 2, R, C) with the mmax = 1 row order (row 0, then (m=-1, m=0, m=+1) per degree l >= 1)
    -> its m = 0 rows (B, 2, L+1, C) and m = +-1 rows (B, 2, L, 2, C), with strided copies (no
    index_select, which is slow along an inner dimension on CPU)."""
    b, two, r, c = t.shape
    trip = t[:, :, 1:].reshape(b, two, (r - 1) // 3, 3, c)
    rows0 = torch.cat([t[:, :, :1], trip[:, :, :, 1]], dim=2)
    return rows0, trip[:, :, :, 0::2].contiguous()


def _join_rows(rows0: torch.Tensor, rows1: torch.Tensor) -> torch.Tensor:
    """Inverse of _split_rows: (B, 2, L+1, C) and (B, 2, L, 2, C) -> (B, 2, 3L+1, C)."""
    b, two, l1, c = rows0.shape
    out = rows0.new_empty((b, two, 3 * (l1 - 1) + 1, c))
    out[:, :, :1] = rows0[:, :, :1]
    trip = out[:, :, 1:].view(b, two, l1 - 1, 3, c)
    trip[:, :, :, 1] = rows0[:, :, 1:]
    trip[:, :, :, 0::2] = rows1
    return out


def _tap1(rows1: torch.Tensor, sym) -> torch.Tensor:
    """Tap 1's arrangement of the m = +-1 rows (B, 2, L, 2, C): within each degree the m = -1 and
    m = +1 rows swap, with the signs of the tap's signed permutation."""
    s_neg, s_pos = sym.pair_signs
    return torch.stack([s_neg * rows1[:, :, :, 1], s_pos * rows1[:, :, :, 0]], dim=3)


def _untap1(d: torch.Tensor, sym) -> torch.Tensor:
    """Adjoint of _tap1."""
    s_neg, s_pos = sym.pair_signs
    return torch.stack([s_pos * d[:, :, :, 1], s_neg * d[:, :, :, 0]], dim=3)


def _split_weight(weight: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W0 (H, 2*R0*C) and W1 (H, 2*R1*C): the columns of weight (H, 2*R*C) on m = 0 / m = +-1 rows."""
    h = weight.shape[0]
    w0, w1 = _split_rows(weight.view(h, 2, r, c))
    return w0.reshape(h, -1), w1.reshape(h, -1)


def _split_input(y: torch.Tensor, sym) -> tuple[torch.Tensor, torch.Tensor]:
    """y0 (E, 2*R0*C) and y1q (2E, 2*R1*C) = [y1; tap 1's arrangement of y1] from y (E, 2, R, C)."""
    e = y.shape[0]
    y0, y1 = _split_rows(y)
    return y0.reshape(e, -1), torch.cat([y1, _tap1(y1, sym)], dim=0).reshape(2 * e, -1)


@torch.library.custom_op("scn_fast::tap_projection", mutates_args=())
def _tap_projection(
    y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lmax: int, mmax: int, num_taps: int
) -> torch.Tensor:
    sym = tap_symmetry(lmax, mmax, num_taps)
    e, _, r, c = y.shape
    if sym.num_taps == 1:
        return torch.addmm(bias, y.reshape(e, -1), weight.t()).view(e, 1, -1)
    w0, w1 = _split_weight(weight, r, c)
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
    w0, w1 = _split_weight(weight, r, c)
    y0, y1q = _split_input(y, sym)
    # dy: the m = 0 rows from A; the m = +-1 rows from B0 plus B1's part with tap 1 undone.
    dy1q = (db @ w1).view(2, e, 2, -1, 2, c)
    dy = _join_rows((da @ w0).view(e, 2, -1, c), dy1q[0] + _untap1(dy1q[1], sym))
    dw = _join_rows((da.t() @ y0).view(h, 2, -1, c), (db.t() @ y1q).view(h, 2, -1, 2, c))
    return dy, dw.reshape(h, -1), da.sum(0), None, None, None


_tap_projection.register_autograd(_backward, setup_context=_setup_context)


def tap_projection(
    y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lmax: int, mmax: int, num_taps: int
) -> torch.Tensor:
    """Pre-activations (E, T, H) of fc1_edge_proj for every tap of the rotated features y (E, 2, R, C)."""
    return _tap_projection(y, weight, bias, lmax, mmax, num_taps)
