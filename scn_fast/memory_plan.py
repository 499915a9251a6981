"""Memory as part of the plan: edge chunks, activation checkpointing, and the largest system a
device holds.

The fused message path's intermediates are per edge (rotated operands, the tap projection and
fc1_edge outputs, fc2_edge's output, the combined messages), so one call's memory grows with the
edge count unless the edges run in chunks. A chunk is a range of *targets* whose edges, within one
resolution, fit the budget (docs/large_systems.md):

    E_c(r) = floor(budget / bytes_per_edge(r))

    bytes_per_edge(r) = itemsize * [(n0 + 2 n1) C' + H + 3 T H + T R C' + R C' + K_w]

with n0 / n1 the tap-projection operand rows of degree 0 / the m = +-1 pair (split layout), T taps,
R rows kept per edge frame, H the resolution's hidden width, C' the reduced channels and K_w the
compact Wigner row length (the tensors alive at the peak of one resolution's messages, from a census
at 102 atoms: ~118 KB per near edge and ~58 KB per far edge at scn-t4-b2 in float32), times
:data:`PEAK_FACTOR`, what the process's peak memory grows by per byte of those tensors: the
temporaries the ops allocate and free inside themselves and the allocator's slack (measured on CPU,
scn-t4-b2, 486 atoms, budgets of 64 MB to 512 MB: 2.2; on CUDA an estimate, 1.5, until measured).

A training step keeps, without checkpointing, those intermediates for every block (~50 MB per atom
at scn-t4-b2); with ``checkpoint="edges"`` each chunk's messages are recomputed in the backward and
only the block inputs stay (:func:`activation_bytes`).

Budgets (``memory_budget="auto"``): CUDA 10% of the device memory, capped at 8 GiB (a 1,000-atom
scn-t4-b2 forward stays one chunk per resolution on an 80 GB GPU); CPU 5% of the machine's memory,
capped at 1 GiB. ``None`` runs every resolution in one chunk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from . import so3
from .ops.layout import edge_layout

GIB = 1 << 30
# Budget shares and caps per device type ("auto").
BUDGET_SHARE = {"cuda": 0.10, "cpu": 0.05}
BUDGET_CAP = {"cuda": 8 * GIB, "cpu": 1 * GIB}
# Memory assumed for a CUDA device that is not present (a plan built on a CPU machine): an
# 80 GB H100 / A100.
ASSUMED_CUDA_MEMORY = 80 * 10**9
# "auto" checkpointing turns on when a training step's estimated activations exceed this share of
# the device memory.
CHECKPOINT_SHARE = 0.5
# Edges per atom the "largest system" estimates assume (40 neighbours, 12 of them near).
EDGES_PER_ATOM = 40
CHECKPOINT_CHOICES = ("auto", "edges", "off")
# Peak-memory growth per byte of the message tensors a chunk holds, per device type (module doc;
# CPU measured, CUDA estimated).
PEAK_FACTOR = {"cpu": 2.2, "cuda": 1.5}


def device_memory(device: torch.device | str) -> int:
    """Bytes of memory of ``device``: the GPU's total memory (assumed
    :data:`ASSUMED_CUDA_MEMORY` when no CUDA device is present), or the machine's MemTotal."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(dev.index or 0).total_memory)
        return ASSUMED_CUDA_MEMORY
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16 * GIB


def check_budget(budget: Any) -> int | str | None:
    """``memory_budget`` as given: "auto", None (unchunked) or a positive number of bytes."""
    if budget is None or budget == "auto":
        return budget
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(
            f"memory_budget must be 'auto', None or a positive number of bytes, got {budget!r}"
        )
    return budget


def check_checkpoint(mode: Any) -> str:
    """``activation_checkpointing`` as given: "auto", "edges" (or True) or "off" (or False)."""
    if mode is True:
        return "edges"
    if mode is False:
        return "off"
    if mode not in CHECKPOINT_CHOICES:
        raise ValueError(
            f"activation_checkpointing must be one of {CHECKPOINT_CHOICES} (or a bool), got {mode!r}"
        )
    return mode


def resolve_budget(budget: int | str | None, device: torch.device | str, memory: int) -> int | None:
    """The budget in bytes ("auto": the device type's share of ``memory``, capped)."""
    if budget != "auto":
        return budget
    dev = torch.device(device).type
    share, cap = BUDGET_SHARE.get(dev, 0.05), BUDGET_CAP.get(dev, GIB)
    return int(min(cap, share * memory))


def bytes_per_edge(
    lmax: int,
    mmax: int,
    taps: int,
    hidden: int,
    channels: int,
    itemsize: int,
    device_type: str = "cpu",
) -> int:
    """Peak bytes per edge of one resolution's fused messages on ``device_type``,
    :data:`PEAK_FACTOR` included (module doc)."""
    rows = so3.sphere_basis_reduce(lmax, mmax)
    n0 = lmax + 1
    n1 = rows - n0
    wigner = edge_layout(lmax, mmax).K
    numbers = (
        (n0 + 2 * n1) * channels
        + hidden
        + 3 * taps * hidden
        + taps * rows * channels
        + rows * channels
        + wigner
    )
    return int(PEAK_FACTOR.get(device_type, PEAK_FACTOR["cpu"]) * itemsize * numbers)


@dataclass(frozen=True)
class MemoryPlan:
    """How one forward bounds its memory: ``budget`` bytes per resolution's chunk (None:
    unchunked), ``edge_chunk`` the edges per chunk of each resolution (None: unchunked),
    ``checkpoint`` ("edges": each chunk's messages recomputed in the backward; "off"; "auto":
    decided per forward from its size), ``device_memory`` the bytes the estimates are for, and
    ``why``: the reason when chunking is off."""

    budget: int | None
    edge_chunk: tuple[int | None, ...]
    checkpoint: str
    device_memory: int
    per_edge: tuple[int, ...]
    per_atom: int
    per_atom_block_saved: int
    grid_saved_per_atom: int
    blocks: int
    why: str | None = None

    @property
    def chunked(self) -> bool:
        return any(c is not None for c in self.edge_chunk)

    def activation_bytes(
        self, natoms: int, edges: tuple[int, ...], training: bool, checkpoint: bool
    ) -> int:
        """Estimated activation bytes of one forward (and its saved tensors, in training) with
        ``edges`` per resolution: the O(N) node and per-edge tables plus, per resolution, the
        chunk's intermediates (inference, or checkpointed training) or every block's (training)."""
        total = natoms * self.per_atom
        chunked = [
            min(e, c) if c is not None else e for e, c in zip(edges, self.edge_chunk, strict=True)
        ]
        peak_messages = max((e * b for e, b in zip(chunked, self.per_edge, strict=True)), default=0)
        if not training:
            return total + peak_messages
        if checkpoint:
            return total + self.blocks * natoms * self.per_atom_block_saved + peak_messages
        saved = sum(e * b for e, b in zip(edges, self.per_edge, strict=True))
        return total + self.blocks * (
            saved + natoms * (self.per_atom_block_saved + self.grid_saved_per_atom)
        )

    def largest_system(self, training: bool, memory: int | None = None) -> int:
        """Atoms (at :data:`EDGES_PER_ATOM` edges each) whose estimated activations fit in
        ``memory`` (default: the plan's device memory) less a fixed 1 GiB for weights, gradients,
        optimizer state and the runtime."""
        memory = self.device_memory if memory is None else memory
        free = memory - GIB
        lo, hi = 0, 1 << 24
        while lo < hi:
            mid = (lo + hi + 1) // 2
            need = self.activation_bytes(
                mid, self.edges_for(mid), training, self.checkpoint != "off"
            )
            lo, hi = (mid, hi) if need <= free else (lo, mid - 1)
        return lo

    def edges_for(self, natoms: int) -> tuple[int, ...]:
        """Edges per resolution of ``natoms`` atoms with 40 neighbours each: 12 near (resolution
        0 of two), the rest far."""
        if len(self.per_edge) == 1:
            return (natoms * EDGES_PER_ATOM,)
        near = natoms * 12
        return (near, natoms * EDGES_PER_ATOM - near, *[0] * (len(self.per_edge) - 2))

    def checkpoints(self, natoms: int, edges: tuple[int, ...], training: bool) -> bool:
        """Whether a forward of this size runs checkpointed ("auto": its estimated unchunked
        training activations exceed :data:`CHECKPOINT_SHARE` of the device memory)."""
        if not training or self.checkpoint == "off":
            return False
        if self.checkpoint == "edges":
            return True
        need = self.activation_bytes(natoms, edges, True, False)
        return need > CHECKPOINT_SHARE * self.device_memory

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget,
            "edge_chunk": list(self.edge_chunk),
            "checkpoint": self.checkpoint,
            "device_memory_bytes": self.device_memory,
            "largest_system_inference": self.largest_system(False),
            "largest_system_training": self.largest_system(True),
        }


def memory_plan(
    resolutions: tuple[tuple[int, int, int, int], ...],
    hidden: tuple[int, ...],
    channels: int,
    channels_reduce: int,
    grid_points: int,
    grid_width: tuple[int, int],
    blocks: int,
    device: torch.device | str,
    dtype: torch.dtype,
    budget: int | str | None,
    checkpoint: str,
    compiled: bool,
    memory: int | None = None,
    gaussians: int = 0,
    edge_channels: int = 128,
) -> MemoryPlan:
    """The :class:`MemoryPlan` of a model: ``resolutions`` (lmax, mmax, num_taps argument, taps),
    ``hidden`` width per resolution, channels C and C', the grid's points per atom and fc1/fc2
    widths (0 without a grid), the number of interaction blocks, the distance basis size
    (``gaussians``) and the edge features' width (``edge_channels``)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    memory = device_memory(device) if memory is None else memory
    per_edge = tuple(
        bytes_per_edge(lm, mm, taps, h, channels_reduce, itemsize, torch.device(device).type)
        for (lm, mm, _, taps), h in zip(resolutions, hidden, strict=True)
    )
    s = (resolutions[0][0] + 1) ** 2
    wig = max(edge_layout(lm, mm).K for lm, mm, _, _ in resolutions)
    # node tensors (x, x_new, the block output, accumulators) and, per edge at 40 per atom, the
    # distance basis, edge features and their pre-activations, frames, Wigner rows and six index
    # columns kept for the forward (scn-t4-b2, float32: ~240 KB per atom; measured at 4,902 atoms
    # with a 1 GiB budget: 224 KB per atom besides the budget)
    per_edge_tables = itemsize * (gaussians + 3 * edge_channels + 9 + wig) + 6 * 8
    per_atom = itemsize * (4 * s * channels) + EDGES_PER_ATOM * per_edge_tables
    # per block, checkpointed: the node tensors the block keeps (its input, output, the grid op's
    # inputs, the residual sum) and the edge features with their pre-activations (scn-t4-b2,
    # float32: 248 KB per atom per block; measured, a 1,026-atom training step with a 1 GiB
    # budget: 259 KB per atom per block besides the per-atom tables and the budget)
    per_atom_block_saved = itemsize * (5 * s * channels_reduce + EDGES_PER_ATOM * 6 * edge_channels)
    grid_saved = itemsize * grid_points * sum(grid_width)
    resolved = resolve_budget(budget, device, memory)
    why = None
    if compiled and resolved is not None:
        why = "chunk bounds depend on the graph's data, so a compiled forward runs unchunked"
        resolved = None
    elif resolved is None:
        why = "memory_budget=None: every resolution runs in one chunk"
    chunk = tuple(None if resolved is None else max(1, resolved // b) for b in per_edge)
    return MemoryPlan(
        resolved, chunk, checkpoint, memory, per_edge, per_atom, per_atom_block_saved,
        grid_saved, blocks, why,
    )  # fmt: skip
