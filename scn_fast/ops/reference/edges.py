"""Upstream's edge math with dense rotation matrices (``SPEC.md``): gather, dense batched matmul,
``index_add_``. The fused backends of ``edge_rotation`` / ``scatter_aggregation`` are tested
against these."""

from __future__ import annotations

import torch

from ..layout import dense_from_compact, edge_layout

# Edges per dense (E, R, S) block: bounds the temporaries of large problems.
CHUNK = 4096


def _dense(wig: torch.Tensor, lmax: int, mmax: int, dtype: torch.dtype) -> torch.Tensor:
    return dense_from_compact(wig.to(dtype), lmax, mmax)


def gather_rotate(
    x: torch.Tensor,
    wig: torch.Tensor,
    idx: torch.Tensor,
    lmax: int,
    mmax: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y (E, P, R, C) = W_e x[idx[e, p]] with W_e the dense (R, S) rows of wig (E, K). ``dtype``:
    computed and returned in it (e.g. float64 for a test's truth); default: computed in the
    promoted dtype of x and wig, returned in x's."""
    lay = edge_layout(lmax, mmax)
    work = dtype or torch.promote_types(wig.dtype, x.dtype)
    parts = []
    for lo in range(0, idx.shape[0], CHUNK):
        w = _dense(wig[lo : lo + CHUNK], lmax, mmax, work)
        xs = x[:, : lay.sphere_basis][idx[lo : lo + CHUNK]].to(work)  # (e, P, S, C)
        parts.append(torch.einsum("ers,epsc->eprc", w, xs))
    if not parts:
        parts.append(x.new_zeros((0, idx.shape[1], lay.R, x.shape[2]), dtype=work))
    return torch.cat(parts).to(dtype or x.dtype)


def rotate_scatter(
    m: torch.Tensor,
    wig: torch.Tensor,
    idx: torch.Tensor,
    lmax: int,
    mmax: int,
    num_nodes: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """out (N, S, C): out[n] = sum over (e, p) with idx[e, p] = n of W_e^T m[e, p]. ``dtype`` as in
    :func:`gather_rotate`."""
    lay = edge_layout(lmax, mmax)
    work = dtype or torch.promote_types(wig.dtype, m.dtype)
    out = m.new_zeros((num_nodes, lay.sphere_basis, m.shape[-1]), dtype=work)
    for lo in range(0, m.shape[0], CHUNK):
        w = _dense(wig[lo : lo + CHUNK], lmax, mmax, work)
        msg = torch.einsum("ers,eprc->epsc", w, m[lo : lo + CHUNK].to(work))
        out.index_add_(0, idx[lo : lo + CHUNK].reshape(-1), msg.reshape(-1, *out.shape[1:]))
    return out.to(dtype or m.dtype)
