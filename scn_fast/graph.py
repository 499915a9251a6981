"""Periodic radius graphs with per-system, per-dimension periodic boundary conditions.

Conventions (the same as upstream SCN / OCP):

* ``edge_index[0]`` is the source atom ``j``, ``edge_index[1]`` the target atom ``i``.
* ``cell_offsets[e] = n`` is an integer lattice translation: the source image sits at
  ``pos[j] + n @ cell[b]`` and ``edge_vectors`` returns ``pos[j] - pos[i] + n @ cell[b]``.
* Edges are ordered by target ``i``, then source ``j``, then offset ``(n0, n1, n2)``
  lexicographically (this is the order upstream's ``radius_graph_pbc`` produces).

Before truncation the edge set of every system equals ASE's
``neighbor_list('ijS', atoms, cutoff)``: all periodic images strictly closer than the cutoff,
including images of an atom itself, excluding the zero-offset self pair. Selection is done in
float64 whatever the input dtype.

Algorithm (memory O(N * neighbours)):

0. Strongly skewed cells are first lattice-reduced (an integer unimodular change of basis of
   the periodic vectors, undone on the offsets at the end) so the image count stays small.
1. Each system gets a *frame*: its lattice vectors along periodic dimensions, completed by
   orthonormal vectors along non-periodic ones. Fractional coordinates in that frame are
   wrapped into [0, 1) along periodic dimensions (the integer shift is remembered).
2. Ghost atoms: every atom is replicated over the periodic images ``m`` with
   ``|m_d| <= ceil(cutoff * |reciprocal vector d|)`` (as upstream), and only ghosts that lie in
   a cutoff-wide margin around the system's atoms are kept.
3. Ghosts are sorted into bins of fractional width >= ``cutoff * |reciprocal vector|`` per
   dimension, so a pair within the cutoff is in the same or an adjacent bin. Each target scans
   its 27 neighbouring bins; candidate pairs are expanded in bounded chunks of targets.
4. The squared distance of every surviving pair is recomputed in float64 with one canonical
   formula (see ``_pair_distance_sq``) and the exact test ``d2 < cutoff**2`` is applied (ASE's
   strict ``d < cutoff``; upstream uses ``<=``, which differs only for exact equality).
5. Edges are sorted into the output order and truncated per target: the nearest ones, exact
   ties broken by geometry, never by indices (``scn_fast.neighbours``, docs/neighbours.md).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .neighbours import geometric_rank

__all__ = [
    "RadiusGraph",
    "check_edge_geometry",
    "check_precomputed_graph",
    "edge_vectors",
    "image_shifts",
    "radius_graph_pbc",
    "validate_structure",
]

#: Atoms of one system closer than this (Angstrom), also via a periodic image, are rejected.
MIN_ATOM_DISTANCE = 1e-4
#: Periodic lattice vectors shorter than this (Angstrom) are rejected.
MIN_LATTICE_VECTOR = 1e-4
#: Relative tolerance for singular periodic cells (|det| or |a x b| over the product of norms).
SINGULAR_TOLERANCE = 1e-8
#: Upstream's degeneracy tolerance of the non-strict truncation, in squared Angstrom.
DEGENERACY_TOLERANCE = 0.01
#: Relative slack on the cutoff for precomputed edges (graphs built in float32 may exceed it
#: by round-off).
PRECOMPUTED_CUTOFF_SLACK = 1e-5

_REL_PAD = 1e-9  # relative safety margin on fractional cutoffs (covers float64 round-off)
_ABS_PAD = 1e-9  # absolute safety margin on fractional cutoffs
_APPROX_PAD = 1e-6  # Angstrom; margin of the approximate candidate test (exact test follows)
_MAX_BINS_PER_DIM = 1024  # caps the bin grid of very extended systems (bins then grow)
_CHUNK_PAIRS = 1 << 20  # candidate pairs expanded at once (bounds transient memory)
_OVERLAP_BIN_LENGTH = 1.0  # Angstrom; bin length used by the coincident-atom search
_MAX_DEFECT = 2.0  # cells with prod|a_d| / volume above this are lattice-reduced first
_MAX_REDUCTION_STEPS = 200


@dataclass
class RadiusGraph:
    """A radius graph over a batch of systems.

    Attributes:
        edge_index: (2, E) int64; row 0 = source atom j, row 1 = target atom i (global indices).
        cell_offsets: (E, 3) int64 integer image offsets n; the source image sits at
            ``pos[j] + n @ cell[batch[j]]``.
        neighbors: (B,) int64, number of edges per system.
    """

    edge_index: torch.Tensor
    cell_offsets: torch.Tensor
    neighbors: torch.Tensor


@dataclass
class _Batch:
    """Normalised float64 view of a batch used by the pair search (all on one device).

    pos (N, 3), cell (B, 3, 3), pbc (B, 3) bool, natoms (B,) int64, batch (N,) int64.
    """

    pos: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor
    natoms: torch.Tensor
    batch: torch.Tensor

    @property
    def num_systems(self) -> int:
        """Number of systems B."""
        return int(self.natoms.numel())


# ----------------------------------------------------------------------------- public API


def radius_graph_pbc(
    pos: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    natoms: torch.Tensor,
    cutoff: float,
    max_num_neighbors: int,
    enforce_max_neighbors_strictly: bool = True,
    *,
    validate: bool = True,
) -> RadiusGraph:
    """Build the periodic radius graph of a batch of systems.

    Args:
        pos: (N, 3) float32/float64 Cartesian positions; the atoms of system b are contiguous,
            in the order given by ``natoms``.
        cell: (B, 3, 3) lattice vectors as rows (may be all zeros for non-periodic systems).
        pbc: (B, 3) bool periodicity per system and dimension, or (3,) shared by all systems.
        natoms: (B,) int number of atoms per system.
        cutoff: radius in Angstrom; pairs with distance < cutoff are connected (as ASE).
        max_num_neighbors: keep at most this many incoming edges per target (the nearest ones);
            <= 0 disables truncation.
        enforce_max_neighbors_strictly: True: exactly the ``max_num_neighbors`` nearest sources,
            ties (distances within ``neighbours.TIE_TOLERANCE``) broken by the edge vector's
            x, then y, then z component (``scn_fast.neighbours``; docs/neighbours.md), so that
            translated, wrapped, permuted and repeated copies of a crystal keep the same
            neighbours. False: upstream's
            degenerate mode, keeping every candidate with squared distance <= the squared
            distance of the (max_num_neighbors + 1)-th nearest + ``DEGENERACY_TOLERANCE``.
        validate: run ``validate_structure`` first; False only for callers that just did.

    Returns:
        RadiusGraph with edges sorted by (target, source, offset n0, n1, n2).

    Raises:
        ValueError: on invalid input (see ``validate_structure``) or a non-positive cutoff.
    """
    if not (float(cutoff) > 0.0 and math.isfinite(float(cutoff))):
        raise ValueError(f"cutoff must be a positive finite number, got {cutoff}")
    if validate:
        validate_structure(pos, cell, pbc, natoms)
    data = _normalise(pos, cell, pbc, natoms)
    cutoff = float(cutoff)

    tgt, src, off = _candidate_pairs(data, cutoff, bin_length=cutoff)
    d2 = _pair_distance_sq(data.pos, data.cell, data.batch, tgt, src, off)
    within = torch.nonzero(d2 < cutoff * cutoff).squeeze(1)  # ASE's d < cutoff, in float64
    tgt, src, off, d2 = tgt[within], src[within], off[within], d2[within]

    order = _lexsort([tgt, src, off[:, 0], off[:, 1], off[:, 2]])
    tgt, src, off, d2 = tgt[order], src[order], off[order], d2[order]

    keep = _neighbor_mask(
        tgt,
        d2,
        int(pos.shape[0]),
        int(max_num_neighbors),
        enforce_max_neighbors_strictly,
        lambda: _pair_vectors(data.pos, data.cell, data.batch, tgt, src, off),
    )
    tgt, src, off = tgt[keep], src[keep], off[keep]

    neighbors = torch.bincount(data.batch[tgt], minlength=data.num_systems)
    return RadiusGraph(torch.stack([src, tgt]), off, neighbors)


def edge_vectors(
    pos: torch.Tensor,
    cell: torch.Tensor,
    batch: torch.Tensor,
    edge_index: torch.Tensor,
    cell_offsets: torch.Tensor,
) -> torch.Tensor:
    """Edge vectors ``pos[j] - pos[i] + n @ cell[batch[i]]`` in ``pos.dtype``, as upstream.

    Args:
        pos: (N, 3) positions.
        cell: (B, 3, 3) lattice vectors as rows.
        batch: (N,) int system index of every atom.
        edge_index: (2, E) [source j; target i].
        cell_offsets: (E, 3) integer image offsets n (any numeric dtype).

    Returns:
        (E, 3) tensor in ``pos.dtype``; differentiable with respect to ``pos`` and ``cell``.
    """
    src, tgt = edge_index[0], edge_index[1]
    return pos[src] - pos[tgt] + image_shifts(cell, batch, edge_index, cell_offsets, pos.dtype)


def image_shifts(
    cell: torch.Tensor,
    batch: torch.Tensor,
    edge_index: torch.Tensor,
    cell_offsets: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(E, 3) Cartesian image shifts n @ cell[batch[i]] of the edges' sources, in ``dtype``."""
    edge_cell = cell[batch[edge_index[1]]].to(dtype)
    return torch.bmm(cell_offsets.to(dtype).view(-1, 1, 3), edge_cell).view(-1, 3)


def validate_structure(
    pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, natoms: torch.Tensor
) -> None:
    """Raise ValueError naming the problem if the batch is not a valid input.

    Checks shapes and dtypes; finite ``pos`` and ``cell``; ``natoms`` non-negative and summing
    to ``len(pos)``; ``cell``/``pbc`` batch sizes equal to ``len(natoms)``; periodic lattice
    vectors that are long enough and independent (for a slab with pbc (T, T, F) only the two
    periodic vectors are checked); no two atoms of a system (also via a periodic image) closer
    than ``MIN_ATOM_DISTANCE``.

    Args:
        pos: (N, 3) positions. cell: (B, 3, 3). pbc: (B, 3) or (3,) bool. natoms: (B,) int.
    """
    _check_shapes(pos, cell, pbc, natoms)
    if not bool(torch.isfinite(pos).all()):
        bad = torch.nonzero(~torch.isfinite(pos).all(dim=1))[0, 0].item()
        raise ValueError(f"pos contains NaN or inf (first at atom {bad})")
    if not bool(torch.isfinite(cell).all()):
        bad = torch.nonzero(~torch.isfinite(cell).flatten(1).all(dim=1))[0, 0].item()
        raise ValueError(f"cell contains NaN or inf (system {bad})")
    data = _normalise(pos, cell, pbc, natoms)
    _check_lattice(data.cell, data.pbc)
    _check_overlaps(data)


def check_precomputed_graph(
    edge_index: torch.Tensor,
    cell_offsets: torch.Tensor,
    natoms: torch.Tensor,
    max_num_neighbors: int,
    *,
    structure: Any = None,
    cutoff: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate a user-supplied graph and sort it by target.

    Args:
        edge_index: (2, E) integer [source j; target i].
        cell_offsets: (E, 3) image offsets (dtype kept).
        natoms: (B,) int atoms per system.
        max_num_neighbors: maximum incoming edges per target (<= 0: no limit).
        structure: optional object with ``pos`` (N, 3), ``cell`` (B, 3, 3) and ``pbc`` (B, 3) (a
            validated ``data.Structure``): also check the geometry of every edge
            (``check_edge_geometry``).
        cutoff: the model's cutoff, for the geometry check (None: no length limit).

    Returns:
        (edge_index, cell_offsets, perm): the edges ordered by target ascending (a stable sort,
        so edges of one target keep their relative order) and the (E,) int64 permutation applied
        (the identity when the targets were already non-decreasing).

    Raises:
        ValueError: bad shapes or dtypes, indices out of range, an edge between two systems, a
            target with more than ``max_num_neighbors`` incoming edges, or (with ``structure``)
            any problem ``check_edge_geometry`` names.
    """
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}")
    if edge_index.is_floating_point() or edge_index.is_complex() or edge_index.dtype == torch.bool:
        raise ValueError(f"edge_index must be an integer tensor, got {edge_index.dtype}")
    num_edges = edge_index.shape[1]
    if tuple(cell_offsets.shape) != (num_edges, 3):
        raise ValueError(
            f"cell_offsets must have shape (E, 3) = ({num_edges}, 3), got "
            f"{tuple(cell_offsets.shape)}"
        )
    natoms = torch.as_tensor(natoms, device=edge_index.device).reshape(-1).long()
    if bool((natoms < 0).any()):
        raise ValueError(f"natoms has negative entries: {natoms.tolist()}")
    num_atoms = int(natoms.sum())
    edge_index = edge_index.long()
    if num_edges and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_atoms):
        raise ValueError(
            f"edge_index values must lie in [0, {num_atoms}), got range "
            f"[{int(edge_index.min())}, {int(edge_index.max())}]"
        )
    batch = torch.repeat_interleave(torch.arange(len(natoms), device=natoms.device), natoms)
    src, tgt = edge_index[0], edge_index[1]
    crossing = batch[src] != batch[tgt]
    if bool(crossing.any()):
        e = int(torch.nonzero(crossing)[0, 0])
        raise ValueError(
            f"edge {e} connects atom {int(src[e])} (system {int(batch[src[e]])}) to atom "
            f"{int(tgt[e])} (system {int(batch[tgt[e]])}): edges must not cross systems"
        )
    if structure is not None:
        check_edge_geometry(
            edge_index, cell_offsets, structure.pos, structure.cell, structure.pbc, batch, cutoff
        )
    if num_edges > 1 and bool((tgt[1:] < tgt[:-1]).any()):
        perm = torch.sort(tgt, stable=True).indices
    else:
        perm = torch.arange(num_edges, device=edge_index.device)
    if max_num_neighbors > 0 and num_edges:
        counts = torch.bincount(tgt, minlength=num_atoms)
        over = counts > max_num_neighbors
        if bool(over.any()):
            atom = int(torch.nonzero(over)[0, 0])
            raise ValueError(
                f"atom {atom} (system {int(batch[atom])}) has {int(counts[atom])} incoming edges, "
                f"more than max_num_neighbors={max_num_neighbors}"
            )
    return edge_index[:, perm], cell_offsets[perm], perm


def check_edge_geometry(
    edge_index: torch.Tensor,
    cell_offsets: torch.Tensor,
    pos: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    batch: torch.Tensor,
    cutoff: float | None = None,
) -> None:
    """Raise ValueError naming the first bad edge of a precomputed graph.

    Rejects: non-integer or non-finite ``cell_offsets``; a non-zero offset along a non-periodic
    dimension of the edge's system; the same (source, target, offset) twice; an edge shorter
    than ``MIN_ATOM_DISTANCE`` (a zero-length edge has no direction: its frame, and with it
    energy, forces and every gradient, would be NaN); an edge longer than ``cutoff`` (relative
    slack ``PRECOMPUTED_CUTOFF_SLACK`` for graphs built in float32). Lengths are computed in
    float64 as ``|pos[j] - pos[i] + n @ cell[b]|``.

    Args:
        edge_index: (2, E) int64 [source j; target i], indices already range-checked.
        cell_offsets: (E, 3) offsets n, any numeric dtype. pos: (N, 3). cell: (B, 3, 3).
        pbc: (B, 3) or (3,) bool. batch: (N,) int64 system of each atom.
        cutoff: the model's cutoff in Angstrom, or None for no length limit.
    """
    if edge_index.shape[1] == 0:
        return
    off = cell_offsets
    if off.is_floating_point() or off.is_complex():
        off = off.real if off.is_complex() else off
        bad = ~torch.isfinite(off).all(dim=1) | (off != torch.round(off)).any(dim=1)
        if bool(bad.any()):
            e = int(torch.nonzero(bad)[0, 0])
            raise ValueError(
                f"cell_offsets must be whole lattice translations: edge {e} has offset "
                f"{off[e].tolist()}"
            )
    off = off.round().long() if off.is_floating_point() else off.long()
    src, tgt = edge_index[0], edge_index[1]
    system = batch[tgt]
    pbc = torch.as_tensor(pbc, device=off.device).bool()
    periodic = pbc.expand(int(system.max()) + 1, 3)[system] if pbc.dim() == 1 else pbc[system]
    along = (off != 0) & ~periodic
    if bool(along.any()):
        e, d = (int(v) for v in torch.nonzero(along)[0])
        raise ValueError(
            f"edge {e} has cell offset {off[e].tolist()}, non-zero along dimension {d}, which is "
            f"not periodic in system {int(system[e])}"
        )
    key = torch.cat([edge_index.t(), off], dim=1)
    unique, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    if unique.shape[0] < key.shape[0]:
        dup = torch.nonzero(counts[inverse] > 1).flatten()[:2].tolist()
        raise ValueError(
            f"edges {dup[0]} and {dup[1]} are the same edge (source {int(src[dup[0]])}, target "
            f"{int(tgt[dup[0]])}, offset {off[dup[0]].tolist()}): duplicate edges are not allowed"
        )
    vec = edge_vectors(pos.detach().double(), cell.detach().double(), batch, edge_index, off)
    length = vec.norm(dim=1)
    short = length < MIN_ATOM_DISTANCE
    if bool(short.any()):
        e = int(torch.nonzero(short)[0, 0])
        raise ValueError(
            f"edge {e} (source {int(src[e])}, target {int(tgt[e])}, offset {off[e].tolist()}) has "
            f"length {float(length[e]):.3g} Angstrom, below {MIN_ATOM_DISTANCE}: a zero-length "
            f"edge has no direction (its frame would be NaN)"
        )
    if cutoff is not None:
        far = length > float(cutoff) * (1.0 + PRECOMPUTED_CUTOFF_SLACK)
        if bool(far.any()):
            e = int(torch.nonzero(far)[0, 0])
            raise ValueError(
                f"edge {e} (source {int(src[e])}, target {int(tgt[e])}, offset "
                f"{off[e].tolist()}) has length {float(length[e]):.6g} Angstrom, beyond the "
                f"cutoff {float(cutoff)}"
            )


# ----------------------------------------------------------------------------- validation


def _check_shapes(
    pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, natoms: torch.Tensor
) -> None:
    """Shapes, dtypes and the natoms bookkeeping (ValueError naming the problem)."""
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[1] != 3:
        raise ValueError(f"pos must be a tensor of shape (N, 3), got {_shape(pos)}")
    if not pos.is_floating_point():
        raise ValueError(f"pos must be floating point, got {pos.dtype}")
    natoms = torch.as_tensor(natoms)
    if natoms.dim() != 1 or natoms.is_floating_point() or natoms.dtype == torch.bool:
        raise ValueError(
            f"natoms must be a 1-D integer tensor, got {_shape(natoms)} {natoms.dtype}"
        )
    if bool((natoms < 0).any()):
        raise ValueError(f"natoms has negative entries: {natoms.tolist()}")
    if int(natoms.sum()) != pos.shape[0]:
        raise ValueError(f"natoms sums to {int(natoms.sum())} but pos holds {pos.shape[0]} atoms")
    num_systems = natoms.shape[0]
    cell = torch.as_tensor(cell)
    if cell.dim() != 3 or tuple(cell.shape[1:]) != (3, 3):
        raise ValueError(f"cell must have shape (B, 3, 3), got {_shape(cell)}")
    if cell.shape[0] != num_systems:
        raise ValueError(f"cell holds {cell.shape[0]} systems but natoms holds {num_systems}")
    if not cell.is_floating_point():
        raise ValueError(f"cell must be floating point, got {cell.dtype}")
    pbc = torch.as_tensor(pbc)
    if pbc.shape != (3,) and (pbc.dim() != 2 or pbc.shape[1] != 3):
        raise ValueError(f"pbc must have shape (B, 3) or (3,), got {_shape(pbc)}")
    if pbc.dim() == 2 and pbc.shape[0] != num_systems:
        raise ValueError(f"pbc holds {pbc.shape[0]} systems but natoms holds {num_systems}")


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_lattice(cell: torch.Tensor, pbc: torch.Tensor) -> None:
    """Periodic lattice vectors must be long enough and linearly independent.

    cell: (B, 3, 3) float64; pbc: (B, 3) bool.
    """
    norms = cell.norm(dim=2)  # (B, 3)
    short = pbc & (norms < MIN_LATTICE_VECTOR)
    if bool(short.any()):
        b, d = (int(v) for v in torch.nonzero(short)[0])
        raise ValueError(
            f"system {b}: periodic lattice vector {d} has length {float(norms[b, d]):.3g} "
            f"< {MIN_LATTICE_VECTOR} Angstrom (singular cell; atoms would coincide with their "
            f"own periodic images)"
        )
    measure, scale = _periodic_volume(cell, pbc)
    singular = (pbc.sum(dim=1) >= 2) & (measure < SINGULAR_TOLERANCE * scale)
    if bool(singular.any()):
        b = int(torch.nonzero(singular)[0, 0])
        dims = torch.nonzero(pbc[b]).flatten().tolist()
        what = "|det(cell)|" if len(dims) == 3 else f"|a{dims[0]} x a{dims[1]}|"
        raise ValueError(
            f"system {b}: singular cell along periodic dimensions {dims}: {what} = "
            f"{float(measure[b]):.3g} is below {SINGULAR_TOLERANCE} times the product of the "
            f"lattice vector lengths ({float(scale[b]):.3g})"
        )


def _periodic_volume(cell: torch.Tensor, pbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Volume spanned by the periodic lattice vectors and the product of their lengths, (B,)
    each: |det(cell)| with three periodic vectors, |a x b| of the periodic pair with two
    (meaningless with fewer)."""
    norms = cell.norm(dim=2)
    scale = torch.where(pbc, norms, torch.ones_like(norms)).prod(dim=1)
    missing = torch.argmin(pbc.long(), dim=1)  # the non-periodic dimension when there are two
    rows = torch.arange(cell.shape[0], device=cell.device)
    area = torch.linalg.cross(cell[rows, (missing + 1) % 3], cell[rows, (missing + 2) % 3])
    measure = torch.where(pbc.all(dim=1), torch.linalg.det(cell).abs(), area.norm(dim=1))
    return measure, scale


def _check_overlaps(data: _Batch) -> None:
    """No two atoms of one system (also via a periodic image) closer than MIN_ATOM_DISTANCE."""
    tgt, src, off = _candidate_pairs(data, MIN_ATOM_DISTANCE, bin_length=_OVERLAP_BIN_LENGTH)
    d2 = _pair_distance_sq(data.pos, data.cell, data.batch, tgt, src, off)
    close = d2 < MIN_ATOM_DISTANCE**2
    if not bool(close.any()):
        return
    e = int(torch.nonzero(close)[0, 0])
    i, j = int(tgt[e]), int(src[e])
    b = int(data.batch[i])
    first = int(data.natoms[:b].sum())
    image = "" if not bool(off[e].any()) else f" (periodic image {tuple(off[e].tolist())})"
    raise ValueError(
        f"system {b}: atoms {i - first} and {j - first} (global {i} and {j}) are "
        f"{float(d2[e]) ** 0.5:.3g} Angstrom apart{image}, closer than {MIN_ATOM_DISTANCE}"
    )


def _normalise(
    pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, natoms: torch.Tensor
) -> _Batch:
    """float64 copies on pos.device, pbc broadcast to (B, 3), natoms int64, batch (N,)."""
    device = pos.device
    natoms = torch.as_tensor(natoms, device=device).reshape(-1).long()
    num_systems = natoms.shape[0]
    pbc = torch.as_tensor(pbc, device=device).bool()
    pbc = pbc.expand(num_systems, 3) if pbc.dim() == 1 else pbc
    batch = torch.repeat_interleave(torch.arange(num_systems, device=device), natoms)
    return _Batch(
        pos=pos.detach().to(torch.float64),
        cell=torch.as_tensor(cell).detach().to(device=device, dtype=torch.float64),
        pbc=pbc.contiguous(),
        natoms=natoms,
        batch=batch,
    )


# ----------------------------------------------------------------------------- pair search


def _pair_distance_sq(
    pos: torch.Tensor,
    cell: torch.Tensor,
    batch: torch.Tensor,
    tgt: torch.Tensor,
    src: torch.Tensor,
    off: torch.Tensor,
) -> torch.Tensor:
    """Canonical float64 squared distance of pairs (the one value selection and ranking use).

    shift = (n0 * a0 + n1 * a1) + n2 * a2, d = (pos[j] - pos[i]) + shift and
    d2 = ((0 + d_x^2) + d_y^2) + d_z^2, per component, each a separate IEEE float64 operation
    in exactly this order (the tests' reference computes the same expression).

    pos (N, 3) and cell (B, 3, 3) float64; tgt, src (P,) int64; off (P, 3) int64 -> (P,).
    """
    d2 = torch.zeros(tgt.shape[0], dtype=torch.float64, device=pos.device)
    for d in _pair_components(pos, cell, batch, tgt, src, off):
        d2 = d2 + d * d
    return d2


def _pair_vectors(
    pos: torch.Tensor,
    cell: torch.Tensor,
    batch: torch.Tensor,
    tgt: torch.Tensor,
    src: torch.Tensor,
    off: torch.Tensor,
) -> torch.Tensor:
    """(P, 3) float64 pair vectors d of ``_pair_distance_sq`` (the same operations)."""
    return torch.stack(list(_pair_components(pos, cell, batch, tgt, src, off)), dim=1)


def _pair_components(
    pos: torch.Tensor,
    cell: torch.Tensor,
    batch: torch.Tensor,
    tgt: torch.Tensor,
    src: torch.Tensor,
    off: torch.Tensor,
) -> Iterator[torch.Tensor]:
    """The x, y and z components (P,) of the canonical pair vectors, one at a time."""
    system = batch.index_select(0, tgt)
    n = off.to(torch.float64)
    n0, n1, n2 = n[:, 0], n[:, 1], n[:, 2]
    for x in range(3):
        a0, a1, a2 = (cell[:, r, x].index_select(0, system) for r in range(3))
        shift = n0 * a0 + n1 * a1
        shift = shift + n2 * a2
        yield (pos[:, x].index_select(0, src) - pos[:, x].index_select(0, tgt)) + shift


def _system_frames(cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
    """Per-system basis (B, 3, 3), rows = lattice vectors along periodic dimensions, completed
    by orthonormal vectors spanning the complement along non-periodic ones.

    cell: (B, 3, 3) float64, pbc: (B, 3) bool (periodic vectors assumed validated).
    """
    num_systems = cell.shape[0]
    rows = torch.arange(3, device=cell.device)
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand(num_systems, 3, 3)
    count = pbc.sum(dim=1)

    # Two periodic vectors: the missing row is the unit normal of the periodic plane.
    missing = torch.argmin(pbc.long(), dim=1)  # (B,)
    a = _row(cell, (missing + 1) % 3)
    b = _row(cell, (missing + 2) % 3)
    normal = _unit(torch.linalg.cross(a, b))
    two = torch.where((rows[None, :] == missing[:, None])[:, :, None], normal[:, None, :], cell)

    # One periodic vector: two orthonormal vectors perpendicular to it fill the other rows.
    present = torch.argmax(pbc.long(), dim=1)  # (B,)
    axis = _unit(_row(cell, present))
    least = torch.argmin(axis.abs(), dim=1)
    u = _unit(torch.linalg.cross(axis, _row(eye, least)))
    v = torch.linalg.cross(axis, u)
    one = torch.where((rows[None, :] == ((present + 1) % 3)[:, None])[:, :, None], u[:, None], cell)
    one = torch.where((rows[None, :] == ((present + 2) % 3)[:, None])[:, :, None], v[:, None], one)

    frame = torch.where((count == 3)[:, None, None], cell, eye)
    frame = torch.where((count == 2)[:, None, None], two, frame)
    return torch.where((count == 1)[:, None, None], one, frame)


def _row(mat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """mat (B, 3, 3), index (B,) -> (B, 3) rows mat[b, index[b]]."""
    return mat[torch.arange(mat.shape[0], device=mat.device), index]


def _unit(vec: torch.Tensor) -> torch.Tensor:
    """Normalise (B, 3) rows; zero rows stay zero (they only occur in unused branches)."""
    return vec / vec.norm(dim=1, keepdim=True).clamp_min(1e-300)


@dataclass
class _Grid:
    """Per-system bin grid in fractional coordinates covering the window [lo, hi] (B, 3):
    bin width (B, 3) and bins per dimension nbins (B, 3) int64."""

    lo: torch.Tensor
    hi: torch.Tensor
    width: torch.Tensor
    nbins: torch.Tensor


@dataclass
class _Ghosts:
    """Periodic images of atoms inside their system's grid window, sorted by bin key.

    atom (G,) source atom; image (G, 3) int64 offset relative to the *wrapped* atom; xyz (3, G)
    Cartesian coordinates (contiguous per axis); key (G,) int64 bin key, non-decreasing.
    """

    atom: torch.Tensor
    image: torch.Tensor
    xyz: torch.Tensor
    key: torch.Tensor


def _reduction_transforms(cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor | None:
    """Unimodular integer matrices T (B, 3, 3) int64 such that the periodic rows of T @ cell
    form a reduced (nearly orthogonal) basis of the same lattice; identity on non-periodic rows
    and for systems whose periodic vectors are already reasonably orthogonal (orthogonality
    defect <= ``_MAX_DEFECT``). None when no system needs a reduction.

    Only affects the cost of the search: a skewed cell needs many more images.
    """
    measure, scale = _periodic_volume(cell, pbc)
    need = (pbc.sum(dim=1) >= 2) & (scale > _MAX_DEFECT * measure)
    if not bool(need.any()):
        return None
    transforms = np.tile(np.eye(3, dtype=np.int64), (cell.shape[0], 1, 1))
    for b in torch.nonzero(need).flatten().tolist():
        dims = torch.nonzero(pbc[b]).flatten().tolist()
        vectors = cell[b, dims].cpu().numpy()
        transforms[b][np.ix_(dims, dims)] = _reduce_basis(vectors)
    return torch.from_numpy(transforms).to(cell.device)


def _reduce_basis(vectors: np.ndarray) -> np.ndarray:
    """Integer unimodular T (k, k) with T @ vectors a reduced basis (k = 2 or 3 rows).

    Alternates size reduction (subtract the rounded projection on another vector) with trying
    every combination with coefficients in {-1, 0, 1} as a replacement of a basis vector;
    every accepted step strictly shortens one vector, so it terminates.
    """
    k = len(vectors)
    basis, transform = vectors.astype(np.float64).copy(), np.eye(k, dtype=np.int64)
    combos = np.array(list(itertools.product((-1, 0, 1), repeat=k)), dtype=np.int64)
    for _ in range(_MAX_REDUCTION_STEPS):
        changed = False
        for i, j in itertools.permutations(range(k), 2):
            q = round(float(basis[i] @ basis[j]) / float(basis[j] @ basis[j]))
            if q and np.linalg.norm(basis[i] - q * basis[j]) < np.linalg.norm(basis[i]):
                basis[i] -= q * basis[j]
                transform[i] -= q * transform[j]
                changed = True
        lengths = np.linalg.norm(combos @ basis, axis=1)
        for i in np.argsort(-np.linalg.norm(basis, axis=1)):
            usable = combos[:, i] == 1  # replacing row i keeps T unimodular
            best = int(np.argmin(np.where(usable, lengths, np.inf)))
            if lengths[best] < np.linalg.norm(basis[i]) * (1 - 1e-12):
                basis[i] = combos[best] @ basis
                transform[i] = combos[best] @ transform
                changed = True
                break
        if not changed:
            break
    return transform


def _candidate_pairs(
    data: _Batch, cutoff: float, bin_length: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All (target i, source j, offset n) with an approximate distance <= cutoff + 1e-6 Å,
    excluding the zero-offset self pair. Each pair appears once. Superset of the exact set.

    bin_length >= cutoff is the Cartesian length behind the bin widths.
    Returns tgt (P,), src (P,) int64 and off (P, 3) int64.
    """
    device = data.pos.device
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if data.pos.shape[0] == 0:
        return empty, empty, empty.view(0, 3)
    transforms = _reduction_transforms(data.cell, data.pbc)
    if transforms is not None:  # search in a reduced basis; offsets are mapped back below
        data = replace(data, cell=transforms.to(torch.float64) @ data.cell)
    inv = torch.linalg.inv(_system_frames(data.cell, data.pbc))  # frac = cart @ inv
    recip_norm = inv.norm(dim=1)  # (B, 3): |column d| = |reciprocal vector d|
    reach = cutoff * recip_norm * (1 + _REL_PAD) + _ABS_PAD  # fractional cutoff per dim
    frac, shift = _wrap(data, inv)

    lo, hi = _segment_min_max(frac, data.batch, data.num_systems)
    lo, hi = lo - reach, hi + reach  # every source image that can matter lies in [lo, hi]
    width_req = max(cutoff, bin_length) * recip_norm * (1 + _REL_PAD) + _ABS_PAD
    nbins = torch.floor((hi - lo) / width_req).clamp(1, _MAX_BINS_PER_DIM)
    grid = _Grid(lo=lo, hi=hi, width=(hi - lo) / nbins, nbins=nbins.long())

    reps = torch.where(data.pbc, torch.ceil(reach), torch.zeros_like(reach)).long()
    ghosts = _make_ghosts(data, frac, shift, reps, grid)
    counts, starts = _neighbour_bins(frac, data.batch, grid, ghosts.key)  # (N, 27) each

    tpos = data.pos + torch.einsum("nk,nkl->nl", shift.to(torch.float64), data.cell[data.batch])
    txyz = tpos.T.contiguous()
    limit = (cutoff + _APPROX_PAD) ** 2
    parts = [
        _expand_chunk(counts[a0:a1], starts[a0:a1], a0, ghosts, txyz, limit)
        for a0, a1 in _chunks(counts.sum(dim=1), _CHUNK_PAIRS)
    ]
    if not parts:
        return empty, empty, empty.view(0, 3)
    tgt = torch.cat([p[0] for p in parts])
    ghost = torch.cat([p[1] for p in parts])
    src = ghosts.atom[ghost]
    off = ghosts.image[ghost] + shift[src] - shift[tgt]
    keep = torch.nonzero((src != tgt) | off.any(dim=1)).squeeze(1)
    tgt, src, off = tgt[keep], src[keep], off[keep]
    if transforms is not None:  # n @ (T @ cell) = (n @ T) @ cell
        off = (off[:, :, None] * transforms[data.batch[tgt]]).sum(dim=1)
    return tgt, src, off


def _wrap(data: _Batch, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fractional coordinates (N, 3) wrapped into [0, 1) along periodic dimensions, and the
    integer shifts (N, 3) int64 applied: wrapped atom = pos + shift @ cell."""
    periodic = data.pbc[data.batch]
    frac = torch.einsum("nk,nkl->nl", data.pos, inv[data.batch])
    shift = torch.where(periodic, -torch.floor(frac), torch.zeros_like(frac))
    frac = frac + shift
    over = periodic & (frac >= 1.0)  # round-off can give exactly 1.0
    frac = torch.where(over, frac - 1.0, frac)
    return frac, (shift - over.to(shift.dtype)).long()


def _segment_min_max(
    values: torch.Tensor, segment: torch.Tensor, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment min and max of values (N, 3) -> two (S, 3); empty segments get 0."""
    index = segment[:, None].expand_as(values)
    lo = torch.full((num_segments, 3), float("inf"), dtype=values.dtype, device=values.device)
    hi = torch.full_like(lo, float("-inf"))
    lo = lo.scatter_reduce(0, index, values, reduce="amin")
    hi = hi.scatter_reduce(0, index, values, reduce="amax")
    empty = ~torch.isfinite(lo)
    return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)


def _make_ghosts(
    data: _Batch, frac: torch.Tensor, shift: torch.Tensor, reps: torch.Tensor, grid: _Grid
) -> _Ghosts:
    """Images m (|m_d| <= reps[b, d]) of every wrapped atom that lie inside the grid window of
    its system, sorted by bin.

    frac (N, 3) wrapped fractional coordinates, shift (N, 3) int64 wrapping shifts,
    reps (B, 3) int64 image range per system and dimension.
    """
    atom, image, gsys = _enumerate_images(data.natoms, reps)
    gfrac = frac[atom] + image.to(frac.dtype)
    inside = ((gfrac >= grid.lo[gsys]) & (gfrac <= grid.hi[gsys])).all(dim=1)
    inside = torch.nonzero(inside).squeeze(1)
    atom, image, gfrac, gsys = atom[inside], image[inside], gfrac[inside], gsys[inside]

    key = _linear_key(_bin_coords(gfrac, gsys, grid), gsys, grid.nbins)
    key, order = torch.sort(key, stable=True)
    atom, image, gsys = atom[order], image[order], gsys[order]
    total_shift = (image + shift[atom]).to(torch.float64)
    cart = data.pos[atom] + torch.einsum("gk,gkl->gl", total_shift, data.cell[gsys])
    return _Ghosts(atom=atom, image=image, xyz=cart.T.contiguous(), key=key)


def _enumerate_images(
    natoms: torch.Tensor, reps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (atom, image m) with |m_d| <= reps[b, d] for the atom's system b.

    natoms (B,), reps (B, 3) int64 -> atom (G,), image (G, 3), system (G,) int64, where
    G = sum_b natoms[b] * prod_d (2 reps[b, d] + 1).
    """
    device = natoms.device
    widths = 2 * reps + 1  # (B, 3)
    per_atom = widths.prod(dim=1)  # images per atom, (B,)
    per_system = natoms * per_atom
    total = int(per_system.sum())
    system = torch.repeat_interleave(
        torch.arange(len(natoms), device=device), per_system, output_size=total
    )
    first_atom = torch.cumsum(natoms, 0) - natoms
    local = torch.arange(total, device=device) - (torch.cumsum(per_system, 0) - per_system)[system]
    atom = first_atom[system] + torch.div(local, per_atom[system], rounding_mode="floor")
    code = local % per_atom[system]
    w = widths[system]
    last = code % w[:, 2]
    code = torch.div(code, w[:, 2], rounding_mode="floor")
    image = torch.stack([torch.div(code, w[:, 1], rounding_mode="floor"), code % w[:, 1], last], 1)
    return atom, image - reps[system], system


def _bin_coords(frac: torch.Tensor, system: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """Integer bin coordinates (P, 3) of fractional coordinates (P, 3) of systems (P,)."""
    coord = torch.floor((frac - grid.lo[system]) / grid.width[system]).long()
    return torch.minimum(coord.clamp_min(0), grid.nbins[system] - 1)


def _linear_key(coord: torch.Tensor, system: torch.Tensor, nbins: torch.Tensor) -> torch.Tensor:
    """Linearise bin coordinates (..., 3) of systems (...) into keys unique over the batch."""
    per_system = nbins.prod(dim=1)
    base = torch.cumsum(per_system, 0) - per_system
    nb = nbins[system]
    return base[system] + (coord[..., 0] * nb[..., 1] + coord[..., 1]) * nb[..., 2] + coord[..., 2]


_NEIGHBOUR_OFFSETS = torch.cartesian_prod(*(torch.arange(-1, 2),) * 3)  # (27, 3)


def _neighbour_bins(
    frac: torch.Tensor, batch: torch.Tensor, grid: _Grid, sorted_keys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every atom and each of the 27 bins around it: how many ghosts the bin holds and where
    they start in ``sorted_keys`` (the ghosts' bin keys, sorted). Returns two (N, 27) int64."""
    coord = _bin_coords(frac, batch, grid)
    near = coord[:, None, :] + _NEIGHBOUR_OFFSETS.to(coord.device)[None]  # (N, 27, 3)
    valid = ((near >= 0) & (near < grid.nbins[batch][:, None, :])).all(dim=2)
    key = _linear_key(near, batch[:, None].expand(-1, near.shape[1]), grid.nbins)
    starts = torch.searchsorted(sorted_keys, key)
    stops = torch.searchsorted(sorted_keys, key, right=True)
    counts = torch.where(valid, stops - starts, 0)
    return counts, starts


def _chunks(cost: torch.Tensor, budget: int) -> list[tuple[int, int]]:
    """Split range(len(cost)) into consecutive [a0, a1) with sum(cost[a0:a1]) <= budget where
    possible (a single item may exceed it). Items with zero total cost yield no chunk."""
    total = int(cost.sum())
    if total == 0:
        return []
    cum = torch.cumsum(cost, 0)
    bounds: list[tuple[int, int]] = []
    start, done, n = 0, 0, len(cost)
    while start < n and done < total:
        stop = int(torch.searchsorted(cum, done + budget, right=True))
        stop = min(max(stop, start + 1), n)
        bounds.append((start, stop))
        done = int(cum[stop - 1])
        start = stop
    return bounds


def _expand_chunk(
    counts: torch.Tensor,
    starts: torch.Tensor,
    first_target: int,
    ghosts: _Ghosts,
    txyz: torch.Tensor,
    limit: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate pairs of a block of consecutive targets: every ghost in their neighbouring bins
    whose approximate squared distance is <= limit.

    counts, starts: (T, 27) per target and neighbouring bin; txyz (3, N) wrapped target
    positions. Returns target atoms and ghost indices, both (P,) int64.
    """
    device = counts.device
    flat = counts.reshape(-1)
    seg = torch.nonzero(flat).squeeze(1)
    seg_count = flat[seg]
    seg_start = starts.reshape(-1)[seg]
    seg_target = first_target + torch.div(seg, counts.shape[1], rounding_mode="floor")
    total = int(seg_count.sum())
    seg_first = torch.cumsum(seg_count, 0) - seg_count
    ghost = torch.arange(total, device=device) + torch.repeat_interleave(
        seg_start - seg_first, seg_count, output_size=total
    )
    tgt = torch.repeat_interleave(seg_target, seg_count, output_size=total)
    d2 = torch.zeros(total, dtype=txyz.dtype, device=device)
    for axis in range(3):
        diff = ghosts.xyz[axis].index_select(0, ghost) - txyz[axis].index_select(0, tgt)
        d2 += diff * diff
    keep = torch.nonzero(d2 <= limit).squeeze(1)
    return tgt[keep], ghost[keep]


# ----------------------------------------------------------------------------- ordering


def _lexsort(keys: list[torch.Tensor]) -> torch.Tensor:
    """Permutation sorting by keys[0], then keys[1], ... (all (E,) int64), stable.

    Keys are packed into one int64 where their ranges allow, otherwise sorted one by one from
    the least significant (stable sorts).
    """
    if not keys or keys[0].numel() == 0:
        device = keys[0].device if keys else None
        return torch.zeros(0, dtype=torch.long, device=device)
    packed: torch.Tensor | None = None
    span_total = 1
    groups: list[torch.Tensor] = []
    for key in reversed(keys):
        lo, hi = int(key.min()), int(key.max())
        span = hi - lo + 1
        if packed is not None and span_total * span < (1 << 62):
            packed = packed + (key - lo) * span_total
            span_total *= span
        else:
            if packed is not None:
                groups.append(packed)
            packed, span_total = key - lo, span
    assert packed is not None
    groups.append(packed)  # groups from least to most significant
    perm = torch.arange(keys[0].numel(), device=keys[0].device)
    for key in groups:
        perm = perm[torch.sort(key[perm], stable=True).indices]
    return perm


def _neighbor_mask(
    tgt: torch.Tensor,
    d2: torch.Tensor,
    num_atoms: int,
    max_num_neighbors: int,
    strict: bool,
    vectors: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Which edges survive truncation (E,) bool.

    Strict: per target the ``max_num_neighbors`` first edges in the geometric order of
    ``scn_fast.neighbours`` (distance, ties within ``TIE_TOLERANCE`` broken by the edge vector's
    x, y, z), which ``vectors()`` (E, 3) float64 feeds; without it, ties keep the edge order.
    Non-strict: upstream's threshold on the (max_num_neighbors + 1)-th nearest distance.
    """
    count = torch.bincount(tgt, minlength=num_atoms)
    if max_num_neighbors <= 0 or tgt.numel() == 0 or int(count.max()) <= max_num_neighbors:
        return torch.ones_like(tgt, dtype=torch.bool)
    if strict:
        vec = vectors() if vectors is not None else None
        return geometric_rank(tgt, d2.sqrt(), num_atoms, vec) < max_num_neighbors
    # Non-negative float64 values order like their bit patterns read as int64 (faster sort).
    by_distance = torch.sort(d2.view(torch.int64), stable=True).indices
    order = by_distance[torch.sort(tgt[by_distance], stable=True).indices]
    first = torch.cumsum(count, 0) - count
    rank = torch.empty_like(tgt)
    rank[order] = torch.arange(len(order), device=tgt.device) - first[tgt[order]]
    # Non-strict: threshold at the (max+1)-th nearest squared distance plus the tolerance.
    threshold = torch.full((num_atoms,), float("inf"), dtype=d2.dtype, device=d2.device)
    at_limit = rank == max_num_neighbors
    threshold[tgt[at_limit]] = d2[at_limit] + DEGENERACY_TOLERANCE
    return d2 <= threshold[tgt]
