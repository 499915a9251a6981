"""The Spherical Channel Network (Zitnick et al., NeurIPS 2022): one definition, upstream-compatible.

Module names, parameter shapes, initialisation order and numerics follow upstream SCN
(``fairchem.core.models.scn``), so its checkpoints load with ``strict=True`` and the same seed gives
the same weights and outputs. Shapes: N atoms, B structures, E edges, S = (lmax+1)^2 coefficients,
C = sphere_channels, C' = sphere_channels_reduce.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from . import so3
from .data import Structure, read_structure
from .dispatch import Dispatcher, OpRequest
from .frames import edge_frames
from .graph import (
    check_precomputed_graph,
    edge_vectors,
    image_shifts,
    radius_graph_pbc,
    validate_structure,
)
from .neighbours import rank_edges
from .ops import (
    EdgeCSR,
    compact_wigner,
    edge_csr,
    edge_rotation,
    gated_tap_projection,
    scatter_aggregation,
)
from .ops.edge_rotation import edge_rotation_split
from .ops.grid_projection import grid_constants, grid_projection
from .ops.output_heads import heads_constants, output_heads
from .ops.silu_linear import silu_mm
from .ops.tap_combine import combine_tables, identical_taps, tap_combine
from .ops.tap_projection import (
    gated_tap_projection_split,
    has_tap_order,
    split_operands_apply,
    tap_rows,
)
from .ops.workspace import workspace
from .precision import (
    Linear,
    check_precision,
    gemm_operand,
    gemm_support,
    linear_operands,
    low_precision_linear,
)
from .smearing import make_distance_expansion
from .tap_order import TapOrderedLinear
from .validation import check_model_config

# The fused message path on CPU with the C++ extension rotates straight into fc1_edge_proj's split
# operands (``edge_rotation_split``, ``gated_tap_projection_split``); False takes the general path
# (rotation, then the projection's own split). Tests compare the two.
SPLIT_ROTATION = True

logger = logging.getLogger(__name__)


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
        """Rotations for edge frames (E, 3, 3): wigner (E*T, R, S_L) per (edge, tap), edge-major, and
        wigner_inv (E, S_L, R), the transpose of tap 0's."""
        e = frames.shape[0]
        r, s = self.sphere_basis_reduce, self.sphere_basis
        per_tap = []
        for angle in self.taps.angles:
            y_rot = so3.y_rotation_matrix(angle).to(dtype=frames.dtype, device=frames.device)
            blocks = so3.wigner_d_blocks(y_rot @ frames, self.lmax)
            w = frames.new_zeros((e, r, s))
            row = 0
            for l, block in enumerate(blocks):
                mm = min(l, self.mmax)
                w[:, row : row + 2 * mm + 1, l * l : (l + 1) ** 2] = block[
                    :, l - mm : l + mm + 1, :
                ]
                row += 2 * mm + 1
            per_tap.append(w)
        wigner = torch.stack(per_tap, dim=1).view(e * self.num_taps, r, s)
        return wigner, per_tap[0].transpose(1, 2).contiguous()


class Grid:
    """ToGrid / FromGrid of upstream for one lmax and band count, constants kept in float64."""

    def __init__(self, lmax: int, num_bands: int) -> None:
        self.lmax, self.num_bands = lmax, num_bands
        self.sphere_basis = (lmax + 1) ** 2
        self.mats = so3.grid_matrices(lmax, num_bands)
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _mats(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (like.dtype, like.device)
        m = self.mats
        return so3.cached_constant(
            self._cache,
            key,
            lambda: tuple(
                t.to(dtype=like.dtype, device=like.device)
                for t in (m.to_grid_shb, m.to_grid_sha, m.from_grid_sha, m.from_grid_shb)
            ),
        )

    def to_grid(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        """x (N, S, C) -> grid values (N * res_beta * res_alpha, bands * C)."""
        shb, sha, _, _ = self._mats(x)
        x = x.view(-1, self.sphere_basis, channels)
        g = torch.einsum("mbi,zic->zbmc", shb, x)
        g = torch.einsum("am,zbmc->zbac", sha, g).contiguous()
        return g.view(-1, self.num_bands * channels)

    def from_grid(self, g: torch.Tensor, channels: int) -> torch.Tensor:
        """grid values (N * res_beta * res_alpha, C) -> coefficients (N * S, C)."""
        _, _, sha, shb = self._mats(g)
        g = g.view(-1, self.mats.res_beta, self.mats.res_alpha, channels)
        x = torch.einsum("am,zbac->zbmc", sha, g)
        x = torch.einsum("mbi,zbmc->zic", shb, x).contiguous()
        return x.view(-1, channels)


@dataclass
class EdgeContext:
    """Per-forward edge data shared by all blocks, edges grouped by resolution (bounds[r]:bounds[r+1]):
    edge_distance (E,), edge_index (2, E), frames (E, 3, 3) edge rotation matrices, the resolutions,
    the number of atoms and the model's dispatcher. Per-resolution rotations are built on first use
    and shared by all blocks: ``dense`` (reference path), ``compact`` and ``csr`` (fused path)."""

    edge_distance: torch.Tensor
    edge_index: torch.Tensor
    frames: torch.Tensor
    bounds: list[int]
    resolutions: list[Resolution]
    num_nodes: int
    dispatcher: Dispatcher
    _cache: dict = field(default_factory=dict)

    def basis(self, expansion: nn.Module) -> torch.Tensor:
        """The distance expansion of the edges (E, G): every block shares one expansion module,
        so it is computed once per forward, with values that would make subnormal numbers flushed
        to zero.

        Gaussians far from their centre fall into the subnormal range (2,700 of 224,000 values on a
        14-atom slab at cutoff 8), and most of the others are tiny (88% below 1e-30); x86 CPUs take
        a microcode assist on every multiply by a subnormal number and on every product that lands
        in that range, which made fc1_dist's weight-gradient GEMM (gradient x basis) 12x slower
        (3.6 ms vs 0.29 ms at E = 560) and, with the subnormal values alone flushed, still ~3x.
        Values below tiny^0.8 (2e-31 in float32) are flushed, so a product with any factor above
        tiny^0.2 (1.5e-8) stays normal; they are 1e-23 below float32's rounding of the outputs."""
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
    ) -> torch.Tensor:
        """dist (E,), element indices (E,), optional precomputed basis (E, G) -> (E, K)."""
        basis = self.distance_expansion(dist) if basis is None else basis
        h = self.fc1_dist(basis)
        h = self.act(self.source_embedding(z_src) + self.target_embedding(z_tgt) + h)
        return self.act(self.fc1_edge_attr(h))


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

    def forward(
        self,
        x: torch.Tensor,
        x_edge: torch.Tensor,
        edge_index: torch.Tensor,
        wigner: torch.Tensor,
        wigner_inv: torch.Tensor,
    ) -> torch.Tensor:
        """x (N, S_L, C'), x_edge (E, K), edge_index (2, E), wigner (E*T, R, S_L), wigner_inv (E, S_L, R)."""
        res, c, t = self.res, self.sphere_channels_reduce, self.res.num_taps
        h = self.act(self.fc1_dist(x_edge))
        rotated = []
        for side in (0, 1):
            xs = x[edge_index[side]]
            xs = (
                xs.view(-1, 1, res.sphere_basis, c).repeat(1, t, 1, 1).view(-1, res.sphere_basis, c)
            )
            rotated.append(torch.bmm(wigner, xs).view(-1, res.sphere_basis_reduce * c))
        m = self.act(self.fc1_edge_proj(torch.cat(rotated, dim=1)))
        m = m.view(-1, t, self.hidden_channels) * h.view(-1, 1, self.hidden_channels)
        m = self.act(self.fc1_edge(m.view(-1, self.hidden_channels)))
        m = self.act(self.fc2_edge(m))
        m = m.view(-1, t * res.sphere_basis_reduce, c)
        m = torch.einsum("abc,bd->adc", m, res.mapping(m)).contiguous()
        return torch.bmm(wigner_inv, m)

    def forward_fused(
        self,
        x: torch.Tensor,
        x_edge: torch.Tensor,
        wig: torch.Tensor,
        csr_both: EdgeCSR,
        csr_target: EdgeCSR,
        rotate_backend: str,
        scatter_backend: str,
    ) -> torch.Tensor:
        """The same messages through the fused ops, already summed into their targets: x (N, S, C'),
        x_edge (E, K), wig (E, K_w) compact rotations -> (N, S_L, C')."""
        res, c, h = self.res, self.sphere_channels_reduce, self.hidden_channels
        gate = self.act(self.fc1_dist(x_edge))
        proj = self.fc1_edge_proj
        if (
            SPLIT_ROTATION
            and rotate_backend == "extension"
            and scatter_backend == "extension"
            and isinstance(proj, TapOrderedLinear)
            and split_operands_apply(x, proj.weight, res.mmax, res.num_taps, proj.precision)
            and not torch.compiler.is_compiling()  # its tap tables are built eagerly
        ):
            # the rotation writes fc1_edge_proj's two GEMM operands itself (no split pass over y)
            rows = tap_rows(res.lmax, res.mmax, res.taps_arg, x.device)
            y0, pair = edge_rotation_split(x, wig, csr_both, res.lmax, res.mmax, rows)
            m = gated_tap_projection_split(y0, pair, proj.weight, proj.bias, gate, scatter_backend)
        else:
            y = edge_rotation(x, wig, csr_both, res.lmax, res.mmax, rotate_backend)
            m = gated_tap_projection(
                y,
                proj.weight,
                proj.bias,
                gate,
                res.lmax,
                res.mmax,
                res.taps_arg,
                proj.precision,
                proj.precision_native,
                scatter_backend,
                weight_order="tap" if isinstance(proj, TapOrderedLinear) else "upstream",
            )
        # Without autograd nothing keeps fc1_edge's output or fc2_edge's: SiLU runs in place and
        # (float32 GEMMs, eager) fc2_edge writes into a reused buffer that tap_combine reads at once,
        # rather than into fresh memory per block (measured: ~1% of an inference step at 14 atoms).
        # With autograd, fc2_edge(SiLU(.)) keeps only SiLU's input for its backward (silu_mm).
        inference = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        m = self.fc1_edge(m.view(-1, h))
        if inference and self.fc2_edge.precision == "fp32":
            m = F.silu(m, inplace=True)
            z = workspace(
                "fc2_edge_out", (m.shape[0], self.fc2_edge.out_features), m.dtype, m.device
            )
            torch.mm(m, self.fc2_edge.weight.t(), out=z)
        elif self.fc2_edge.precision == "fp32" and torch.is_grad_enabled():
            z = silu_mm(m, self.fc2_edge.weight)
        else:
            # a native bf16 GEMM's output goes to the extension's tap_combine as it is (bf16)
            m = F.silu(m, inplace=True) if inference else self.act(m)
            z = self.fc2_edge.matmul(m, keep_bf16=scatter_backend == "extension")
        z = z.view(-1, res.num_taps * res.sphere_basis_reduce, c)
        bias = self.fc2_edge.bias.view(res.sphere_basis_reduce, c)
        m = tap_combine(z, bias, res.lmax, res.mmax, res.taps_arg, scatter_backend)
        m = m.view(-1, 1, res.sphere_basis_reduce, c)
        return scatter_aggregation(m, wig, csr_target, res.lmax, res.mmax, scatter_backend)

    def forward_fused_invariant(
        self,
        x0: torch.Tensor,
        x_edge: torch.Tensor,
        wig: torch.Tensor,
        csr_both: EdgeCSR,
        csr_target: EdgeCSR,
        scatter_backend: str,
    ) -> torch.Tensor:
        """:meth:`forward_fused` for an input of degree 0 alone (the first interaction, whose x holds
        the atom embeddings in its l = 0 row and zeros elsewhere): x0 (N, C') the l = 0 row ->
        (N, S_L, C'), the same messages (up to rounding) with a fraction of the work.

        Every rotation is the identity on degree 0 and maps zeros to zeros, so every tap's rotated
        input is [x0[src], 0, ..., x0[tgt], 0, ...]: fc1_edge_proj reduces to its two l = 0 column
        blocks, applied per atom (N rows, not 4E) and gathered per edge; the taps are equal, so
        fc1_edge and fc2_edge run once per edge (E rows, not 4E); equal taps combine row by row
        (``identical_taps``: the m = +-1 rows cancel for 4 taps), so fc2_edge only computes the
        rows that survive. No edge rotation runs; the rotation back and the sum into targets do."""
        res, c, h = self.res, self.sphere_channels_reduce, self.hidden_channels
        r = res.sphere_basis_reduce
        gate = self.act(self.fc1_dist(x_edge))
        proj, fc2 = self.fc1_edge_proj, self.fc2_edge
        # fc1_edge_proj's input columns are (side, row, channel): the l = 0 row of both sides, at
        # rows 0 and R in upstream's order, 0 and R0 in tap order (the m = 0 rows of each side first)
        second = res.lmax + 1 if isinstance(proj, TapOrderedLinear) else r
        w_l0 = proj.weight.view(h, 2 * r, c)[:, 0 : second + 1 : second]
        w_l0 = w_l0.transpose(0, 1).reshape(2 * h, c)
        per_atom = low_precision_linear(x0, w_l0, None, proj.precision, proj.precision_native).view(
            -1, 2, h
        )
        src, tgt = csr_both.idx[:, 0], csr_both.idx[:, 1]
        pre = per_atom[src, 0] + per_atom[tgt, 1] + proj.bias
        m = self.act(pre) * gate
        m = self.act(self.fc1_edge(m))
        rows, scale = identical_taps(res.lmax, res.mmax, res.taps_arg, m.dtype, m.device)
        w2 = fc2.weight.view(r, c, h)[rows].view(-1, h)
        b2 = fc2.bias.view(r, c)[rows].view(-1)
        z = low_precision_linear(m, w2, b2, fc2.precision, fc2.precision_native)
        z = self.act(z).view(-1, len(rows), c) * scale.view(1, -1, 1)
        msg = z.new_zeros((z.shape[0], 1, r, c))
        msg[:, 0, rows] = z
        return scatter_aggregation(msg, wig, csr_target, res.lmax, res.mmax, scatter_backend)


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
    ) -> torch.Tensor:
        """x (N, S, C) -> (N, S, C). ``degree0_input``: x is zero outside its l = 0 row (the first
        interaction); the fused message path then skips the work that zeros make redundant
        (:meth:`MessageBlock.forward_fused_invariant`)."""
        c, cr, s = self.sphere_channels, self.sphere_channels_reduce, self.sphere_basis
        ei = ctx.edge_index
        # The fused path computes the shared distance expansion once per forward (exact); the
        # reference path recomputes it in every block, as upstream does.
        basis = ctx.basis(self.distance_expansion) if ctx.dispatcher.use_fused else None
        x_edge = self.dist_block(
            ctx.edge_distance, atomic_numbers[ei[0]], atomic_numbers[ei[1]], basis
        )
        x_down = self.downsample(x.view(-1, c)) if c != cr else x
        x_down = x_down.view(-1, s, cr)
        x_new = x.new_zeros((x.shape[0], s, cr))
        for r, (res, block) in enumerate(zip(self.resolutions, self.message_blocks, strict=True)):
            lo, hi = ctx.span(r)
            rotate, scatter = _edge_backends(ctx.dispatcher, res, x, cr)
            if rotate == "reference":
                msg = block(
                    x_down[:, : res.sphere_basis, :], x_edge[lo:hi], ei[:, lo:hi], *ctx.dense(r)
                )
                x_new[:, : res.sphere_basis, :].index_add_(0, ei[1, lo:hi], msg.to(x_new.dtype))
            elif degree0_input:
                summed = block.forward_fused_invariant(
                    x_down[:, 0], x_edge[lo:hi], ctx.compact(r), *ctx.csr(r), scatter
                )
            else:
                summed = block.forward_fused(
                    x_down, x_edge[lo:hi], ctx.compact(r), *ctx.csr(r), rotate, scatter
                )
            if rotate != "reference":
                x_new[:, : res.sphere_basis, :] += summed
        if self.grid is not None:
            grid_backend = ctx.dispatcher.choose(
                OpRequest("grid_projection", x.device, x.dtype, self.grid.lmax, 0, 1, cr)
            )
            if grid_backend == "reference":
                g = torch.cat([self.grid.to_grid(x_down, cr), self.grid.to_grid(x_new, cr)], dim=1)
                g = self.act(self.fc1_sphere(g))
                g = self.act(self.fc2_sphere(g))
                x_new = self.grid.from_grid(self.fc3_sphere(g), cr)
            else:
                fc1 = self.fc1_sphere
                # bf16 units and the extension: native bf16 GEMMs inside the op; otherwise the
                # operands are rounded here (emulated) and the op's GEMMs run in float32.
                native_bf16 = (
                    fc1.precision == "bf16"
                    and fc1.precision_native
                    and grid_backend == "extension"
                    and x.dtype == torch.float32
                )
                p = "fp32" if native_bf16 else fc1.precision
                x_new = grid_projection(
                    gemm_operand(x_down, p),
                    gemm_operand(x_new, p),
                    *linear_operands(p, fc1, self.fc2_sphere, self.fc3_sphere),
                    lmax=self.grid.lmax,
                    num_bands=self.grid.num_bands,
                    backend=grid_backend,
                    bf16_gemms=native_bf16,
                )
        if c != cr:
            x_new = self.upsample(x_new.view(-1, cr))
        return x_new.view(-1, s, c)


def _edge_backends(
    dispatcher: Dispatcher, res: Resolution, x: torch.Tensor, channels: int
) -> tuple[str, str]:
    """Backends of (edge_rotation, scatter_aggregation) for one resolution. The fused message path
    needs both fused ops; if either falls back to the reference, both run the reference."""
    args = (x.device, x.dtype, res.lmax, res.mmax, res.num_taps, channels)
    rotate = dispatcher.choose(OpRequest("edge_rotation", *args))
    scatter = dispatcher.choose(OpRequest("scatter_aggregation", *args))
    if "reference" in (rotate, scatter) and rotate != scatter:
        why = "the fused message path needs both edge ops fused"
        rotate = dispatcher.fall_back("edge_rotation", why)
        scatter = dispatcher.fall_back("scatter_aggregation", why)
    return rotate, scatter


class SphericalChannelNetwork(nn.Module):
    """Spherical Channel Network, a drop-in for ``fairchem.core.models.scn.SphericalChannelNetwork``.

    Positional arguments follow ocpmodels (num_atoms, bond_feat_dim and num_targets are ignored).
    Keyword-only: fairchem's use_pbc_single, direct_forces, enforce_max_neighbors_strictly, and
    scn_fast's use_fused, backend ("auto", "reference", "triton", "extension"), precision ("fp32", "tf32", "bf16": GEMM operands rounded,
    float32 accumulation; scn_fast.precision),
    deterministic_frames (each edge frame's roll a pure function of its edge vector).

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
        self.dispatcher = Dispatcher(use_fused=use_fused, backend=backend)
        self.act = nn.SiLU()

        self.sphere_embedding = nn.Embedding(max_num_elements, sphere_channels)
        self.num_gaussians = int(cutoff / distance_resolution)
        self.distance_expansion = make_distance_expansion(
            distance_function, cutoff, self.num_gaussians, basis_width_scalar
        )
        if num_resolutions == 1:
            specs = [(lmax, hidden_channels, max_num_neighbors - 0.01)]
        else:
            specs = [
                (lmax, hidden_channels, 12 - 0.01),
                (max(4, lmax - 2), hidden_channels // 4, max_num_neighbors - 0.01),
            ]
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
        self._precision_applied: tuple[str, torch.device] | None = None

    def _apply_precision(self, device: torch.device) -> None:
        """Set the precision and implementation (native or emulated) of every Linear of the
        interaction blocks for ``device``. The output heads stay float32 in every mode: their
        forces are a mean over sphere points that cancels strongly (bf16 there moves max |F| by
        20-30%, measured on the golden t4b2_shaped config), and they are ~1% of the FLOPs."""
        if self._precision_applied == (self._precision, device):
            return
        native, why = gemm_support(self._precision, device)
        for module in self.edge_blocks.modules():
            if isinstance(module, Linear):
                module.precision, module.precision_native = self._precision, native
        self._precision_applied = (self._precision, device)
        self._precision_report = {
            "ran": f"{self._precision} {'native' if native else 'emulated'}",
            "refused": {} if native else {"native": why},
        }

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
        st, ctx = self.prepare(data)
        out = self.forward_context(st, ctx)
        if self.show_timing_info:
            logger.info("SCN forward: %d atoms, %.4f s", len(st.pos), time.perf_counter() - start)
        return out

    @torch.compiler.disable(
        reason="scn_fast: input checks, the radius graph, edge ranking, frames, rotations and "
        "backend choices run eagerly (data-dependent shapes); the blocks and heads are compiled"
    )
    def prepare(self, data: Any) -> tuple[Structure, EdgeContext]:
        """The eager part of ``forward``: the validated structure and its planned edge context
        (:meth:`planned_context`). The rest, :meth:`forward_context`, is tensor math and custom ops
        only, which ``torch.compile(model)`` captures as one graph."""
        st = self.read_input(data)
        return st, self.planned_context(st, self.generate_graph(data, st))

    def planned_context(self, st: Structure, graph: GraphData) -> EdgeContext:
        """:meth:`edge_context` with everything the blocks and heads would otherwise set up on the
        fly done now: the GEMM precision applied, every backend chosen (recorded for ``explain()``;
        inside a compiled region the dispatcher returns these decisions), the per-resolution
        rotations and edge groupings built, the constants cached for the model's dtype and device,
        and the atom and edge dimensions marked dynamic for torch.compile."""
        self._apply_precision(st.pos.device)
        ctx = self.edge_context(st, graph)
        like, cr = st.pos, self.sphere_channels_reduce
        for r, res in enumerate(self.resolutions):
            rotate, _ = _edge_backends(self.dispatcher, res, like, cr)
            if rotate == "reference":
                ctx.dense(r)
                res.mapping(like)
            else:
                ctx.compact(r)
                ctx.csr(r)
                combine_tables(res.lmax, res.mmax, res.taps_arg, like.dtype, like.device)
                identical_taps(res.lmax, res.mmax, res.taps_arg, like.dtype, like.device)
        if self.grid is not None:
            request = OpRequest(
                "grid_projection", like.device, like.dtype, self.grid.lmax, 0, 1, cr
            )
            if self.dispatcher.choose(request) == "reference":
                self.grid._mats(like)
            else:
                grid_constants(self.grid.lmax, self.grid.num_bands, like.dtype, like.device)
        self.dispatcher.choose(
            OpRequest(
                "output_heads", like.device, like.dtype, self.lmax, 0, 1, self.sphere_channels
            )
        )
        heads_constants(self.num_sphere_samples, self.lmax, like.dtype, like.device)
        _mark_sizes_dynamic(st, ctx)
        return ctx

    def edge_context(self, st: Structure, graph: GraphData) -> EdgeContext:
        """Rank edges per target by distance, group them by resolution (stable), build their frames
        (drawing the random rolls, unless deterministic_frames) and Wigner rotations."""
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
            self.dispatcher,
        )

    def forward_graph(self, st: Structure, graph: GraphData) -> dict[str, torch.Tensor]:
        """The model on a validated structure and its graph (``forward`` = read_input, generate_graph,
        forward_graph)."""
        return self.forward_context(st, self.planned_context(st, graph))

    def forward_context(self, st: Structure, ctx: EdgeContext) -> dict[str, torch.Tensor]:
        """The interaction blocks and heads on a planned edge context (:meth:`planned_context`):
        the region ``torch.compile(model)`` compiles."""
        z = st.atomic_numbers
        x = st.pos.new_zeros((len(z), self.sphere_basis, self.sphere_channels))
        x[:, 0, :] = self.sphere_embedding(z)
        for i, block in enumerate(self.edge_blocks):
            y = block(x, z, ctx, degree0_input=i == 0)
            x = x + y if i > 0 else y
        return self._heads(x, st)

    def _heads(self, x: torch.Tensor, st: Structure) -> dict[str, torch.Tensor]:
        """Energy: mean over sphere samples of an MLP on x's values there, summed per structure.
        Forces: the point-weighted mean of a second MLP's values."""
        p = self.num_sphere_samples
        heads_backend = self.dispatcher.choose(
            OpRequest("output_heads", x.device, x.dtype, self.lmax, 0, 1, self.sphere_channels)
        )
        if heads_backend != "reference":
            prec = self.energy_fc1.precision
            node_energy, forces = output_heads(
                gemm_operand(x, prec),
                num_points=p,
                lmax=self.lmax,
                energy=linear_operands(prec, self.energy_fc1, self.energy_fc2, self.energy_fc3),
                forces=linear_operands(prec, self.force_fc1, self.force_fc2, self.force_fc3)
                if self.regress_forces
                else None,
                backend=heads_backend,
            )
            out = {"energy": _per_structure_sum(node_energy, st)}
            if self.regress_forces:
                out["forces"] = forces
            return out
        y, _, pts = heads_constants(p, self.lmax, x.dtype, x.device)  # cached (planned_context)
        on_sphere = torch.einsum("abc,pb->apc", x, y).contiguous().view(-1, self.sphere_channels)
        e = self.act(self.energy_fc1(on_sphere))
        e = self.act(self.energy_fc2(e))
        e = self.energy_fc3(e).view(-1, p, 1)
        node_energy = torch.sum(e, dim=1) / p
        energy = _per_structure_sum(node_energy.view(-1), st)
        out = {"energy": energy}
        if self.regress_forces:
            f = self.act(self.force_fc1(on_sphere))
            f = self.act(self.force_fc2(f))
            f = self.force_fc3(f).view(-1, p, 1)
            out["forces"] = torch.sum(f * pts.view(1, p, 3), dim=1) / p
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
        """Per fused op: {"ran": backend or None, "refused": {backend: reason}} for the last call."""
        report = self.dispatcher.explain()
        if self._precision != "fp32" and self._precision_applied is not None:
            report["gemm_precision"] = dict(self._precision_report)
        return report

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _per_structure_sum(node_values: torch.Tensor, st: Structure) -> torch.Tensor:
    """(B,) sums of node_values (N,) per structure. scatter_add, not index_add: the same sums in
    the same order (bit-identical), but Inductor's CPU code generator fails on an index_add into
    a one-element output (torch 2.13), which a single structure is under torch.compile."""
    return node_values.new_zeros(len(st.natoms)).scatter_add(0, st.batch, node_values)


def _mark_sizes_dynamic(st: Structure, ctx: EdgeContext) -> None:
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


def _check_config(
    lmax: int,
    mmax: int,
    num_resolutions: int,
    num_bands: int,
    cutoff: float,
    distance_resolution: float,
    max_num_neighbors: int,
    direct_forces: bool,
    precision: str,
) -> None:
    if not 1 <= lmax <= 10:
        raise ValueError(f"lmax must be in 1..10, got {lmax}")
    if mmax not in (0, 1):
        raise ValueError(f"mmax must be 0 or 1, got {mmax}")
    if num_resolutions not in (1, 2):
        raise ValueError(f"num_resolutions must be 1 or 2, got {num_resolutions}")
    if num_resolutions == 2 and lmax < 4:
        raise ValueError(
            f"num_resolutions=2 uses lmax max(4, lmax-2) for far edges, which needs lmax >= 4; got {lmax}"
        )
    if not 1 <= num_bands <= lmax + 1:
        raise ValueError(f"num_bands must be in 1..lmax+1, got {num_bands}")
    if cutoff <= 0 or distance_resolution <= 0 or int(cutoff / distance_resolution) < 2:
        raise ValueError(
            f"cutoff ({cutoff}) / distance_resolution ({distance_resolution}) must give >= 2 basis functions"
        )
    if max_num_neighbors <= 0:
        raise ValueError(f"max_num_neighbors must be positive, got {max_num_neighbors}")
    if not direct_forces:
        raise ValueError(
            "direct_forces=False (forces as -dE/dx) is not supported: SCN predicts forces directly, "
            "and upstream SCN ignores this flag"
        )
    check_precision(precision)
    if not math.isfinite(cutoff):
        raise ValueError("cutoff must be finite")
