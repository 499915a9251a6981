"""The Spherical Channel Network (Zitnick et al., NeurIPS 2022): one definition, upstream-compatible.

Module names, parameter shapes, initialisation order and numerics follow upstream SCN
(``fairchem.core.models.scn``), so its checkpoints load with ``strict=True`` and the same seed gives
the same weights and outputs. Shapes: N atoms, B structures, E edges, S = (lmax+1)^2 coefficients,
C = sphere_channels, C' = sphere_channels_reduce.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import torch
from torch import nn

from . import ops
from .config import _check_config, resolution_specs
from .context import EdgeContext, GraphData, Resolution, mark_sizes_dynamic
from .data import Structure, read_structure
from .dispatch import Dispatcher
from .frames import edge_frames
from .graph import (
    check_precomputed_graph,
    edge_vectors,
    image_shifts,
    radius_graph_pbc,
    validate_structure,
)
from .memory_plan import check_budget, check_checkpoint
from .neighbours import rank_edges
from .ops.edge_linear import linear_act
from .ops.reference import Grid
from .ops.tap_projection import has_tap_order
from .planning import Mode, ModelShape, Plan, build_plan, run_mode
from .precision import Linear, check_precision, set_precision
from .smearing import make_distance_expansion
from .tap_order import TapOrderedLinear
from .validation import check_model_config

__all__ = ["EdgeContext", "GraphData", "Grid", "Resolution", "SphericalChannelNetwork"]

logger = logging.getLogger(__name__)


class DistanceBlock(nn.Module):
    """Edge features (E, K): silu(fc1_edge_attr(silu(src_emb + tgt_emb + fc1_dist(basis(d)))))."""

    def __init__(
        self,
        in_channels: int,
        num_basis: int,
        expansion: nn.Module,
        max_elements: int,
        act: nn.Module,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.distance_expansion = expansion
        self.act = act
        self.num_basis_functions = num_basis
        self.fc1_dist = Linear(in_channels, num_basis)
        self.source_embedding = nn.Embedding(max_elements, num_basis)
        self.target_embedding = nn.Embedding(max_elements, num_basis)
        nn.init.uniform_(self.source_embedding.weight.data, -0.001, 0.001)
        nn.init.uniform_(self.target_embedding.weight.data, -0.001, 0.001)
        self.fc1_edge_attr = Linear(num_basis, num_basis)

    def forward(
        self,
        dist: torch.Tensor,
        z_src: torch.Tensor,
        z_tgt: torch.Tensor,
        basis: torch.Tensor | None = None,
        plan: Plan | None = None,
    ) -> torch.Tensor:
        """dist (E,), element indices (E,), optional precomputed basis (E, G) -> (E, K); the
        Linear layers as ``plan.edge_mlp`` says (None: ``nn.Linear``)."""
        basis = self.distance_expansion(dist) if basis is None else basis
        mlp = plan.edge_mlp if plan is not None else ()  # (impl, precision): the plan's choice
        h = linear_act(self.fc1_dist, basis, False, *mlp)
        h = self.act(self.source_embedding(z_src) + self.target_embedding(z_tgt) + h)
        return linear_act(self.fc1_edge_attr, h, True, *mlp)


class MessageBlock(nn.Module):
    """Messages of one resolution: rotate source and target into each edge frame and tap, MLP, combine
    taps, rotate back. Returns (E_r, S_L, C') per edge."""

    def __init__(
        self,
        channels: int,
        hidden: int,
        num_basis: int,
        res: Resolution,
        act: nn.Module,
        tap_ordered: bool = False,
    ) -> None:
        """``tap_ordered`` (the fused model): hold fc1_edge_proj's weight in tap order when the
        resolution has 4 taps (``scn_fast.tap_order``; state_dict stays upstream's)."""
        super().__init__()
        self.act = act
        self.hidden_channels = hidden
        self.sphere_channels_reduce = channels
        self.res = res
        self.fc1_dist = Linear(num_basis, hidden)
        width = 2 * res.sphere_basis_reduce * channels
        if tap_ordered and has_tap_order(res.lmax, res.mmax, res.taps_arg):
            self.fc1_edge_proj = TapOrderedLinear(width, hidden, res.lmax, res.mmax, res.taps_arg)
        else:
            self.fc1_edge_proj = Linear(width, hidden)
        self.fc1_edge = Linear(hidden, hidden)
        self.fc2_edge = Linear(hidden, res.sphere_basis_reduce * channels)

    def forward(self, x: torch.Tensor, x_edge: torch.Tensor, edges: EdgeContext, *where) -> None:
        """``ops.messages(self, x, x_edge, edges, r, out, degree0_input)``: out (N, S_L, C') +=
        resolution r's messages summed into their targets, as the plan says; x (N, S, C'), x_edge
        (E_r, K) resolution r's edge features; ``degree0_input``: x is zero outside its l = 0
        row."""
        ops.messages(self, x, x_edge, edges, *where)


class EdgeBlock(nn.Module):
    """One interaction: messages from every resolution summed into targets, then (use_grid) a
    per-grid-point MLP over [ToGrid(x_down), ToGrid(messages)], back to coefficients. (N, S, C) -> (N, S, C)."""

    def __init__(
        self,
        resolutions: list[Resolution],
        grid: Grid | None,
        channels: int,
        channels_reduce: int,
        expansion: nn.Module,
        max_elements: int,
        num_basis: int,
        num_gaussians: int,
        act: nn.Module,
        tap_ordered: bool = False,
    ) -> None:
        super().__init__()
        self.num_resolutions = len(resolutions)
        self.act = act
        self.sphere_channels = channels
        self.sphere_channels_reduce = channels_reduce
        self.distance_expansion = expansion
        self.resolutions = resolutions
        self.grid = grid
        self.use_grid = grid is not None
        self.sphere_basis = resolutions[0].sphere_basis
        self.dist_block = DistanceBlock(num_gaussians, num_basis, expansion, max_elements, act)
        self.message_blocks = nn.ModuleList(
            MessageBlock(channels_reduce, r.hidden, num_basis, r, act, tap_ordered)
            for r in resolutions
        )
        if channels != channels_reduce:
            self.downsample = Linear(channels, channels_reduce, bias=False)
            self.upsample = Linear(channels_reduce, channels, bias=False)
        if grid is not None:
            width = grid.num_bands * 2 * channels_reduce
            self.fc1_sphere = Linear(width, width)
            self.fc2_sphere = Linear(width, 2 * channels_reduce)
            self.fc3_sphere = Linear(2 * channels_reduce, channels_reduce)

    def forward(
        self,
        x: torch.Tensor,
        atomic_numbers: torch.Tensor,
        ctx: EdgeContext,
        degree0_input: bool = False,
        edge_elements: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (N, S, C) -> (N, S, C). ``degree0_input``: x is zero outside its l = 0 row (the first
        interaction; the plan may skip the work that zeros make redundant); ``edge_elements``:
        (z_src, z_tgt) (E,), the elements at each edge's ends when the caller has them (the model
        gathers them once for all blocks)."""
        c, cr, s = self.sphere_channels, self.sphere_channels_reduce, self.sphere_basis
        if edge_elements is None:
            ei = ctx.edge_index
            edge_elements = (atomic_numbers[ei[0]], atomic_numbers[ei[1]])
        # A shared distance expansion where the plan says so (the fused model); the reference
        # recomputes it in every block, as upstream does.
        basis = ctx.basis(self.distance_expansion)
        x_edge = self.dist_block(ctx.edge_distance, *edge_elements, basis, ctx.plan)
        x_edge_of = ctx.split(x_edge)
        x_down = self.downsample(x.view(-1, c)) if c != cr else x
        x_down = x_down.view(-1, s, cr)
        x_new = x.new_zeros((x.shape[0], s, cr))
        for r, (res, block) in enumerate(zip(self.resolutions, self.message_blocks, strict=True)):
            # the whole tensor when the resolution covers every coefficient: an in-place add into
            # it is not an add into a view (autograd's copy of the base is not needed)
            out = x_new if res.sphere_basis == s else x_new[:, : res.sphere_basis, :]
            block(x_down, x_edge_of[r], ctx, r, out, degree0_input)
        if self.grid is not None:
            x_new = ops.grid(self, x_down, x_new, ctx.plan)
        if c != cr:
            x_new = self.upsample(x_new.reshape(-1, cr))
        return x_new.view(-1, s, c)


class SphericalChannelNetwork(nn.Module):
    """Spherical Channel Network, a drop-in for ``fairchem.core.models.scn.SphericalChannelNetwork``.

    Positional arguments follow ocpmodels (num_atoms, bond_feat_dim and num_targets are ignored).
    Keyword-only: fairchem's use_pbc_single, direct_forces, enforce_max_neighbors_strictly, and
    scn_fast's use_fused, backend (``scn_fast.dispatch.BACKEND_CHOICES``: "auto" or a backend name;
    the plan, ``scn_fast.planning``, decides per op), precision ("fp32", "tf32", "bf16": GEMM
    operands rounded, float32 accumulation; scn_fast.precision),
    deterministic_frames (each edge frame's roll a pure function of its edge vector),
    memory_budget ("auto", bytes, or None: the fused messages run in target-aligned edge chunks
    of at most this many bytes of intermediates; "auto" from the device's memory) and
    activation_checkpointing ("auto", "edges"/True, "off"/False: recompute each chunk's messages
    in the backward; "auto" when a training step would not fit otherwise): ``scn_fast.memory_plan``.

    forward(data) -> {"energy": (B,), "forces": (N, 3)} for any object with pos, cell,
    atomic_numbers, natoms, batch, pbc (and edge_index, cell_offsets, neighbors when otf_graph=False).
    """

    def __init__(
        self,
        num_atoms: int | None = None,
        bond_feat_dim: int | None = None,
        num_targets: int | None = None,
        use_pbc: bool = True,
        regress_forces: bool = True,
        otf_graph: bool = False,
        max_num_neighbors: int = 20,
        cutoff: float = 8.0,
        max_num_elements: int = 90,
        num_interactions: int = 8,
        lmax: int = 6,
        mmax: int = 1,
        num_resolutions: int = 2,
        sphere_channels: int = 128,
        sphere_channels_reduce: int = 128,
        hidden_channels: int = 256,
        num_taps: int = -1,
        use_grid: bool = True,
        num_bands: int = 1,
        num_sphere_samples: int = 128,
        num_basis_functions: int = 128,
        distance_function: str = "gaussian",
        basis_width_scalar: float = 1.0,
        distance_resolution: float = 0.02,
        show_timing_info: bool = False,
        *,
        use_pbc_single: bool = True,
        direct_forces: bool = True,
        enforce_max_neighbors_strictly: bool = True,
        use_fused: bool = False,
        backend: str = "auto",
        precision: str = "fp32",
        deterministic_frames: bool = False,
        memory_budget: int | str | None = "auto",
        activation_checkpointing: str | bool = "auto",
    ) -> None:
        super().__init__()
        self.model_config: dict[str, Any] = {
            "use_pbc": use_pbc,
            "use_pbc_single": use_pbc_single,
            "regress_forces": regress_forces,
            "otf_graph": otf_graph,
            "max_num_neighbors": max_num_neighbors,
            "cutoff": cutoff,
            "max_num_elements": max_num_elements,
            "num_interactions": num_interactions,
            "lmax": lmax,
            "mmax": mmax,
            "num_resolutions": num_resolutions,
            "sphere_channels": sphere_channels,
            "sphere_channels_reduce": sphere_channels_reduce,
            "hidden_channels": hidden_channels,
            "num_taps": num_taps,
            "use_grid": use_grid,
            "num_bands": num_bands,
            "num_sphere_samples": num_sphere_samples,
            "num_basis_functions": num_basis_functions,
            "distance_function": distance_function,
            "basis_width_scalar": basis_width_scalar,
            "distance_resolution": distance_resolution,
            "show_timing_info": show_timing_info,
            "direct_forces": direct_forces,
        }
        """Upstream constructor keyword arguments (what a checkpoint's config["model"] stores)."""
        self.normalizers: dict[str, dict[str, float]] = {}
        """{"energy"|"forces": {"mean": m, "rmsd": s}}: predict() returns out * s + m (a checkpoint's
        target normalizers; empty = identity)."""
        check_model_config(self.model_config)
        _check_config(
            lmax,
            mmax,
            num_resolutions,
            num_bands,
            cutoff,
            distance_resolution,
            max_num_neighbors,
            direct_forces,
            precision,
        )
        self.regress_forces = regress_forces
        self.use_pbc = use_pbc
        self.use_pbc_single = use_pbc_single
        self.otf_graph = otf_graph
        self.cutoff = cutoff
        self.max_num_elements = max_num_elements
        self.max_num_neighbors = self.max_neighbors = max_num_neighbors
        self.enforce_max_neighbors_strictly = enforce_max_neighbors_strictly
        self.num_interactions = num_interactions
        self.lmax, self.mmax = lmax, mmax
        self.sphere_basis = (lmax + 1) ** 2
        self.sphere_channels = sphere_channels
        self.sphere_channels_reduce = sphere_channels_reduce
        self.hidden_channels = hidden_channels
        self.num_sphere_samples = num_sphere_samples
        self.num_basis_functions = num_basis_functions
        self.distance_function = distance_function
        self.basis_width_scalar = basis_width_scalar
        self.distance_resolution = distance_resolution
        self.use_grid = use_grid
        self.show_timing_info = show_timing_info
        self.direct_forces = direct_forces
        self.precision = precision  # property: checked, applied to every Linear at forward
        self.deterministic_frames = deterministic_frames
        self.memory_budget = memory_budget  # properties: checked
        self.activation_checkpointing = activation_checkpointing
        self.dispatcher = Dispatcher(use_fused=use_fused, backend=backend)
        self.act = nn.SiLU()

        self.sphere_embedding = nn.Embedding(max_num_elements, sphere_channels)
        self.num_gaussians = int(cutoff / distance_resolution)
        self.distance_expansion = make_distance_expansion(
            distance_function, cutoff, self.num_gaussians, basis_width_scalar
        )
        specs = resolution_specs(lmax, num_resolutions, hidden_channels, max_num_neighbors)
        self.resolutions = [Resolution(lm, mmax, num_taps, h, rc) for lm, h, rc in specs]
        self.grid = Grid(lmax, num_bands) if use_grid else None
        self.num_bands = num_bands
        self.edge_blocks = nn.ModuleList(
            EdgeBlock(
                self.resolutions,
                self.grid,
                sphere_channels,
                sphere_channels_reduce,
                self.distance_expansion,
                max_num_elements,
                num_basis_functions,
                self.num_gaussians,
                self.act,
                tap_ordered=use_fused,
            )
            for _ in range(num_interactions)
        )
        self._shape = ModelShape(
            tuple((r.lmax, r.mmax, r.taps_arg, r.num_taps) for r in self.resolutions),
            sphere_channels,
            sphere_channels_reduce,
            lmax,
            num_bands if use_grid else None,
            num_sphere_samples,
            use_fused and has_tap_order(lmax, mmax, num_taps),
            tuple(r.hidden for r in self.resolutions),
            num_interactions,
            self.num_gaussians,
            num_basis_functions,
        )
        self.energy_fc1 = Linear(sphere_channels, sphere_channels)
        self.energy_fc2 = Linear(sphere_channels, sphere_channels_reduce)
        self.energy_fc3 = Linear(sphere_channels_reduce, 1)
        if regress_forces:
            self.force_fc1 = Linear(sphere_channels, sphere_channels)
            self.force_fc2 = Linear(sphere_channels, sphere_channels_reduce)
            self.force_fc3 = Linear(sphere_channels_reduce, 1)

    # ------------------------------------------------------------------ precision
    @property
    def precision(self) -> str:
        """GEMM precision: "fp32" (default), "tf32" or "bf16" (scn_fast.precision); settable."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = check_precision(value)

    @property
    def memory_budget(self) -> int | str | None:
        """Bytes of message intermediates per edge chunk, "auto" or None (``scn_fast.memory_plan``);
        settable."""
        return self._memory_budget

    @memory_budget.setter
    def memory_budget(self, value: int | str | None) -> None:
        self._memory_budget = check_budget(value)

    @property
    def activation_checkpointing(self) -> str:
        """ "auto", "edges" or "off" (True / False accepted when set); settable."""
        return self._activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: str | bool) -> None:
        self._activation_checkpointing = check_checkpoint(value)

    def plan_for(
        self, device: torch.device, dtype: torch.dtype, grad: bool, compiled: bool = False
    ) -> Plan:
        """The plan of a forward on ``device`` in ``dtype`` (``scn_fast.planning``; built once per
        setting and kept by the dispatcher), with every Linear of the interaction blocks set to
        its GEMM precision. The output heads stay float32 in every mode: their forces are a mean
        over sphere points that cancels strongly (bf16 there moves max |F| by 20-30%, measured on
        the golden t4b2_shaped config), and they are ~1% of the FLOPs."""
        d = self.dispatcher
        budget, ckpt = self.memory_budget, self.activation_checkpointing
        key = (device, dtype, self._precision, grad, compiled, d.effective_backend, budget, ckpt)
        if key not in d.plans:
            d.plans[key] = build_plan(
                self._shape, d, device, dtype, self._precision, Mode(grad, compiled),
                memory_budget=budget, checkpoint=ckpt,
            )  # fmt: skip
        plan = d.plans[key]
        set_precision(self.edge_blocks, plan.precision, plan.native)
        d.plan = plan
        return plan

    # ------------------------------------------------------------------ inputs and graph
    @property
    def dtype(self) -> torch.dtype:
        return self.sphere_embedding.weight.dtype

    def read_input(self, data: Any) -> Structure:
        """Validated structure fields of ``data`` in the model's dtype (ValueError on bad input)."""
        st = read_structure(
            data, use_pbc=self.use_pbc, max_num_elements=self.max_num_elements, dtype=self.dtype
        )
        validate_structure(st.pos, st.cell, st.pbc, st.natoms)
        return st

    def generate_graph(self, data: Any, structure: Structure | None = None) -> GraphData:
        """The radius graph of ``data``: built here (otf_graph=True, or no precomputed edges given) or
        taken from data.edge_index / cell_offsets / neighbors, regrouped by target if needed."""
        st = structure if structure is not None else self.read_input(data)
        pre = getattr(data, "edge_index", None)
        if not self.otf_graph and pre is not None:
            offsets = getattr(data, "cell_offsets", None)
            if offsets is None:
                if self.use_pbc:
                    raise ValueError("otf_graph=False with use_pbc=True needs data.cell_offsets")
                offsets = torch.zeros(pre.shape[1], 3, dtype=torch.long, device=pre.device)
            edge_index, offsets, _ = check_precomputed_graph(
                pre.to(st.pos.device),
                offsets.to(st.pos.device),
                st.natoms,
                self.max_num_neighbors,
                structure=st,
                cutoff=self.cutoff,
            )
            neighbors = torch.bincount(st.batch[edge_index[1]], minlength=len(st.natoms))
            given = getattr(data, "neighbors", None)
            if given is not None and not torch.equal(
                torch.as_tensor(given).reshape(-1).to(neighbors), neighbors
            ):
                raise ValueError(
                    f"data.neighbors {torch.as_tensor(given).tolist()} disagrees with the edges per "
                    f"structure {neighbors.tolist()} in data.edge_index"
                )
        else:
            if not self.otf_graph:
                warnings.warn(
                    "otf_graph=False but data has no edge_index: building the graph here",
                    stacklevel=2,
                )
            g = radius_graph_pbc(
                st.pos,
                st.cell,
                st.pbc,
                st.natoms,
                self.cutoff,
                self.max_num_neighbors,
                self.enforce_max_neighbors_strictly,
                validate=False,  # read_input validated st
            )
            edge_index, offsets, neighbors = g.edge_index, g.cell_offsets, g.neighbors
        shift = image_shifts(st.cell, st.batch, edge_index, offsets, st.pos.dtype)
        vec = edge_vectors(st.pos, st.cell, st.batch, edge_index, offsets)
        return GraphData(
            edge_index, vec.norm(dim=-1), vec, offsets.to(st.pos.dtype), shift, neighbors
        )

    # ------------------------------------------------------------------ forward
    def forward(self, data: Any) -> dict[str, torch.Tensor]:
        """{"energy": (B,), "forces": (N, 3)} (forces only with regress_forces)."""
        start = time.perf_counter() if self.show_timing_info else 0.0
        st, ctx = self.prepare(data, *run_mode())
        out = self.forward_context(st, ctx)
        if self.show_timing_info:
            logger.info("SCN forward: %d atoms, %.4f s", len(st.pos), time.perf_counter() - start)
        return out

    @torch.compiler.disable(
        reason="scn_fast: input checks, the radius graph, edge ranking, frames, rotations and "
        "the plan run eagerly (data-dependent shapes); the blocks and heads are compiled"
    )
    def prepare(
        self, data: Any, grad: bool | None = None, compiled: bool = False
    ) -> tuple[Structure, EdgeContext]:
        """The eager part of ``forward``: the validated structure and its planned edge context
        (:meth:`planned_context`) for a forward with autograd (``grad``; default: as now) and
        inside a torch.compile trace or not (``compiled``). The rest, :meth:`forward_context`, is
        tensor math and custom ops only, which ``torch.compile(model)`` captures as one graph."""
        st = self.read_input(data)
        grad, compiled = run_mode() if grad is None else (grad, compiled)
        return st, self.planned_context(st, self.generate_graph(data, st), grad, compiled)

    def planned_context(
        self, st: Structure, graph: GraphData, grad: bool, compiled: bool = False
    ) -> EdgeContext:
        """:meth:`edge_context` with everything the blocks and heads would otherwise set up on the
        fly done now: the forward's plan built (every op's backend and variant, reported by
        ``explain()``; :meth:`plan_for`), the per-resolution rotations and edge groupings built,
        the constants cached for the model's dtype and device, and the atom and edge dimensions
        marked dynamic for torch.compile."""
        plan = self.plan_for(st.pos.device, st.pos.dtype, grad, compiled)
        ctx = self.edge_context(st, graph, plan)
        if plan.memory is not None and plan.fused_messages and not plan.checkpointed:
            edges = tuple(ctx.bounds[r + 1] - ctx.bounds[r] for r in range(len(ctx.bounds) - 1))
            if plan.memory.checkpoints(len(st.pos), edges, grad):
                ctx.plan = plan = plan.with_checkpointing()
                self.dispatcher.plan = plan
        ops.prepare_constants(ctx, self.grid, self.num_sphere_samples, self.lmax)
        mark_sizes_dynamic(st, ctx)
        return ctx

    def edge_context(
        self, st: Structure, graph: GraphData, plan: Plan | None = None
    ) -> EdgeContext:
        """Rank edges per target by distance, group them by resolution (stable), build their frames
        (drawing the random rolls, unless deterministic_frames) and Wigner rotations; ``plan``:
        the forward's (default: the plan for the current mode)."""
        if plan is None:
            plan = self.plan_for(st.pos.device, st.pos.dtype, *run_mode())
        n = st.pos.shape[0]
        rank = rank_edges(graph.edge_distance, graph.edge_index[1], n, graph.edge_distance_vec)
        group = torch.full_like(rank, len(self.resolutions) - 1)
        for r in reversed(range(len(self.resolutions) - 1)):
            group = torch.where(rank <= self.resolutions[r].rank_cutoff, r, group)
        order = torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=len(self.resolutions)).tolist()
        bounds = [0]
        for cnt in counts:
            bounds.append(bounds[-1] + cnt)
        edge_index = graph.edge_index[:, order]
        frames = edge_frames(graph.edge_distance_vec[order], self.deterministic_frames)
        return EdgeContext(
            graph.edge_distance[order],
            edge_index,
            frames,
            bounds,
            self.resolutions,
            n,
            plan,
        )

    def forward_graph(self, st: Structure, graph: GraphData) -> dict[str, torch.Tensor]:
        """The model on a validated structure and its graph (``forward`` = read_input,
        generate_graph, forward_graph): the entry point of the ASE calculator's step and of
        bucketing (scn_fast/bucketing.py), which pad the graph before the model sees it."""
        return self.forward_context(st, self.planned_context(st, graph, *run_mode()))

    def forward_context(self, st: Structure, ctx: EdgeContext) -> dict[str, torch.Tensor]:
        """The interaction blocks and heads on a planned edge context (:meth:`planned_context`):
        the region ``torch.compile(model)`` compiles."""
        z = st.atomic_numbers
        x = st.pos.new_zeros((len(z), self.sphere_basis, self.sphere_channels))
        x[:, 0, :] = self.sphere_embedding(z)
        elements = (z[ctx.edge_index[0]], z[ctx.edge_index[1]])  # shared by every block
        for i, block in enumerate(self.edge_blocks):
            y = block(x, z, ctx, degree0_input=i == 0, edge_elements=elements)
            x = x + y if i > 0 else y
        return self._heads(x, st, ctx.plan)

    def _heads(self, x: torch.Tensor, st: Structure, plan: Plan) -> dict[str, torch.Tensor]:
        """Energy: mean over sphere samples of an MLP on x's values there, summed per structure.
        Forces: the point-weighted mean of a second MLP's values (``ops.heads``)."""
        node_energy, forces = ops.heads(self, x, plan)
        out = {"energy": _per_structure_sum(node_energy, st)}
        if self.regress_forces:
            out["forces"] = forces
        return out

    @torch.no_grad()
    def predict(self, data: Any) -> dict[str, torch.Tensor]:
        """Energies (B,) and forces (N, 3) in physical units: ``forward`` (no autograd graph) with
        each output denormalized as fairchem does, ``out * rmsd + mean`` (``self.normalizers``,
        set by ``load_checkpoint``). ``data``: a batch object, or ``ase.Atoms`` / a list of them."""
        from ase import Atoms

        if isinstance(data, Atoms) or (
            isinstance(data, (list, tuple)) and data and isinstance(data[0], Atoms)
        ):
            from .data import AtomsBatch

            data = AtomsBatch.from_ase(
                data, dtype=self.dtype, device=self.sphere_embedding.weight.device
            )
        out = self(data)
        for key, norm in self.normalizers.items():
            if key in out:
                out[key] = out[key] * norm["rmsd"] + norm["mean"]
        return out

    # ------------------------------------------------------------------ reporting
    def explain(self) -> dict[str, dict]:
        """Per fused op, as the last forward's plan ran it: {"ran": backend, "variant": {...},
        "refused": {backend: reason}}; with a low GEMM precision also "gemm_precision" (native or
        emulated, and why)."""
        return self.dispatcher.explain()

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _per_structure_sum(node_values: torch.Tensor, st: Structure) -> torch.Tensor:
    """(B,) sums of node_values (N,) per structure. scatter_add, not index_add: the same sums in
    the same order (bit-identical), but Inductor's CPU code generator fails on an index_add into
    a one-element output (torch 2.13), which a single structure is under torch.compile."""
    return node_values.new_zeros(len(st.natoms)).scatter_add(0, st.batch, node_values)
