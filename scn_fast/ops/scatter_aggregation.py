"""``scn_fast::scatter_aggregation``: rotate per-edge messages back from the edge frames and sum them
into their destination atoms (``SPEC.md``, primitive ``rotate_scatter``).

    out[n] = sum_p sum_{e : idx[e, p] = n} W_e^T m[e, p]     m (E, P, R, C)  ->  out (N, S_L, C)

A segment (CSR) reduction over the edges grouped by destination: each output row is summed by one
worker in a fixed order, so results are bit-identical run to run (no atomics). Backward:
dm[e, p] = W_e dout[idx[e, p]] (the ``edge_rotation`` op on the same backend).
"""

from __future__ import annotations

import torch

from .backends import get_backend
from .edge_csr import EDGE_FRAME_ARGS, EdgeCSR
from .layout import edge_layout


@torch.library.custom_op(
    "scn_fast::scatter_aggregation",
    mutates_args=(),
    schema=f"(Tensor m, {EDGE_FRAME_ARGS}, SymInt num_nodes, str backend) -> Tensor",
)
def _scatter_aggregation(m, wig, idx, perm, ptr, lmax, mmax, num_nodes, backend):
    return get_backend(backend).rotate_scatter(
        m.contiguous(), wig.contiguous(), perm, ptr, lmax, mmax, num_nodes
    )


@_scatter_aggregation.register_fake
def _(m, wig, idx, perm, ptr, lmax, mmax, num_nodes, backend):
    return m.new_empty((num_nodes, edge_layout(lmax, mmax).sphere_basis, m.shape[3]))


def _setup_context(ctx, inputs, output):
    _m, wig, idx, perm, ptr, lmax, mmax, _num_nodes, backend = inputs
    ctx.save_for_backward(wig, idx, perm, ptr)
    ctx.meta = (lmax, mmax, backend)


def _backward(ctx, dout):
    from .edge_rotation import _edge_rotation

    wig, idx, perm, ptr = ctx.saved_tensors
    lmax, mmax, backend = ctx.meta
    dm = _edge_rotation(dout.contiguous(), wig, idx, perm, ptr, lmax, mmax, backend)
    return dm, None, None, None, None, None, None, None, None


_scatter_aggregation.register_autograd(_backward, setup_context=_setup_context)


def scatter_aggregation(
    m: torch.Tensor, wig: torch.Tensor, csr: EdgeCSR, lmax: int, mmax: int, backend: str
) -> torch.Tensor:
    """Per-atom sums (N, S_L, C) of the back-rotated messages m (E, P, R, C) over ``csr``."""
    # num_nodes from ptr's shape (not csr.num_nodes): a size torch.compile keeps symbolic
    num_nodes = csr.ptr.shape[1] - 1
    return _scatter_aggregation(m, wig, csr.idx, csr.perm, csr.ptr, lmax, mmax, num_nodes, backend)
