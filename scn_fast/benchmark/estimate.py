"""What a benchmark point will cost, estimated before it runs: memory and time of each step.

The estimate decides, per point, which correctness baseline runs (``baseline.py``), whether the
reference path is run at all, and how many timed repeats fit; ``--large`` states its duration from
it. It is a linear model calibrated on measurements, not a measurement: records carry the numbers it
gave, next to what was measured.

Size of a point: N atoms and E_r edges per message resolution r (counted with the model's own radius
graph, ``count_edges``). The per-edge work of resolution r is proportional to its message width

    w_r = T_r (2 R_r C' + H_r)

(T_r taps, R_r rows of an edge frame, C' reduced channels, H_r hidden channels: the inputs and the
hidden layer of fc1_edge per tap), so a point's *edge width* is W = sum_r E_r w_r (scn-t4-b2:
684,032 per atom at 12 + 28 edges per atom). Then, for a path kind (reference | fused), a step mode
and a dtype of itemsize b bytes (the memory line for the reference only):

    activation bytes  = (b / 4) x (ACT_OFFSET[kind, mode] x P / P_cal + BYTES_PER_W[kind, mode] x W)
                        (training: BYTES_PER_W x num_interactions, the blocks' saved activations)
    seconds           = TIME_FACTOR[dtype] x SECONDS_PER_W[kind, mode] x num_interactions x W
                        + STEP_OVERHEAD_S x num_interactions

(P parameters, P_cal those of scn-t4-b2). The fused path's activation bytes are its execution
plan's own estimate (``scn_fast.memory_plan``: edge chunks within a budget, checkpointed training
steps), its seconds the formula above with the fused constants (plus one forward when the plan
checkpoints). A process holds RUNTIME_BYTES (Python, torch, scn_fast, the extension) plus each model's
weights (parameters x b; a training step adds its gradients).

Calibration (``CALIBRATION`` says where each number comes from): scn-t4-b2 on the Cu(111)+CO slabs
of ``systems.py`` (40 edges per atom), Intel Xeon, 2 threads, activation memory as
``measure.activation_memory`` defines it (peak RSS during a step minus RSS before it), one step per
process after a warm-up step on the 14-atom slab:

| path, inference | 14 atoms | 38 | 102 | 198 | 486 |
|---|---:|---:|---:|---:|---:|
| reference, float32 | 0.16 GB | 0.53 GB | 0.75 GB | 1.26 GB | |
| reference, float64 | | | 1.31 GB | | |
| fused, float32 | 0.05 GB | 0.12 GB | 0.31 GB | 0.75 GB | 1.42 GB |
| fused, float64 | | | 0.62 GB | 1.43 GB | |

The reference's inference grows by 134 KB per edge from 102 atoms on (7.8 bytes per unit of W)
over 0.2 GB; the fused path's by 4.2-5.5 bytes per unit of W; float64 takes 1.75-2x float32.
Training (14 and 38 atoms only): reference 1.93 / 5.24 GB, fused 0.85 / 2.14 GB, extrapolated
linearly (the reference's 1,000-atom training step: ~140 GB). Times: the fused path's per-W time
holds from 14 to 1,000 atoms (74 CPU seconds per step at 1,026 atoms, the MD table of
docs/large_systems.md); the reference's per-W time
at 102-198 atoms is about twice its 14-38-atom value, and the larger is used. Other presets are
scaled through W and num_interactions only (rough). On CUDA, times are divided by ``CUDA_SPEEDUP``
(a guess until GPU records exist) and memory is the allocator's.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

from .. import so3
from ..config import DEFAULTS, resolution_specs
from ..presets import preset as preset_config

# float32 bytes of activation memory per unit of edge width W (training: per block), and a constant
BYTES_PER_W = {
    ("reference", "inference"): 7.8,
    ("reference", "training"): 16.8,
}
# ... over a constant (scaled by the parameter count, CALIBRATION_PARAMS being scn-t4-b2's)
ACT_OFFSET = {("reference", "inference"): 0.2e9}
CALIBRATION_PARAMS = 126_710_274
# seconds per unit of W and per block, float32, 2 threads of an idle Intel Xeon.
SECONDS_PER_W = {
    ("reference", "inference"): 1.9e-8,
    ("reference", "training"): 5.6e-8,
    ("fused", "inference"): 4.33e-9,
    ("fused", "training"): 1.33e-8,
}
# float64 steps take this much longer than float32 ones (by path kind).
TIME_FACTOR = {("reference", torch.float64): 2.0, ("fused", torch.float64): 2.5}
STEP_OVERHEAD_S = 0.005  # per block: Python, small ops (dominates the tiny preset)
RUNTIME_BYTES = int(0.45e9)  # RSS of a point process before any model (torch, scn_fast, extension)
CUDA_SPEEDUP = 60.0
CALIBRATION = (
    "scn-t4-b2, Cu(111)+CO slabs (40 edges per atom), Intel Xeon, 2 threads: 14 and 38 atoms from "
    "bench/results/2026-11-29-cpu-xeon-amx-2c-t4b2-7repeats-b062ceb (commit b062ceb); 102 and 198 "
    "atoms one step per process on 2026-12-02 (commit 4e68bee); 486 atoms from "
    "docs/large_systems.md (commit c3b0acf)"
)


@dataclass(frozen=True)
class PointSize:
    """A point's system: ``natoms``, ``edges`` per message resolution (r = 0 first)."""

    natoms: int
    edges: tuple[int, ...]

    @property
    def nedges(self) -> int:
        return sum(self.edges)


@dataclass(frozen=True)
class StepEstimate:
    """One step of one path: ``activation_bytes`` (above what is held), ``held_bytes`` (runtime,
    this model's weights, and its gradients in training), ``seconds`` (idle machine)."""

    activation_bytes: int
    held_bytes: int
    seconds: float

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.held_bytes

    def as_dict(self) -> dict[str, float]:
        return {
            "activation_gb": round(self.activation_bytes / 1e9, 3),
            "held_gb": round(self.held_bytes / 1e9, 3),
            "seconds": round(self.seconds, 2),
        }


def _config(name: str) -> dict[str, Any]:
    return {**DEFAULTS, **preset_config(name)}


def message_widths(name: str) -> tuple[int, ...]:
    """w_r = T_r (2 R_r C' + H_r) per message resolution of preset ``name`` (module doc)."""
    c = _config(name)
    widths = []
    for lmax, hidden, _ in resolution_specs(
        c["lmax"], c["num_resolutions"], c["hidden_channels"], c["max_num_neighbors"]
    ):
        taps = len(so3.tap_set(lmax, c["mmax"], c["num_taps"]).angles)
        rows = sum((lmax + 1 - m) * (1 if m == 0 else 2) for m in range(min(c["mmax"], lmax) + 1))
        widths.append(taps * (2 * rows * c["sphere_channels_reduce"] + hidden))
    return tuple(widths)


@functools.cache
def parameter_count(name: str) -> int:
    """Parameters of preset ``name`` (the model built on the meta device: no memory, no weights)."""
    from ..model import SphericalChannelNetwork

    with torch.device("meta"):
        model = SphericalChannelNetwork(**preset_config(name))
    return sum(p.numel() for p in model.parameters())


def count_edges(name: str, structures: list) -> PointSize:
    """Atoms and edges per resolution of ``structures`` (ASE Atoms) under preset ``name``: the
    model's radius graph, each target's ``12`` nearest edges at r = 0 and the rest at r = 1 when
    the preset has two resolutions (upstream's split by rank)."""
    from ..data import AtomsBatch
    from ..graph import radius_graph_pbc

    c = _config(name)
    data = AtomsBatch.from_ase(structures)
    g = radius_graph_pbc(
        data.pos, data.cell, data.pbc, data.natoms, c["cutoff"], c["max_num_neighbors"]
    )
    natoms = int(data.natoms.sum())
    degree = torch.bincount(g.edge_index[1], minlength=natoms)
    if c["num_resolutions"] == 1:
        return PointSize(natoms, (int(degree.sum()),))
    near = int(degree.clamp(max=12).sum())
    return PointSize(natoms, (near, int(degree.sum()) - near))


def edge_width(name: str, size: PointSize) -> float:
    """W = sum_r E_r w_r (module doc)."""
    return float(sum(e * w for e, w in zip(size.edges, message_widths(name), strict=False)))


def step_estimate(
    name: str, kind: str, mode: str, size: PointSize, dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> StepEstimate:  # fmt: skip
    """The estimate of one ``mode`` step of a ``kind`` ("reference" | "fused") path (module doc).
    The fused path's activation memory is its execution plan's own estimate (edge chunks within
    the default budget, checkpointed training where the plan's "auto" turns it on:
    ``scn_fast.memory_plan``), and a checkpointed training step adds one more forward's time."""
    blocks = _config(name)["num_interactions"]
    b = torch.empty((), dtype=dtype).element_size()
    w = edge_width(name, size)
    checkpointed = False
    if kind == "fused":
        memory = fused_memory_plan(name, device, dtype)
        training = mode == "training"
        checkpointed = memory.checkpoints(size.natoms, size.edges, training)
        act = memory.activation_bytes(size.natoms, size.edges, training, checkpointed)
    else:
        per_w = BYTES_PER_W[(kind, mode)] * (blocks if mode == "training" else 1)
        offset = ACT_OFFSET.get((kind, mode), 0.0) * parameter_count(name) / CALIBRATION_PARAMS
        act = (b / 4) * (offset + per_w * w)
    weights = parameter_count(name) * b
    held = RUNTIME_BYTES + weights * (2 if mode == "training" else 1)
    per_w_s = SECONDS_PER_W[(kind, mode)]
    if checkpointed:
        per_w_s += SECONDS_PER_W[(kind, "inference")]
    sec = TIME_FACTOR.get((kind, dtype), 1.0) * per_w_s * blocks * w
    sec += STEP_OVERHEAD_S * blocks
    if torch.device(device).type == "cuda":
        sec /= CUDA_SPEEDUP
    return StepEstimate(int(act), int(held), sec)


@functools.cache
def fused_memory_plan(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The memory plan (``scn_fast.memory_plan.MemoryPlan``) of preset ``name``'s fused model on
    ``device`` with the default budget and checkpointing."""
    from ..planning import plan

    return plan(preset_config(name), device=device, dtype=dtype).memory


def weights_bytes(name: str, dtype: torch.dtype = torch.float32) -> int:
    return parameter_count(name) * torch.empty((), dtype=dtype).element_size()


def mem_available_bytes(device: str = "cpu", limit: int | None = None) -> int | None:
    """Memory a point may plan for: on CPU ``MemAvailable`` of /proc/meminfo (what the machine can
    give without swapping, other jobs' memory excluded), at most ``limit`` (the point's address-space
    limit); on CUDA the device's free memory. None when unknown."""
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            return limit
        free, _total = torch.cuda.mem_get_info()
        return free if limit is None else min(free, limit)
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            avail = None
    if avail is None:
        return limit
    return avail if limit is None else min(avail, limit)
