"""The plan of a forward: for every fused op, the backend that runs it, the variant, and why the
other backends do not.

The model builds its plan in ``prepare`` (eagerly, before the region ``torch.compile`` captures)
and the op entry points (``scn_fast.ops.messages``, ``grid``, ``heads``) follow it: no op chooses
anything on its own. ``explain()`` reports it, per op::

    {"ran": backend, "variant": {...}, "refused": {backend: reason}}

Variants (what each op does beyond its backend):

* ``edge_rotation``: ``split_rotation`` (the extension's rotation writes fc1_edge_proj's two GEMM
  operands itself: CPU, float32/float64 GEMMs as given, 4 taps in tap order, eager) and
  ``degree0_input`` (the first interaction's input has degree 0 alone: no rotation, per-atom
  projection; docs/algebra.md).
* ``gated_tap_projection``: ``gemm`` ("dense" with one tap, "split_operands", "tap_ordered",
  "row_blocked" (CPU: per block of consecutive weight rows, weight read in place), "gathered"),
  ``gate`` / ``split`` (whose kernels run the gate epilogue and the row gathers: "extension",
  "triton" or "aten"), ``weight_order``, ``precision`` and ``native``.
* ``tap_combine``: ``fc2`` ("silu_mm": fc2_edge(SiLU(h)) keeping only h, with autograd;
  "scratch": without autograd, SiLU in place and fc2_edge written into a block reused across
  calls; "linear": the Linear as it is), ``bf16_input`` (native bf16 GEMM outputs read as they
  are), ``impl``, ``precision``, ``native``, and ``edge_mlp``: who runs the edge MLP's Linear
  layers (fc1_dist, fc1_edge, fc2_edge, the distance block's fc1_dist and fc1_edge_attr):
  "triton" (``ops.edge_linear``: one GEMM launch forward with bias and SiLU in its epilogue, two
  backward; the fused path on Triton in float32 or float64, precision fp32 or native tf32) or
  "aten" (``nn.Linear`` and SiLU). ``Plan.edge_mlp`` gives (impl, GEMM precision).
* ``grid_projection``: ``tile_atoms``, ``saved_activations`` (keep fc1's and fc2's
  pre-activations for the backward: CPU extension with autograd), ``bf16_gemms`` (native bf16
  GEMMs inside the op), ``precision`` (the GEMM precision, passed to launchers that take it),
  ``operands`` (the precision the op's inputs and weights are rounded to: "fp32" when its own
  GEMMs are native bf16, or are the Triton grid's with a native precision), ``native``.
* ``output_heads``: ``tile_atoms``, ``precision`` (always "fp32": the heads stay float32).

A plan can be built for a device that is not present (``scn_fast.plan(config, device="cuda")``
on a CPU machine): support is declared as data (``scn_fast.ops.support``), and the GPU's compute
capability is assumed (``scn_fast.precision.ASSUMED_CUDA_CAPABILITY``) unless given.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from . import so3
from .config import DEFAULTS, resolution_specs
from .dispatch import OPS, Dispatcher, OpRequest
from .kernels import tiling
from .memory_plan import MemoryPlan, check_budget, check_checkpoint, memory_plan
from .ops.grid_projection import default_tile_atoms, saves_activations
from .ops.support import preferred, refusal
from .precision import check_precision, gemm_support

# The split rotation where it applies (tests turn it off to compare with the general path).
SPLIT_ROTATION = True

_FLOATS = (torch.float32, torch.float64)


@dataclass(frozen=True)
class OpPlan:
    """One op of a plan: the backend that runs it, its variant, the refused backends' reasons."""

    ran: str | None
    variant: dict[str, Any]
    refused: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {"ran": self.ran, "variant": dict(self.variant), "refused": dict(self.refused)}


@dataclass(frozen=True)
class Mode:
    """How a forward runs: with autograd recording (``grad``), inside a torch.compile trace."""

    grad: bool
    compiled: bool = False


def run_mode() -> tuple[bool, bool]:
    """(grad, compiled) now: called where the forward starts, so that a torch.compile trace sees
    itself (the plan is built after, eagerly)."""
    return torch.is_grad_enabled(), torch.compiler.is_compiling()


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a model: resolutions (lmax, mmax, num_taps argument,
    taps), channels, grid and heads sizes, and whether fc1_edge_proj is held in tap order."""

    resolutions: tuple[tuple[int, int, int, int], ...]
    channels: int
    channels_reduce: int
    lmax: int
    num_bands: int | None
    num_points: int
    tap_ordered: bool
    hidden: tuple[int, ...] = ()
    blocks: int = 1
    gaussians: int = 0
    edge_channels: int = 128


@dataclass(frozen=True)
class Plan:
    """Every fused op's :class:`OpPlan` for one (device, dtype, precision, mode)."""

    device: torch.device
    dtype: torch.dtype
    precision: str
    native: bool
    mode: Mode
    ops: dict[str, OpPlan]
    gemm_precision: dict[str, Any]
    shared_basis: bool = False
    natoms: int | None = None
    memory: MemoryPlan | None = None

    def __getitem__(self, op: str) -> OpPlan:
        return self.ops[op]

    @property
    def fused_messages(self) -> bool:
        """Whether the messages run the fused ops (else upstream's dense reference)."""
        return self.ops["edge_rotation"].ran != "reference"

    @property
    def edge_mlp(self) -> tuple[str, str]:
        """(impl, precision) of the edge MLP's Linear layers (tap_combine's variant ``edge_mlp``):
        ("triton", "fp32" | "tf32") or ("aten", the model's precision)."""
        impl = self.ops["tap_combine"].variant.get("edge_mlp", "aten")
        exact = self.precision == "fp32" or self.dtype == torch.float64
        return impl, "fp32" if exact else self.precision

    def explain(self) -> dict[str, dict]:
        out = {op: self.ops[op].as_dict() for op in OPS}
        if self.precision != "fp32":
            out["gemm_precision"] = dict(self.gemm_precision)
        if self.memory is not None:
            out["memory"] = memory_report(self.memory, self.fused_messages)
        return out

    @property
    def checkpointed(self) -> bool:
        """Whether each edge chunk's messages are recomputed in the backward."""
        return self.memory is not None and self.memory.checkpoint == "edges" and self.mode.grad

    def with_checkpointing(self) -> Plan:
        """This plan with activation checkpointing of edge chunks on (``checkpoint="edges"``):
        the grid op recomputes its tiles in the backward rather than keeping its pre-activations."""
        assert self.memory is not None
        ops = dict(self.ops)
        grid = ops["grid_projection"]
        if grid.variant.get("saved_activations"):
            ops["grid_projection"] = replace(
                grid, variant={**grid.variant, "saved_activations": False}
            )
        return replace(self, ops=ops, memory=replace(self.memory, checkpoint="edges"))


def memory_report(memory: MemoryPlan, fused: bool) -> dict[str, Any]:
    """explain()'s "memory" entry: {"ran": "edge chunks" | "unchunked", "variant": budget, edges
    per chunk, checkpointing, the largest system the device memory holds, "refused": why not
    chunked}."""
    if not fused:
        return {
            "ran": "unchunked",
            "variant": {"checkpoint": "off"},
            "refused": {"edge chunks": "the reference message path runs unchunked, as upstream"},
        }
    ran = "edge chunks" if memory.chunked else "unchunked"
    refused = {} if memory.why is None else {"edge chunks": memory.why}
    return {"ran": ran, "variant": memory.as_dict(), "refused": refused}


def _tap_impl(backend: str, dtype: torch.dtype) -> str:
    return backend if backend in ("extension", "triton") and dtype in _FLOATS else "aten"


def build_plan(
    shape: ModelShape,
    dispatcher: Dispatcher,
    device: torch.device | str,
    dtype: torch.dtype,
    precision: str,
    mode: Mode,
    capability: tuple[int, int] | None = None,
    memory_budget: int | str | None = "auto",
    checkpoint: str = "auto",
    device_memory: int | None = None,
) -> Plan:
    """The plan for one forward of a model of ``shape`` (module doc); ``memory_budget``,
    ``checkpoint`` and ``device_memory``: ``scn_fast.memory_plan``."""
    device = torch.device(device)
    check_precision(precision)
    native, why = gemm_support(precision, device, capability)
    dev = device.type
    lmax0, mmax, _, taps = shape.resolutions[0]
    cr = shape.channels_reduce

    def decide(op: str, lmax: int, mmax_: int = mmax, channels: int = cr):
        return dispatcher.decide(OpRequest(op, device, dtype, lmax, mmax_, taps, channels))

    # The edge ops: the fused message path needs both fused, for every resolution.
    rotate, rotate_refused = decide("edge_rotation", lmax0)
    scatter, scatter_refused = decide("scatter_aggregation", lmax0)
    for lm, _, _, _ in shape.resolutions[1:]:
        rotate = rotate if decide("edge_rotation", lm)[0] == rotate else "reference"
        scatter = scatter if decide("scatter_aggregation", lm)[0] == scatter else "reference"
    if "reference" in (rotate, scatter) and rotate != scatter:
        why_both = "the fused message path needs both edge ops fused"
        for op_refused, name in ((rotate_refused, rotate), (scatter_refused, scatter)):
            if name != "reference":
                op_refused[name] = why_both
        rotate = scatter = "reference"
    fused = rotate != "reference"
    exact = precision == "fp32" or dtype == torch.float64
    native_bf16 = precision == "bf16" and native and dtype == torch.float32
    split_rotation = (
        SPLIT_ROTATION
        and fused
        and rotate == scatter == "extension"
        and shape.tap_ordered
        and dev == "cpu"
        and dtype in _FLOATS
        and exact
        and mmax == 1
        and taps == 4
        and not mode.compiled
    )
    ops: dict[str, OpPlan] = {
        "edge_rotation": OpPlan(
            rotate,
            {"split_rotation": split_rotation, "degree0_input": fused} if fused else {},
            rotate_refused,
        ),
        "scatter_aggregation": OpPlan(scatter, {}, scatter_refused),
    }

    # The tap ops run inside the fused message path, on the edge ops' backend where they can.
    for op in ("gated_tap_projection", "tap_combine"):
        if not fused:
            ops[op] = OpPlan("reference", {}, dict(rotate_refused))
        else:
            ops[op] = _follow(op, scatter, dev, dtype, lmax0, mmax)
    if fused:
        proj_backend = ops["gated_tap_projection"].ran
        if taps == 1:
            gemm = "dense"
        elif split_rotation:
            gemm = "split_operands"
        elif shape.tap_ordered:
            gemm = "tap_ordered"
        elif dev == "cpu" and not native_bf16:
            gemm = "row_blocked"
        else:
            gemm = "gathered"
        ops["gated_tap_projection"] = replace(
            ops["gated_tap_projection"],
            variant={
                "gemm": gemm,
                "weight_order": "tap" if shape.tap_ordered else "upstream",
                "gate": _tap_impl(proj_backend, dtype),
                "split": "extension" if proj_backend == "extension" else "aten",
                "precision": precision,
                "native": native,
            },
        )
        combine = ops["tap_combine"].ran
        edge_mlp = (
            "triton"
            if combine == "triton"
            and dtype in _FLOATS
            and (exact or (precision == "tf32" and native))
            else "aten"
        )
        if edge_mlp == "triton" or (precision == "fp32" and mode.grad):
            fc2 = "silu_mm"
        elif precision == "fp32" and not mode.grad and not mode.compiled:
            fc2 = "scratch"
        else:
            fc2 = "linear"
        bf16_input = native_bf16 and combine == "extension"
        ops["tap_combine"] = replace(
            ops["tap_combine"],
            variant={
                "fc2": fc2,
                "bf16_input": bf16_input,
                "impl": "extension" if bf16_input else _tap_impl(combine, dtype),
                "precision": precision,
                "native": native,
                "edge_mlp": edge_mlp,
            },
        )

    # The grid MLP and the heads.
    if shape.num_bands is None:
        ops["grid_projection"] = OpPlan(None, {}, {})
    else:
        grid, refused = decide("grid_projection", shape.lmax, 0)
        variant: dict[str, Any] = {"precision": precision, "native": native}
        if grid != "reference":
            mats = so3.grid_matrices(shape.lmax, shape.num_bands)
            points = mats.res_alpha * mats.res_beta
            bf16_gemms = native_bf16 and grid == "extension"
            # the Triton grid's GEMMs take the precision themselves (tf32 / bf16 operands in
            # registers) where it is native: its inputs and weights are not rounded beforehand
            own_precision = bf16_gemms or (grid == "triton" and native and not exact)
            variant.update(
                tile_atoms=_grid_tile_atoms(shape, grid, dev, dtype, mode.grad, points),
                saved_activations=saves_activations(grid, dev, mode.grad),
                bf16_gemms=bf16_gemms,
                operands="fp32" if own_precision else precision,
            )
        ops["grid_projection"] = OpPlan(grid, variant, refused)
    heads, refused = decide("output_heads", shape.lmax, 0, shape.channels)
    variant = {"precision": "fp32"}
    if heads != "reference":
        variant["tile_atoms"] = _heads_tile_atoms(shape, heads, dev, dtype, mode.grad)
    ops["output_heads"] = OpPlan(heads, variant, refused)
    report = {
        "ran": f"{precision} {'native' if native else 'emulated'}",
        "refused": {} if native else {"native": why},
    }
    grid_op = ops["grid_projection"]
    if shape.num_bands is not None and grid_op.ran not in (None, "reference"):
        mats = so3.grid_matrices(shape.lmax, shape.num_bands)
        points = mats.res_alpha * mats.res_beta
        fc = 2 * shape.num_bands * cr
        widths = (fc, 2 * cr) if grid_op.variant.get("saved_activations") else (0, 0)
    else:
        points, widths = 0, (0, 0)
    hidden = shape.hidden or tuple(0 for _ in shape.resolutions)
    mem = memory_plan(
        shape.resolutions, hidden, shape.channels, cr, points, widths, shape.blocks,
        device, dtype, memory_budget, checkpoint, mode.compiled, device_memory,
        shape.gaussians, shape.edge_channels,
    )  # fmt: skip
    p = Plan(device, dtype, precision, native, mode, ops, report, dispatcher.use_fused, None, mem)
    return p.with_checkpointing() if checkpoint == "edges" and mode.grad and fused else p


def _grid_tile_atoms(
    shape: ModelShape, backend: str, dev: str, dtype: torch.dtype, grad: bool, points: int
) -> int:
    """Atoms per grid-MLP tile: on a GPU as many as the tile loop's scratch budget holds
    (``kernels/tiling.py``: ~1,350 atoms for a scn-t4-b2 training tile in float32, so a 1,000-atom
    step runs 1 tile, not 13), on a CPU a cache-sized tile (``default_tile_atoms``)."""
    if dev != "cuda":
        return default_tile_atoms(points, dev)
    return tiling.grid_tile_atoms(
        shape.lmax,
        shape.num_bands or 1,
        shape.channels_reduce,
        itemsize=dtype.itemsize,
        backend=backend,
        training=grad,
    )


def _heads_tile_atoms(
    shape: ModelShape, backend: str, dev: str, dtype: torch.dtype, grad: bool
) -> int:
    """Atoms per output-heads tile: the scratch budget on a GPU, cache-sized on a CPU."""
    if dev != "cuda":
        return default_tile_atoms(shape.num_points, dev)
    c = shape.channels
    return tiling.heads_tile_atoms(
        shape.lmax, c, shape.num_points, [c, c], [c, c], [1, 1],
        itemsize=dtype.itemsize, backend=backend, training=grad,
    )  # fmt: skip


def _follow(
    op: str, backend: str, device_type: str, dtype: torch.dtype, lmax: int, mmax: int
) -> OpPlan:
    """A tap op inside the fused message path: on the edge ops' backend when that supports the
    request (or on the backend ``ops.support.PREFERRED`` names for this device type, when that
    one supports it: Triton's fused gate and combine on CUDA), else in ATen ops inside the fused
    op ("reference"), with the reason."""
    others = {b: f"{op} runs on the edge ops' backend ({backend})" for b in ("extension", "triton")}
    better = preferred(op, backend, device_type)
    if better is not None and refusal(op, better[0], device_type, dtype, lmax, mmax) is None:
        return OpPlan(better[0], {}, {backend: better[1]})
    why = refusal(op, backend, device_type, dtype, lmax, mmax)
    if why is None:
        others.pop(backend)
        return OpPlan(backend, {}, others)
    return OpPlan("reference", {}, {**others, backend: why})


def model_shape(config: dict[str, Any], tap_ordered: bool) -> ModelShape:
    """The :class:`ModelShape` of a configuration (upstream constructor keyword arguments)."""
    c = {**DEFAULTS, **config}
    specs = resolution_specs(
        c["lmax"], c["num_resolutions"], c["hidden_channels"], c["max_num_neighbors"]
    )
    res = []
    for lm, _, _ in specs:
        taps = len(so3.tap_set(lm, c["mmax"], c["num_taps"]).angles)
        res.append((lm, c["mmax"], c["num_taps"], taps))
    hidden = tuple(h for _, h, _ in specs)
    return ModelShape(
        tuple(res),
        c["sphere_channels"],
        c["sphere_channels_reduce"],
        c["lmax"],
        c["num_bands"] if c["use_grid"] else None,
        c["num_sphere_samples"],
        tap_ordered and c["mmax"] == 1 and c["num_taps"] != 1,
        hidden,
        c["num_interactions"],
        int(c["cutoff"] / c["distance_resolution"]),
        c["num_basis_functions"],
    )


def plan(
    config: dict[str, Any],
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    natoms: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    use_fused: bool = True,
    training: bool = False,
    compiled: bool = False,
    capability: tuple[int, int] | None = None,
    memory_budget: int | str | None = "auto",
    activation_checkpointing: str | bool = "auto",
    device_memory: int | None = None,
) -> Plan:
    """The plan a model of ``config`` (upstream constructor keyword arguments, e.g. a preset) would
    run on ``device`` in ``precision`` for ``natoms`` atoms: built from the declared support alone,
    so ``device`` need not be present (a CUDA plan on a CPU machine assumes
    ``capability``, default sm_90). ``training``: autograd records the forward.
    ``memory_budget`` / ``activation_checkpointing``: as the model's (``scn_fast.memory_plan``);
    ``device_memory``: bytes the memory estimates are for (default: the device's, or 80 GB for
    an absent CUDA device); ``explain()["memory"]`` states the largest system it holds."""
    dispatcher = Dispatcher(use_fused=use_fused, backend=backend)
    shape = model_shape(config, tap_ordered=use_fused)
    p = build_plan(
        shape, dispatcher, device, dtype, precision, Mode(training, compiled), capability,
        check_budget(memory_budget), check_checkpoint(activation_checkpointing), device_memory,
    )  # fmt: skip
    return replace(p, natoms=natoms)
