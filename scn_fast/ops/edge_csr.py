"""Edge index groupings for deterministic segment reductions (no atomics)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The schema arguments every edge-frame custom op takes after its features (the Wigner rows, the CSR
# of ``EdgeCSR`` and the resolution), written once for ``edge_rotation`` and ``scatter_aggregation``.
EDGE_FRAME_ARGS = "Tensor wig, Tensor idx, Tensor perm, Tensor ptr, SymInt lmax, SymInt mmax"


@dataclass(frozen=True)
class EdgeCSR:
    """The P endpoint columns of E edges and, per column, the edges grouped by that endpoint.

    idx (E, P) int64 node per edge and side; perm (P, E) int64 stable argsort of idx[:, p];
    ptr (P, N + 1) int64: the edges ending at node n on side p are perm[p, ptr[p, n]:ptr[p, n + 1]].
    """

    idx: torch.Tensor
    perm: torch.Tensor
    ptr: torch.Tensor
    num_nodes: int

    def side(self, p: int) -> EdgeCSR:
        """The CSR of side p alone (P = 1)."""
        return EdgeCSR(
            self.idx[:, p : p + 1].contiguous(),
            self.perm[p : p + 1].contiguous(),
            self.ptr[p : p + 1].contiguous(),
            self.num_nodes,
        )


def edge_csr(idx: torch.Tensor, num_nodes: int) -> EdgeCSR:
    """Group edges by each of their endpoint columns idx (E, P) (stable, so ties keep edge order)."""
    idx = idx.long().contiguous()
    e, p = idx.shape
    perm = torch.empty((p, e), dtype=torch.long, device=idx.device)
    ptr = torch.zeros((p, num_nodes + 1), dtype=torch.long, device=idx.device)
    for s in range(p):
        perm[s] = torch.argsort(idx[:, s], stable=True)
        ptr[s, 1:] = torch.cumsum(torch.bincount(idx[:, s], minlength=num_nodes), 0)
    return EdgeCSR(idx, perm, ptr, num_nodes)
