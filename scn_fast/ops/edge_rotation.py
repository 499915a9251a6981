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
from .edge_csr import EdgeCSR
from .layout import edge_layout


@torch.library.custom_op("scn_fast::edge_rotation", mutates_args=())
def _edge_rotation(
    x: torch.Tensor,
    wig: torch.Tensor,
    idx: torch.Tensor,
    perm: torch.Tensor,
    ptr: torch.Tensor,
    lmax: int,
    mmax: int,
    backend: str,
) -> torch.Tensor:
    return get_backend(backend).gather_rotate(x.contiguous(), wig.contiguous(), idx, lmax, mmax)


@_edge_rotation.register_fake
def _(x, wig, idx, perm, ptr, lmax, mmax, backend):
    return x.new_empty((idx.shape[0], idx.shape[1], edge_layout(lmax, mmax).R, x.shape[2]))


def _setup_context(ctx, inputs, output):
    x, wig, idx, perm, ptr, lmax, mmax, backend = inputs
    ctx.save_for_backward(wig, idx, perm, ptr)
    ctx.meta = (lmax, mmax, backend, x.shape[0], x.shape[1])


def _backward(ctx, dy):
    from .scatter_aggregation import _scatter_aggregation

    wig, idx, perm, ptr = ctx.saved_tensors
    lmax, mmax, backend, n, s_x = ctx.meta
    dx = _scatter_aggregation(dy.contiguous(), wig, idx, perm, ptr, lmax, mmax, n, backend)
    if s_x > dx.shape[1]:
        dx = torch.nn.functional.pad(dx, (0, 0, 0, s_x - dx.shape[1]))
    return dx, None, None, None, None, None, None, None


_edge_rotation.register_autograd(_backward, setup_context=_setup_context)


def edge_rotation(
    x: torch.Tensor, wig: torch.Tensor, csr: EdgeCSR, lmax: int, mmax: int, backend: str
) -> torch.Tensor:
    """Rotated endpoint features y (E, P, R, C) of x (N, S_x, C) for the edges of ``csr``."""
    return _edge_rotation(x, wig, csr.idx, csr.perm, csr.ptr, lmax, mmax, backend)
