"""``scn_fast::edge_rotation``: gather node features at edge endpoints and rotate them into each edge's
frame with the compact Wigner rows (``SPEC.md``, primitive ``gather_rotate``).

    y[e, p] = W_e x[idx[e, p]]        x (N, S_x, C), wig (E, K), idx (E, P)  ->  y (E, P, R, C)

Backward: dx = sum_p segment-sum over idx[:, p] of W_e^T dy[e, p] (the ``scatter_aggregation`` op on
the same backend, over the source- and target-sorted CSR: deterministic, no atomics). The Wigner
rows get no gradient (frames are detached, as upstream).
"""

from __future__ import annotations

import torch

from .backends import get_backend
from .edge_csr import EDGE_FRAME_ARGS, EdgeCSR
from .layout import edge_layout


@torch.library.custom_op(
    "scn_fast::edge_rotation",
    mutates_args=(),
    schema=f"(Tensor x, {EDGE_FRAME_ARGS}, str backend) -> Tensor",
)
def _edge_rotation(x, wig, idx, perm, ptr, lmax, mmax, backend):
    return get_backend(backend).gather_rotate(x.contiguous(), wig.contiguous(), idx, lmax, mmax)


@_edge_rotation.register_fake
def _(x, wig, idx, perm, ptr, lmax, mmax, backend):
    return x.new_empty((idx.shape[0], idx.shape[1], edge_layout(lmax, mmax).R, x.shape[2]))


def _setup_context(ctx, inputs, output):
    x, wig, idx, perm, ptr, lmax, mmax, backend = inputs
    ctx.save_for_backward(wig, idx, perm, ptr)
    ctx.meta = (lmax, mmax, backend, x.shape[0], x.shape[1])


def _dx(dy, wig, idx, perm, ptr, lmax, mmax, n, s_x, backend) -> torch.Tensor:
    """dx (n, s_x, C) of the rotation from dy (E, P, R, C): the transposed rotation summed into the
    nodes (``scatter_aggregation``), zero past the (L+1)^2 coefficients the rotation reads."""
    from .scatter_aggregation import _scatter_aggregation

    dx = _scatter_aggregation(dy.contiguous(), wig, idx, perm, ptr, lmax, mmax, n, backend)
    if s_x > dx.shape[1]:
        dx = torch.nn.functional.pad(dx, (0, 0, 0, s_x - dx.shape[1]))
    return dx


def _backward(ctx, dy):
    lmax, mmax, backend, n, s_x = ctx.meta
    return _dx(dy, *ctx.saved_tensors, lmax, mmax, n, s_x, backend), *(None,) * 7


_edge_rotation.register_autograd(_backward, setup_context=_setup_context)


def edge_rotation(
    x: torch.Tensor, wig: torch.Tensor, csr: EdgeCSR, lmax: int, mmax: int, backend: str
) -> torch.Tensor:
    """Rotated endpoint features y (E, P, R, C) of x (N, S_x, C) for the edges of ``csr``."""
    return _edge_rotation(x, wig, csr.idx, csr.perm, csr.ptr, lmax, mmax, backend)


# ----------------------------------------------------------------------------- split form
_SPLIT_ARGS = "Tensor a, Tensor b, Tensor sign, SymInt n0, SymInt n_pair"


@torch.library.custom_op(
    "scn_fast::edge_rotation_split",
    mutates_args=(),
    schema=f"(Tensor x, {EDGE_FRAME_ARGS}, {_SPLIT_ARGS}) -> (Tensor, Tensor)",
)
def _edge_rotation_split(x, wig, idx, perm, ptr, lmax, mmax, a, b, sign, n0, n_pair):
    from ..extension import load_extension

    ext = load_extension()
    e, c = idx.shape[0], x.shape[2]
    y0 = ext.cached_empty([e, n0, c], x.dtype)
    pair = ext.cached_empty([e, n_pair, c], x.dtype)
    ext.gather_rotate_split(x.contiguous(), wig.contiguous(), idx, lmax, mmax, a, b, sign, y0, pair)
    return y0, pair


@_edge_rotation_split.register_fake
def _(x, wig, idx, perm, ptr, lmax, mmax, a, b, sign, n0, n_pair):
    e, c = idx.shape[0], x.shape[2]
    return x.new_empty((e, n0, c)), x.new_empty((e, n_pair, c))


def _split_setup_context(ctx, inputs, output):
    x, wig, idx, perm, ptr, lmax, mmax, a, b, sign, _n0, _n_pair = inputs
    ctx.save_for_backward(wig, idx, perm, ptr, a, b, sign)
    ctx.meta = (lmax, mmax, x.shape[0], x.shape[1])


def _split_backward(ctx, dy0, dpair):
    from ..extension import load_extension

    wig, idx, perm, ptr, a, b, sign = ctx.saved_tensors
    lmax, mmax, n, s_x = ctx.meta
    e, p = idx.shape
    dy = load_extension().tap_assemble(dy0.contiguous(), dpair.contiguous(), a, b, sign)
    dy = dy.view(e, p, a.numel() // p, dy.shape[2])
    return _dx(dy, wig, idx, perm, ptr, lmax, mmax, n, s_x, "extension"), *(None,) * 11


_edge_rotation_split.register_autograd(_split_backward, setup_context=_split_setup_context)


def edge_rotation_split(
    x: torch.Tensor, wig: torch.Tensor, csr: EdgeCSR, lmax: int, mmax: int, rows
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`edge_rotation` written straight into the tap projection's two GEMM operands (the C++
    extension on CPU, float32/float64 only): y0 (E, n0, C), the m = 0 rows of both sides, and pair
    (E, 2 n1, C), their m = +-1 rows then tap 1's arrangement of them (``rows``: the resolution's
    ``tap_projection.TapRows``; its assemble tables say where each rotated row goes). The same
    numbers as ``edge_rotation`` followed by the projection's split, without the split's pass over
    y; the backward assembles dy from (dy0, dpair) and runs ``edge_rotation``'s backward."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            "edge_rotation_split runs the C++ extension's CPU twin on float32/float64 features; "
            f"got {x.dtype} on {x.device} (use edge_rotation there)"
        )
    return _edge_rotation_split(
        x,
        wig,
        csr.idx,
        csr.perm,
        csr.ptr,
        lmax,
        mmax,
        rows.assemble_a,
        rows.assemble_b,
        rows.assemble_sign,
        rows.n0,
        2 * rows.n1,
    )
