"""The grid MLP and the output heads as the plan says: the model's entry points for them.

:func:`grid` runs an EdgeBlock's ``fc1_sphere -> fc2_sphere -> fc3_sphere`` on the sphere grid
(``grid_projection``), :func:`heads` the energy and force heads (``output_heads``); the backend,
tile size, saved activations, native bf16 GEMMs and operand rounding are the plan's
(``scn_fast.planning``), the reference backend upstream's math (``ops.reference``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..precision import gemm_operand, linear_operands
from . import reference
from .grid_projection import grid_projection
from .output_heads import heads_constants, output_heads

if TYPE_CHECKING:
    from ..planning import Plan


def grid(block, x_down: torch.Tensor, x_new: torch.Tensor, plan: Plan) -> torch.Tensor:
    """FromGrid(fc3(silu(fc2(silu(fc1([ToGrid(x_down) | ToGrid(x_new)])))))) (N, S, C') of
    x_down, x_new (N, S, C'); ``block``: the EdgeBlock (grid, fc1_sphere, fc2_sphere,
    fc3_sphere, act)."""
    op = plan["grid_projection"]
    fc = (block.fc1_sphere, block.fc2_sphere, block.fc3_sphere)
    if op.ran == "reference":
        return reference.grid_mlp(block.grid, x_down, x_new, *fc, block.act)
    v = op.variant
    p = v["operands"]  # rounded here unless the op's own GEMMs are native bf16
    return grid_projection(
        gemm_operand(x_down, p),
        gemm_operand(x_new, p),
        *linear_operands(p, *fc),
        lmax=block.grid.lmax,
        num_bands=block.grid.num_bands,
        backend=op.ran,
        tile_atoms=v["tile_atoms"],
        bf16_gemms=v["bf16_gemms"],
        save_activations=v["saved_activations"],
        precision=v["precision"],
    )


def heads(model, x: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(node energies (N,), forces (N, 3) or None without regress_forces) of x (N, S, C);
    ``model``: the network (energy_fc1..3, force_fc1..3, act, num_sphere_samples, lmax)."""
    op = plan["output_heads"]
    energy = (model.energy_fc1, model.energy_fc2, model.energy_fc3)
    forces = (model.force_fc1, model.force_fc2, model.force_fc3) if model.regress_forces else None
    p, lmax = model.num_sphere_samples, model.lmax
    if op.ran == "reference":
        sh, _, pts = heads_constants(p, lmax, x.dtype, x.device)
        return reference.heads(x, sh, pts, energy, forces, model.act)
    prec = op.variant["precision"]
    return output_heads(
        gemm_operand(x, prec),
        num_points=p,
        lmax=lmax,
        energy=linear_operands(prec, *energy),
        forces=linear_operands(prec, *forces) if forces is not None else None,
        backend=op.ran,
        tile_atoms=op.variant["tile_atoms"],
        precision=prec,
    )
