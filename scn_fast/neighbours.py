"""Which neighbours come first: the geometric order behind neighbour truncation
(``max_num_neighbors``) and the split of a target's edges between resolutions (rank < 12).

Ranking edges by distance alone leaves exact ties (ideal crystals, symmetric molecules) to the
edges' storage order, i.e. to source indices and cell offsets, which change when a structure is
translated, wrapped into its cell, permuted or repeated into a supercell. Such copies then get
different edge sets and different energies and forces. Here ties are broken by geometry only:

1. Per target, edges sorted by distance are cut into *tie groups* wherever the gap between
   consecutive distances exceeds ``TIE_TOLERANCE`` (a chain of gaps <= the tolerance stays in one
   group); groups are ordered by distance.
2. Within a group, the same gap rule splits the edges by the x component of the edge vector
   ``pos[j] - pos[i] + n @ cell`` (ascending), then by y, then by z.
3. What is still tied (no two distinct edges of one target have the same vector) keeps the
   input order.

Round-off on the positions (float32, wrapping, a translated origin) moves distances and
components by ~1e-6 Angstrom, far below the tolerance, so copies of a structure get the same
groups; distances that differ by more than the tolerance keep their plain distance order, so a
tie-free structure is ranked exactly as by distance alone. The rule is not rotation-invariant
(no rule can be: a rotation permutes the members of a tie group), see docs/neighbours.md.
"""

from __future__ import annotations

import torch

__all__ = ["TIE_TOLERANCE", "geometric_order", "geometric_rank", "rank_edges"]

#: Angstrom; distances (and edge-vector components) closer than this count as tied.
TIE_TOLERANCE = 1e-4


def _refine(group: torch.Tensor, value: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Split each group (E,) int64 into runs of ``value`` (E,) float64 whose consecutive sorted
    gaps are <= tolerance. Returns new ids (E,) int64, ordered by (group, value run)."""
    order = torch.sort(value, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    g, v = group[order], value[order]
    new = torch.ones_like(g, dtype=torch.bool)
    new[1:] = (g[1:] != g[:-1]) | ((v[1:] - v[:-1]) > tolerance)
    ids = torch.empty_like(g)
    ids[order] = torch.cumsum(new.long(), 0) - 1
    return ids


def geometric_order(
    target: torch.Tensor,
    distance: torch.Tensor,
    vectors: torch.Tensor | None = None,
    tolerance: float = TIE_TOLERANCE,
) -> torch.Tensor:
    """Stable permutation (E,) int64 that sorts edges by target, then by the geometric rule of
    this module (distance tie groups, then x, y, z component groups of ``vectors``).

    Args:
        target: (E,) int target atom of each edge.
        distance: (E,) edge lengths (any float dtype; compared in float64).
        vectors: (E, 3) edge vectors; None ranks tie groups by input order only.
        tolerance: gap, in Angstrom, below which values are tied.
    """
    if target.numel() == 0:
        return target.new_zeros(0, dtype=torch.long)
    group = _refine(target.long(), distance.detach().double(), tolerance)
    if vectors is not None:
        vec = vectors.detach().double()
        for axis in range(3):
            group = _refine(group, vec[:, axis].contiguous(), tolerance)
    return torch.sort(group, stable=True).indices


def geometric_rank(
    target: torch.Tensor,
    distance: torch.Tensor,
    num_atoms: int,
    vectors: torch.Tensor | None = None,
    tolerance: float = TIE_TOLERANCE,
) -> torch.Tensor:
    """Rank (E,) int64 of each edge among its target's edges in ``geometric_order`` (0 first).

    Args: as ``geometric_order``; num_atoms: N, the number of possible targets.
    """
    if target.numel() == 0:
        return target.new_zeros(0, dtype=torch.long)
    order = geometric_order(target, distance, vectors, tolerance)
    counts = torch.bincount(target, minlength=num_atoms)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - starts[target[order]]
    return rank


def rank_edges(
    distance: torch.Tensor,
    target: torch.Tensor,
    num_atoms: int,
    vectors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rank (E,) of each edge among its target's edges, nearest first (0 = nearest), ties broken
    by geometry (``geometric_order``; without ``vectors``, by input order). The model sends
    ranks 0..11 to the first of two resolutions.

    Args:
        distance: (E,) edge lengths. target: (E,) int target atoms. num_atoms: N.
        vectors: (E, 3) edge vectors ``pos[j] - pos[i] + n @ cell``.
    """
    return geometric_rank(target, distance, num_atoms, vectors)
