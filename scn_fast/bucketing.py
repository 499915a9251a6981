"""Shapes that stay put: atom and edge counts padded to buckets, so a compiled model replays.

In molecular dynamics the number of edges (and, between systems, of atoms) changes from one step to
the next, so every step shows ``torch.compile`` or a CUDA graph a new shape. Bucketing pads the
model's input to a *capacity*: N_cap atoms and E_cap[r] edges per message resolution r, chosen from
a coarse grid of sizes and kept while the system fits, so a trajectory sees a handful of shapes.

What padding adds, and why it contributes exactly nothing
---------------------------------------------------------
SCN has no cutoff envelope: its Gaussian distance basis is small but not zero at the cutoff, and a
message also carries the source and target element embeddings and the biases, so an edge "beyond
the cutoff" into a real atom would still change that atom. Padding therefore never touches a real
atom. It appends one extra structure of D = N_cap - N *inert* atoms (atomic number 1, no cell, no
periodicity) placed on a line ``cutoff + 1`` Å apart, and every padded edge runs between two inert
atoms (source != target, so every edge vector is non-zero and at least ``cutoff + 1`` Å long, beyond
the cutoff). Every operation of the model is per edge, per atom, or a sum over a target's edges, over
an atom's grid points or over a structure's atoms; the padded edges' targets and sources are inert
atoms and the inert atoms form their own structure, so:

* the real atoms' features, energies (per structure) and forces are computed from exactly the same
  values as without padding (the sums run over the same terms in the same order; only the GEMM
  blocking over more rows may differ, which is rounding, not contribution);
* the inert structure's energy and the inert atoms' forces are dropped from what is returned, so in
  training no loss term reaches them and their gradient contributions are exact zeros.

Per-resolution counts. The model sends each target's edges, nearest first, to resolution 0 while
their rank is <= rank_cutoff (12 edges per target for two resolutions) and the rest to the last
resolution; each resolution's edge count is a shape of its own, so each is padded to its own
capacity. A padded target therefore takes at most 12 resolution-0 edges, and one inert "hub" target
takes 12 resolution-0 edges (ranks 0-11) followed by every padded edge of the last resolution. This
needs >= 12 padded resolution-0 edges whenever the last resolution is padded, which the capacity
reserves. The counts depend on ranks alone, not on how ties between equal distances are broken.

Frames. With ``deterministic_frames=True`` (the ASE calculator's default) every edge frame is a
function of its own edge vector, and padded outputs equal the unpadded ones. With upstream's random
frame rolls the padded model draws more random numbers, so the real edges receive other (equally
distributed) rolls: the outputs differ as two unpadded calls with different seeds do.

Shapes: N atoms, B structures, E edges; E_r edges of resolution r.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import Structure

INERT_ATOMIC_NUMBER = 1
"""Atomic number of the inert padding atoms (any valid element gives the same real outputs)."""


@dataclass(frozen=True)
class BucketPolicy:
    """How capacities are chosen.

    per_octave: sizes are rounded up to multiples of max(min_step, 2^floor(log2 n) / per_octave),
    i.e. at most 1/per_octave above the size (32: <= 3.1%). headroom: fraction of edge growth
    planned in when a capacity is (re)chosen, so a trajectory's fluctuating edge counts stay inside
    it (the atom count of MD does not change; a grown system gets a new capacity). shrink: a
    capacity is replanned when the system's atoms or edges fall below this fraction of what it was
    planned for (so a shrinking system does not keep paying for its old size).
    """

    per_octave: int = 32
    min_atom_step: int = 4
    min_edge_step: int = 32
    headroom: float = 0.04
    shrink: float = 0.8

    def __post_init__(self) -> None:
        if self.per_octave < 1:
            raise ValueError(f"per_octave must be >= 1, got {self.per_octave}")
        if self.min_atom_step < 1 or self.min_edge_step < 1:
            raise ValueError("min_atom_step and min_edge_step must be >= 1")
        if not 0.0 <= self.headroom <= 1.0:
            raise ValueError(f"headroom must be in [0, 1], got {self.headroom}")
        if not 0.0 <= self.shrink < 1.0:
            raise ValueError(f"shrink must be in [0, 1), got {self.shrink}")


def round_up(n: int, per_octave: int = 32, min_step: int = 8) -> int:
    """The smallest size >= n on the bucket grid: a multiple of max(min_step, 2^floor(log2 n) /
    per_octave). round_up(0) = 0."""
    if n < 0:
        raise ValueError(f"size must be >= 0, got {n}")
    if n == 0:
        return 0
    step = max(min_step, (1 << (int(n).bit_length() - 1)) // per_octave)
    return -(-n // step) * step


@dataclass(frozen=True)
class Capacity:
    """A padded size: atoms (real + inert) and edges per resolution (real + padded)."""

    atoms: int
    edges: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int]:
        """(atoms, edges): the sizes the model's tensors take."""
        return self.atoms, sum(self.edges)


def rank_caps(model: Any) -> list[int | None]:
    """Per resolution, how many of one target's edges (nearest first) it takes: floor(rank_cutoff)
    + 1 for every resolution but the last (12 for SCN's two), None (unlimited) for the last."""
    resolutions = model.resolutions
    if len(resolutions) not in (1, 2):
        raise ValueError(f"bucketing supports 1 or 2 resolutions, got {len(resolutions)}")
    if len(resolutions) == 1:
        return [None]
    return [math.floor(resolutions[0].rank_cutoff) + 1, None]


def resolution_counts(
    target: torch.Tensor, num_atoms: int, caps: Sequence[int | None]
) -> list[int]:
    """Edges per resolution (E_r,) of a graph with targets target (E,) over num_atoms atoms, from
    the in-degrees alone: resolution 0 takes min(degree, caps[0]) of every target."""
    if caps[0] is None:
        return [int(target.numel())]
    degree = torch.bincount(target, minlength=num_atoms)
    first = int(degree.clamp(max=caps[0]).sum())
    return [first, int(target.numel()) - first]


def inert_targets(pads: Sequence[int], caps: Sequence[int | None]) -> int:
    """How many inert targets the padded edges pads (per resolution) need."""
    if caps[0] is None:
        return 1 if pads[0] > 0 else 0
    cap0, d0, d1 = caps[0], pads[0], pads[1]
    hub = 1 if d1 > 0 else 0
    if hub and d0 < cap0:
        raise ValueError(
            f"padding {d1} last-resolution edges needs >= {cap0} padded resolution-0 edges, got {d0}"
        )
    return hub + -(-(d0 - hub * cap0) // cap0)


def inert_atoms_needed(pads: Sequence[int], caps: Sequence[int | None]) -> int:
    """Inert atoms for the padded edges pads: the targets, and at least two (an edge's source and
    target differ); two when nothing is padded, so the inert structure always exists and the
    number of structures stays put too."""
    return max(2, inert_targets(pads, caps))


def plan_capacity(
    num_atoms: int, counts: Sequence[int], caps: Sequence[int | None], policy: BucketPolicy
) -> Capacity:
    """A capacity for num_atoms atoms and counts (E_r,) edges per resolution, with the policy's
    headroom, the resolution-0 reserve the hub needs, and inert atoms for the padding that the
    headroom may turn into."""
    reserve = [0] * len(counts)
    if len(counts) == 2:
        reserve[0] = caps[0]
    edges = tuple(
        round_up(e + r + math.ceil(policy.headroom * e), policy.per_octave, policy.min_edge_step)
        for e, r in zip(counts, reserve, strict=True)
    )
    pads = [cap - e for cap, e in zip(edges, counts, strict=True)]
    inert = inert_atoms_needed(pads, caps)
    if caps[0] is not None:  # resolution-0 edges may shrink by the headroom before a replan
        inert += math.ceil(policy.headroom * counts[0] / caps[0]) + 1
    atoms = round_up(num_atoms + inert, policy.per_octave, policy.min_atom_step)
    return Capacity(atoms, edges)


def fits(
    capacity: Capacity, num_atoms: int, counts: Sequence[int], caps: Sequence[int | None]
) -> bool:
    """Whether the real sizes fit the capacity (edges, the hub's reserve and the inert atoms)."""
    pads = [cap - e for cap, e in zip(capacity.edges, counts, strict=True)]
    if any(p < 0 for p in pads):
        return False
    if len(pads) == 2 and pads[1] > 0 and pads[0] < caps[0]:
        return False
    return num_atoms + inert_atoms_needed(pads, caps) <= capacity.atoms


@dataclass
class Bucketer:
    """Chooses and keeps capacities along a trajectory (sticky buckets): the current capacity is
    kept while the system fits it and has not shrunk below ``policy.shrink`` of what it was planned
    for; otherwise a new one is planned. ``shapes`` counts the (atoms, edges) shapes handed out."""

    caps: list[int | None]
    policy: BucketPolicy = field(default_factory=BucketPolicy)
    capacity: Capacity | None = None
    planned_for: tuple[int, int] | None = None
    shapes: dict[tuple[int, int], int] = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: Any, policy: BucketPolicy | None = None) -> Bucketer:
        return cls(rank_caps(model), policy if policy is not None else BucketPolicy())

    def choose(self, num_atoms: int, counts: Sequence[int]) -> Capacity:
        """The capacity for a system of num_atoms atoms and counts (E_r,) edges per resolution."""
        total = sum(counts)
        keep = (
            self.capacity is not None
            and self.planned_for is not None
            and fits(self.capacity, num_atoms, counts, self.caps)
            and num_atoms >= self.policy.shrink * self.planned_for[0]
            and total >= self.policy.shrink * self.planned_for[1]
        )
        if not keep:
            self.capacity = plan_capacity(num_atoms, counts, self.caps, self.policy)
            self.planned_for = (num_atoms, total)
        assert self.capacity is not None
        shape = self.capacity.shape
        self.shapes[shape] = self.shapes.get(shape, 0) + 1
        return self.capacity


@dataclass(frozen=True)
class Padded:
    """A padded structure and graph, and how to cut the outputs back: the first num_structures
    energies and num_atoms force rows are the real ones."""

    structure: Structure
    graph: Any
    num_atoms: int
    num_structures: int
    capacity: Capacity

    def unpad(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's outputs for the real structures and atoms only."""
        res = dict(out)
        res["energy"] = out["energy"][: self.num_structures]
        if "forces" in out:
            res["forces"] = out["forces"][: self.num_atoms]
        return res


def _inert_edges(
    pads: Sequence[int], caps: Sequence[int | None], first: int, count: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, target) (P,) of the padded edges, grouped by target (ascending), over the inert
    atoms first .. first + count - 1: the hub (inert atom 0) takes caps[0] resolution-0 edges and
    every last-resolution edge, the next inert atoms up to caps[0] resolution-0 edges each; each
    edge's source is the inert atom after its target (cyclically)."""
    per_target: list[int] = []
    if caps[0] is None:
        if pads[0] > 0:
            per_target.append(pads[0])
    else:
        d0, d1 = pads
        if d1 > 0:
            per_target.append(caps[0] + d1)
            d0 -= caps[0]
        while d0 > 0:
            per_target.append(min(caps[0], d0))
            d0 -= caps[0]
    local = torch.arange(len(per_target), device=device)
    target = torch.repeat_interleave(
        local, torch.tensor(per_target, device=device, dtype=torch.long)
    )
    source = (target + 1) % count
    return source + first, target + first


def pad_graph(
    st: Structure, graph: Any, capacity: Capacity, caps: Sequence[int | None], cutoff: float
) -> Padded:
    """Pad a validated structure st (N atoms, B structures) and its graph (the model's GraphData,
    grouped by target) to capacity: one inert structure of capacity.atoms - N atoms appended, and
    padded edges between inert atoms (module docstring). ValueError when the system does not fit."""
    n, b = st.pos.shape[0], st.natoms.shape[0]
    target = graph.edge_index[1]
    counts = resolution_counts(target, n, caps)
    if not fits(capacity, n, counts, caps):
        raise ValueError(
            f"{n} atoms with {counts} edges per resolution do not fit capacity {capacity}"
        )
    pads = [cap - e for cap, e in zip(capacity.edges, counts, strict=True)]
    d = capacity.atoms - n
    dev, dtype = st.pos.device, st.pos.dtype
    spacing = float(cutoff) + 1.0
    inert_pos = torch.zeros((d, 3), dtype=dtype, device=dev)
    inert_pos[:, 0] = torch.arange(d, dtype=dtype, device=dev) * spacing
    structure = Structure(
        pos=torch.cat([st.pos, inert_pos]),
        cell=torch.cat([st.cell, st.cell.new_zeros((1, 3, 3))]),
        atomic_numbers=torch.cat(
            [st.atomic_numbers, st.atomic_numbers.new_full((d,), INERT_ATOMIC_NUMBER)]
        ),
        natoms=torch.cat([st.natoms, st.natoms.new_full((1,), d)]),
        batch=torch.cat([st.batch, st.batch.new_full((d,), b)]),
        pbc=torch.cat([st.pbc, st.pbc.new_zeros((1, 3))]),
    )
    source, tgt = _inert_edges(pads, caps, n, d, dev)
    vec = structure.pos[source] - structure.pos[tgt]
    p = source.numel()
    zeros = vec.new_zeros((p, 3))
    padded_graph = type(graph)(
        edge_index=torch.cat([graph.edge_index, torch.stack([source, tgt])], dim=1),
        edge_distance=torch.cat([graph.edge_distance, vec.norm(dim=-1)]),
        edge_distance_vec=torch.cat([graph.edge_distance_vec, vec]),
        cell_offsets=torch.cat([graph.cell_offsets, zeros.to(graph.cell_offsets.dtype)]),
        offset_distances=torch.cat(
            [graph.offset_distances, zeros.to(graph.offset_distances.dtype)]
        ),
        neighbors=torch.cat([graph.neighbors, graph.neighbors.new_full((1,), p)]),
    )
    return Padded(structure, padded_graph, n, b, capacity)


def bucketed_forward(
    model: Any, st: Structure, graph: Any, bucketer: Bucketer
) -> tuple[dict[str, torch.Tensor], Capacity]:
    """``model.forward_graph`` on st and graph padded to the bucketer's capacity; the outputs of the
    real structures and atoms, and the capacity used."""
    n = st.pos.shape[0]
    counts = resolution_counts(graph.edge_index[1], n, bucketer.caps)
    capacity = bucketer.choose(n, counts)
    padded = pad_graph(st, graph, capacity, bucketer.caps, model.cutoff)
    return padded.unpad(model.forward_graph(padded.structure, padded.graph)), capacity
