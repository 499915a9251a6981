"""The message path of one resolution, as the plan says: one entry point for the model.

:func:`messages` adds resolution r's messages, summed into their target atoms, to ``out``
(N, S_L, C'). Which code computes them is the plan's (``scn_fast.planning``), never this module's:

* reference (``plan["edge_rotation"].ran == "reference"``): upstream's dense math
  (``ops.reference.messages``), per edge, then ``index_add_`` into the targets;
* fused, degree-0 input (the first interaction, variant ``degree0_input``): :func:`_degree0`;
* fused (:func:`_general`): ``edge_rotation`` (or the split rotation) -> ``gated_tap_projection``
  -> fc1_edge -> fc2_edge (variant ``fc2``) -> ``tap_combine`` -> ``scatter_aggregation``.

x (N, S, C') the block input (down-projected), x_edge (E_r, K) resolution r's edge features. The
edge MLP's Linear layers run as ``plan.edge_mlp`` says (``ops.edge_linear``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ..precision import low_precision_linear
from . import reference
from .edge_csr import EdgeCSR
from .edge_linear import linear_act, linear_act_weights
from .edge_rotation import edge_rotation, edge_rotation_split
from .grid_projection import grid_constants
from .output_heads import heads_constants
from .scatter_aggregation import scatter_aggregation
from .silu_linear import silu_mm
from .tap_combine import combine_tables, identical_taps, tap_combine
from .tap_projection import (
    gated_tap_projection,
    gated_tap_projection_split,
    has_tap_order,
    scratch,
    tap_rows,
)

if TYPE_CHECKING:
    from ..context import EdgeContext
    from ..planning import Plan


def messages(
    block,
    x: torch.Tensor,
    x_edge: torch.Tensor,
    edges: EdgeContext,
    r: int,
    out: torch.Tensor,
    degree0_input: bool = False,
) -> None:
    """out (N, S_L, C') += resolution r's messages summed into their targets (module doc).
    ``block``: the resolution's layers (``MessageBlock``: fc1_dist, fc1_edge_proj, fc1_edge,
    fc2_edge, act, res); x_edge (E_r, K): resolution r's edge features (``EdgeContext.split``);
    ``degree0_input``: x is zero outside its l = 0 row."""
    plan, res = edges.plan, block.res
    if not plan.fused_messages:
        lo, hi = edges.span(r)
        ei = edges.edge_index[:, lo:hi]
        msg = reference.messages(
            block, x[:, : res.sphere_basis], x_edge, ei, *edges.dense(r), res.mapping(x)
        )
        out.index_add_(0, ei[1], msg.to(out.dtype))
        return
    degree0 = degree0_input and plan["edge_rotation"].variant["degree0_input"]
    fn, inp = (_degree0, _degree0_atoms(block, x[:, 0], plan)) if degree0 else (_general, x)
    chunks = edges.chunks(r)
    if chunks is None:
        wig, (both, target) = edges.compact(r), edges.csr(r)
        out += _run(fn, (block, inp, x_edge, wig, both, target, plan), plan)
        return
    # target-aligned edge chunks (``EdgeContext.chunks``): each chunk's messages sum into its
    # own targets' rows
    for ch in chunks:
        args = (block, inp, x_edge[ch.edges], ch.wig, ch.both, ch.target, plan)
        out[ch.t0 : ch.t1] += _run(fn, args, plan)


def _run(fn, args: tuple, plan: Plan) -> torch.Tensor:
    """fn(*args), under activation checkpointing when the plan says so (variant ``checkpoint``:
    only the inputs are kept, the backward recomputes the messages) and autograd records."""
    if plan.checkpointed and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _general(
    block, x, x_edge, wig: torch.Tensor, both: EdgeCSR, target: EdgeCSR, plan: Plan
) -> torch.Tensor:
    """The fused messages, already summed into their targets: x (N, S, C'), x_edge (E, K), wig
    (E, K_w) compact rotations -> (N_t, S_L, C'), N_t the rows of ``target`` (all N atoms, or a
    chunk's targets)."""
    res, c, h = block.res, block.sphere_channels_reduce, block.hidden_channels
    rotate, proj_plan, comb = (
        plan["edge_rotation"],
        plan["gated_tap_projection"],
        plan["tap_combine"],
    )
    pv, cv = proj_plan.variant, comb.variant
    impl, prec = plan.edge_mlp
    gate = linear_act(block.fc1_dist, x_edge, True, impl, prec)
    proj, fc2 = block.fc1_edge_proj, block.fc2_edge
    if rotate.variant["split_rotation"]:
        # the rotation writes fc1_edge_proj's two GEMM operands itself (no split pass over y)
        rows = tap_rows(res.lmax, res.mmax, res.taps_arg, x.device)
        y0, pair = edge_rotation_split(x, wig, both, res.lmax, res.mmax, rows)
        m = gated_tap_projection_split(y0, pair, proj.weight, proj.bias, gate, proj_plan.ran)
    else:
        y = edge_rotation(x, wig, both, res.lmax, res.mmax, rotate.ran)
        m = gated_tap_projection(
            y,
            proj.weight,
            proj.bias,
            gate,
            res.lmax,
            res.mmax,
            res.taps_arg,
            pv["precision"],
            pv["native"],
            proj_plan.ran,
            weight_order=pv["weight_order"],
            gemm=pv["gemm"],
        )
    m = linear_act(block.fc1_edge, m.view(-1, h), False, impl, prec)
    if cv["fc2"] == "scratch":
        # no autograd: SiLU in place, fc2_edge into a block that tap_combine reads at once and
        # that comes back for the next block (measured: ~1% of an inference step at 14 atoms)
        m = F.silu(m, inplace=True)
        z = scratch((m.shape[0], fc2.out_features), m.dtype, m.device, comb.ran)
        torch.mm(m, fc2.weight.t(), out=z)
    elif cv["fc2"] == "silu_mm":
        z = silu_mm(m, fc2.weight, impl, prec)  # keeps only SiLU's input for the backward
    else:
        m = block.act(m) if plan.mode.grad or plan.mode.compiled else F.silu(m, inplace=True)
        z = fc2.matmul(m, keep_bf16=cv["bf16_input"])
    z = z.view(-1, res.num_taps * res.sphere_basis_reduce, c)
    bias = fc2.bias.view(res.sphere_basis_reduce, c)
    m = tap_combine(z, bias, res.lmax, res.mmax, res.taps_arg, comb.ran)
    m = m.view(-1, 1, res.sphere_basis_reduce, c)
    scatter = plan["scatter_aggregation"].ran
    return scatter_aggregation(m, wig, target, res.lmax, res.mmax, scatter)


def _degree0_atoms(block, x0: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The per-atom half of :func:`_degree0`: fc1_edge_proj's two l = 0 column blocks applied to
    x0 (N, C'), the l = 0 row of the block input -> (N, 2, H) (source side, target side)."""
    res, c, h = block.res, block.sphere_channels_reduce, block.hidden_channels
    r = res.sphere_basis_reduce
    pv = plan["gated_tap_projection"].variant
    proj = block.fc1_edge_proj
    # fc1_edge_proj's input columns are (side, row, channel): the l = 0 row of both sides, at
    # rows 0 and R in upstream's order, 0 and R0 in tap order (the m = 0 rows of each side first)
    second = res.lmax + 1 if pv["weight_order"] == "tap" else r
    w_l0 = proj.weight.view(h, 2 * r, c)[:, 0 : second + 1 : second]
    w_l0 = w_l0.transpose(0, 1).reshape(2 * h, c)
    return low_precision_linear(x0, w_l0, None, pv["precision"], pv["native"]).view(-1, 2, h)


def _degree0(
    block, per_atom, x_edge, wig: torch.Tensor, both: EdgeCSR, target: EdgeCSR, plan: Plan
) -> torch.Tensor:
    """:func:`_general` for an input of degree 0 alone (the first interaction, whose x holds the atom
    embeddings in its l = 0 row and zeros elsewhere): per_atom (N, 2, H) fc1_edge_proj's l = 0
    blocks applied to that row (:func:`_degree0_atoms`) -> (N_t, S_L, C'), the same messages (up
    to rounding) with a fraction of the work (docs/algebra.md).

    Every rotation is the identity on degree 0 and maps zeros to zeros, so every tap's rotated
    input is [x0[src], 0, ..., x0[tgt], 0, ...]: fc1_edge_proj reduces to its two l = 0 column
    blocks, applied per atom (N rows, not 4E) and gathered per edge; the taps are equal, so
    fc1_edge and fc2_edge run once per edge (E rows, not 4E); equal taps combine row by row
    (``identical_taps``: the m = +-1 rows cancel for 4 taps), so fc2_edge only computes the
    rows that survive. No edge rotation runs; the rotation back and the sum into targets do."""
    res, c, h = block.res, block.sphere_channels_reduce, block.hidden_channels
    r = res.sphere_basis_reduce
    pv = plan["gated_tap_projection"].variant
    impl, prec = plan.edge_mlp
    gate = linear_act(block.fc1_dist, x_edge, True, impl, prec)
    proj, fc2 = block.fc1_edge_proj, block.fc2_edge
    src, tgt = both.idx[:, 0], both.idx[:, 1]
    pre = per_atom[src, 0] + per_atom[tgt, 1] + proj.bias
    m = block.act(pre) * gate
    m = linear_act(block.fc1_edge, m, True, impl, prec)
    rows, scale = identical_taps(res.lmax, res.mmax, res.taps_arg, m.dtype, m.device)
    w2 = fc2.weight.view(r, c, h)[rows].view(-1, h)
    b2 = fc2.bias.view(r, c)[rows].view(-1)
    z = linear_act_weights(m, w2, b2, True, impl, prec, pv["native"])
    z = z.view(-1, len(rows), c) * scale.view(1, -1, 1)
    msg = z.new_zeros((z.shape[0], 1, r, c))
    msg[:, 0, rows] = z
    scatter = plan["scatter_aggregation"].ran
    return scatter_aggregation(msg, wig, target, res.lmax, res.mmax, scatter)


def prepare_constants(edges: EdgeContext, grid, num_points: int, lmax: int) -> None:
    """Build, eagerly, every constant the planned forward will read (rotations, edge groupings,
    tap tables, grid and head matrices in the model's dtype and device), so that the region
    ``torch.compile`` captures only reads caches."""
    plan = edges.plan
    like = torch.empty(0, dtype=plan.dtype, device=edges.frames.device)
    for r, res in enumerate(edges.resolutions):
        if not plan.fused_messages:
            edges.dense(r)
            res.mapping(like)
            continue
        edges.compact(r)
        edges.csr(r)
        edges.chunks(r)
        combine_tables(res.lmax, res.mmax, res.taps_arg, like.dtype, like.device)
        identical_taps(res.lmax, res.mmax, res.taps_arg, like.dtype, like.device)
        if has_tap_order(res.lmax, res.mmax, res.taps_arg):  # the 4-tap projection's row tables
            tap_rows(res.lmax, res.mmax, res.taps_arg, like.device)
    if grid is not None:
        if plan["grid_projection"].ran == "reference":
            grid._mats(like)
        else:
            grid_constants(grid.lmax, grid.num_bands, like.dtype, like.device)
    heads_constants(num_points, lmax, like.dtype, like.device)
