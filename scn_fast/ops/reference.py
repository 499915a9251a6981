"""Reference implementations of the edge primitives (``SPEC.md``): dense rotation matrices, the way
upstream computes them (gather, dense batched matmul, ``index_add_``). The fused backends are tested
against these."""

from __future__ import annotations

import torch

from .layout import dense_from_compact, edge_layout


def gather_rotate(
    x: torch.Tensor, wig: torch.Tensor, idx: torch.Tensor, lmax: int, mmax: int
) -> torch.Tensor:
    """y (E, P, R, C) = W_e x[idx[e, p]] with W_e the dense (R, S) rows of wig (E, K)."""
    s = edge_layout(lmax, mmax).sphere_basis
    w = dense_from_compact(wig.to(torch.promote_types(wig.dtype, x.dtype)), lmax, mmax)
    xs = x[:, :s][idx].to(w.dtype)  # (E, P, S, C)
    return torch.einsum("ers,epsc->eprc", w, xs).to(x.dtype)


def rotate_scatter(
    m: torch.Tensor, wig: torch.Tensor, idx: torch.Tensor, lmax: int, mmax: int, num_nodes: int
) -> torch.Tensor:
    """out (N, S, C): out[n] = sum over (e, p) with idx[e, p] = n of W_e^T m[e, p]."""
    lay = edge_layout(lmax, mmax)
    w = dense_from_compact(wig.to(torch.promote_types(wig.dtype, m.dtype)), lmax, mmax)
    msg = torch.einsum("ers,eprc->epsc", w, m.to(w.dtype))
    out = msg.new_zeros((num_nodes, lay.sphere_basis, m.shape[-1]))
    out.index_add_(0, idx.reshape(-1), msg.reshape(-1, lay.sphere_basis, m.shape[-1]))
    return out.to(m.dtype)
