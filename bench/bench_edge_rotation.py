"""``edge_rotation``: gather node features at both edge endpoints and rotate them into the edge frames.

Reference (upstream): per side, ``x[idx]`` repeated over the 4 taps, then ``torch.bmm`` with the dense
(E*T, R, S) Wigner rows: (E*T, R, C) per side. Fused: ``scn_fast.ops.edge_rotation`` with the compact
rows, once per edge (the taps are signed permutations, handled by ``tap_projection``): (E, 2, R, C).
Forward, and forward + backward w.r.t. x.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, LMAXES, backend_params, edge_inputs, op_step

from scn_fast.ops import edge_rotation


def reference_rotation(x: torch.Tensor, inp) -> torch.Tensor:
    """Upstream's rotation: (E*T, 2*R*C), the input of fc1_edge_proj."""
    t, s, c = inp.T, inp.S, x.shape[-1]
    rotated = []
    for side in (0, 1):
        xs = x[inp.edge_index[side]]
        xs = xs.view(-1, 1, s, c).repeat(1, t, 1, 1).view(-1, s, c)
        rotated.append(torch.bmm(inp.wigner, xs).view(-1, inp.R * c))
    return torch.cat(rotated, dim=1)


@pytest.mark.parametrize("lmax", LMAXES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_reference(run_op, device, lmax, direction):
    inp = edge_inputs(lmax, device)
    x = inp.x.clone().requires_grad_(direction != "fwd")
    grad = torch.randn(inp.edge_index.shape[1] * inp.T, 2 * inp.R * x.shape[-1], device=device)

    fn = op_step(direction, lambda: reference_rotation(x, inp), [x], x, grad)
    run_op(fn, device, f"edge_rotation L{lmax} {direction} {device}")


@pytest.mark.parametrize("lmax", LMAXES)
@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_fused(run_op, device, backend, lmax, direction):
    inp = edge_inputs(lmax, device)
    x = inp.x.clone().requires_grad_(direction != "fwd")
    grad = torch.randn(inp.edge_index.shape[1], 2, inp.R, x.shape[-1], device=device)

    def fused() -> torch.Tensor:
        return edge_rotation(x, inp.wig, inp.csr_both, lmax, inp.mmax, backend)

    fn = op_step(direction, fused, [x], x, grad)
    run_op(fn, device, f"edge_rotation L{lmax} {direction} {device}")
