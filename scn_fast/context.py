"""What a forward runs on: the graph, the message resolutions and the planned edge context.

Shapes: N atoms, E edges, S_L = (lmax+1)^2 coefficients of a resolution, R its rotated rows.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import so3
from .data import Structure
from .ops import EdgeCSR, compact_wigner, edge_csr
from .ops.reference import tap_wigner
from .planning import Plan


@dataclass
class GraphData:
    """The graph the model runs on (upstream's fields). edge_index (2, E) [source j; target i], grouped by
    target; edge_distance (E,); edge_distance_vec (E, 3) = pos[j] + offset - pos[i]; cell_offsets (E, 3)
    integer image offsets (float, as upstream); offset_distances (E, 3) the offsets in Angstrom;
    neighbors (B,) edges per structure."""

    edge_index: torch.Tensor
    edge_distance: torch.Tensor
    edge_distance_vec: torch.Tensor
    cell_offsets: torch.Tensor
    offset_distances: torch.Tensor
    neighbors: torch.Tensor


class Resolution:
    """One message resolution: degree lmax, order mmax, its taps and the constants derived from them.

    sphere_basis S_L = (lmax+1)^2; sphere_basis_reduce R = rows with |m| <= mmax; rank_cutoff: edges
    whose distance rank is <= rank_cutoff (and above the previous resolution's) use this resolution.
    """

    def __init__(
        self, lmax: int, mmax: int, num_taps: int, hidden: int, rank_cutoff: float
    ) -> None:
        self.lmax, self.mmax, self.hidden, self.rank_cutoff = lmax, mmax, hidden, rank_cutoff
        self.sphere_basis = (lmax + 1) ** 2
        self.sphere_basis_reduce = so3.sphere_basis_reduce(lmax, mmax)
        self.taps = so3.tap_set(lmax, mmax, num_taps)
        self.taps_arg = num_taps
        self.num_taps = len(self.taps.angles)
        self.rows = so3.kept_rows(lmax, mmax)
        self._cache: dict[tuple, Any] = {}

    def mapping(self, like: torch.Tensor) -> torch.Tensor:
        """(T*R, R) tap-combination matrix in like's dtype and device."""
        key = ("mapping", like.dtype, like.device)
        return so3.cached_constant(
            self._cache, key, lambda: self.taps.mapping.to(dtype=like.dtype, device=like.device)
        )

    def wigner(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense rotations of edge frames (E, 3, 3): wigner (E*T, R, S_L) per (edge, tap),
        edge-major, and wigner_inv (E, S_L, R) (``ops.reference.tap_wigner``)."""
        return tap_wigner(frames, self.lmax, self.mmax, list(self.taps.angles))


@dataclass(frozen=True)
class EdgeChunk:
    """One chunk of a resolution's edges: the edges of targets [t0, t1) (``edges``: their positions
    within the resolution, a slice when the edges are grouped by target, else an index tensor),
    their compact Wigner rows ``wig`` (E_c, K), their grouping by [source, target] over all N
    atoms (``both``) and by target over the chunk's own targets (``target``: node t0 is row 0)."""

    t0: int
    t1: int
    edges: slice | torch.Tensor
    wig: torch.Tensor
    both: EdgeCSR
    target: EdgeCSR


@dataclass
class EdgeContext:
    """Per-forward edge data shared by all blocks, edges grouped by resolution (bounds[r]:bounds[r+1]):
    edge_distance (E,), edge_index (2, E), frames (E, 3, 3) edge rotation matrices, the resolutions,
    the number of atoms and the forward's plan (``scn_fast.planning``). Per-resolution rotations are built
    on first use and shared by all blocks: ``dense`` (reference path), ``compact`` and ``csr`` (fused
    path)."""

    edge_distance: torch.Tensor
    edge_index: torch.Tensor
    frames: torch.Tensor
    bounds: list[int]
    resolutions: list[Resolution]
    num_nodes: int
    plan: Plan
    _cache: dict = field(default_factory=dict)

    def basis(self, expansion: nn.Module) -> torch.Tensor | None:
        """The distance expansion of the edges (E, G) when the plan shares it (the fused model;
        None: every block computes its own, as upstream): every block shares one expansion module,
        so it is computed once per forward, with values that would make subnormal numbers flushed
        to zero.

        Gaussians far from their centre fall into the subnormal range (2,700 of 224,000 values on a
        14-atom slab at cutoff 8), and most of the others are tiny (88% below 1e-30); x86 CPUs take
        a microcode assist on every multiply by a subnormal number and on every product that lands
        in that range, which made fc1_dist's weight-gradient GEMM (gradient x basis) 12x slower
        (3.6 ms vs 0.29 ms at E = 560) and, with the subnormal values alone flushed, still ~3x.
        Values below tiny^0.8 (2e-31 in float32) are flushed, so a product with any factor above
        tiny^0.2 (1.5e-8) stays normal; they are 1e-23 below float32's rounding of the outputs."""
        if not self.plan.shared_basis:
            return None
        key = ("basis", id(expansion))
        if key not in self._cache:
            basis = expansion(self.edge_distance)
            small = torch.finfo(basis.dtype).tiny ** 0.8
            self._cache[key] = basis.masked_fill(basis.abs() < small, 0.0)
        return self._cache[key]

    def _frames(self, r: int) -> torch.Tensor:
        """Resolution r's frames (E_r, 3, 3), a copy (so its size is its own under torch.compile)."""
        key = ("frames", r)
        if key not in self._cache:
            self._cache[key] = self.frames[self.bounds[r] : self.bounds[r + 1]].clone()
        return self._cache[key]

    def split(self, x_edge: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x_edge (E, ...) as one view per resolution, (E_r, ...) each (``torch.split``: its
        backward is one concatenation, where a slice per resolution is a zero fill and a copy
        each, plus the sum of their gradients)."""
        return x_edge.split([self._frames(r).shape[0] for r in range(len(self.resolutions))])

    def span(self, r: int) -> tuple[int, int]:
        """(lo, hi) = (bounds[r], bounds[r + 1]), read from the per-resolution frames' shapes: under
        torch.compile these are symbolic sizes (one graph for every edge count), where the ints of
        ``bounds`` would be constants that the graph specialises on."""
        sizes = [self._frames(k).shape[0] for k in range(r + 1)]
        return sum(sizes[:-1]), sum(sizes)

    def dense(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Resolution r's (wigner (E_r*T, R, S_L), wigner_inv (E_r, S_L, R)), as upstream."""
        key = ("dense", r)
        if key not in self._cache:
            self._cache[key] = self.resolutions[r].wigner(self._frames(r))
        return self._cache[key]

    def compact(self, r: int) -> torch.Tensor:
        """Resolution r's compact Wigner rows wig (E_r, K) (ops/SPEC.md)."""
        key = ("compact", r)
        if key not in self._cache:
            res = self.resolutions[r]
            self._cache[key] = compact_wigner(self._frames(r), res.lmax, res.mmax)
        return self._cache[key]

    def csr(self, r: int) -> tuple[EdgeCSR, EdgeCSR]:
        """Resolution r's edges grouped by [source, target] (P = 2) and by target alone (P = 1)."""
        key = ("csr", r)
        if key not in self._cache:
            ei = self.edge_index[:, self.bounds[r] : self.bounds[r + 1]]
            both = edge_csr(ei.t(), self.num_nodes)
            self._cache[key] = (both, both.side(1))
        return self._cache[key]

    def chunks(self, r: int) -> list[EdgeChunk] | None:
        """Resolution r's edges in target-aligned chunks of at most the plan's
        ``memory.edge_chunk[r]`` edges (a target with more edges than that is a chunk of its own),
        or None when they fit one chunk (the unchunked path). Every target's edges stay in one
        chunk, in their order, so its messages are summed as without chunks."""
        key = ("chunks", r)
        if key not in self._cache:
            self._cache[key] = self._build_chunks(r)
        return self._cache[key]

    def _build_chunks(self, r: int) -> list[EdgeChunk] | None:
        memory = self.plan.memory
        limit = None if memory is None else memory.edge_chunk[r]
        lo, hi = self.bounds[r], self.bounds[r + 1]
        if limit is None or hi - lo <= limit:
            return None
        ei = self.edge_index[:, lo:hi]
        _, target = self.csr(r)
        wig = self.compact(r)
        ptr = target.ptr[0].tolist()
        grouped = bool((ei[1, 1:] >= ei[1, :-1]).all())
        chunks, t0, n = [], 0, self.num_nodes
        while t0 < n:
            # the last target t1 whose edges from t0 on fit the limit (at least one target)
            t1 = max(t0 + 1, bisect_right(ptr, ptr[t0] + limit, t0) - 1)
            a, b = ptr[t0], ptr[t1]
            if b > a:
                sel = slice(a, b) if grouped else target.perm[0, a:b]
                idx = ei[:, sel].t()
                local = (idx[:, 1:] - t0).contiguous()
                chunks.append(
                    EdgeChunk(
                        t0,
                        t1,
                        sel,
                        wig[sel],
                        edge_csr(idx, n),
                        edge_csr(local, t1 - t0),
                    )
                )
            t0 = t1
        return chunks


def mark_sizes_dynamic(st: Structure, ctx: EdgeContext) -> None:
    """Mark the atom, structure and edge dimensions of the compiled region's inputs dynamic, so
    that torch.compile traces one graph for all sizes at its first call (rather than a static
    graph, then a dynamic one at the first new size). A hint: no effect outside torch.compile,
    and sizes 0 and 1 are still specialised (one more graph each when they occur)."""
    mark = torch._dynamo.maybe_mark_dynamic
    for t in (st.pos, st.atomic_numbers, st.batch, st.natoms):
        mark(t, 0)
    mark(ctx.edge_distance, 0)
    mark(ctx.edge_index, 1)
    for (kind, _), value in ctx._cache.items():
        if kind in ("frames", "compact"):
            mark(value, 0)
        elif kind == "dense":
            for t in value:
                mark(t, 0)
        elif kind == "csr":
            for c in value:
                mark(c.idx, 0)
                mark(c.perm, 1)
                mark(c.ptr, 1)
