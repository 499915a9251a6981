"""``scatter_aggregation``: combine the taps, rotate messages back from the edge frames, sum into atoms.

Reference (upstream): messages (E, T*R, C) combined with the (T*R, R) tap mapping, ``torch.bmm`` with
the dense inverse rotation (E, S, R), then ``index_add_`` into (N, S, C) by target atom (and, when
torch_scatter is importable, the same with ``torch_scatter.scatter_sum`` instead of ``index_add_``).
Fused: the same tap mapping, then ``scn_fast.ops.scatter_aggregation`` (compact rows, CSR segment sum,
no atomics). Forward, and forward + backward w.r.t. the messages.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import DEVICES, LMAXES, N_ATOMS, backend_params, edge_inputs, op_step

from scn_fast.ops import scatter_aggregation

HAS_TORCH_SCATTER = importlib.util.find_spec("torch_scatter") is not None


def _combine_taps(m: torch.Tensor, inp) -> torch.Tensor:
    return torch.einsum("abc,bd->adc", m, inp.res.mapping(m)).contiguous()  # (E, R, C)


def reference_scatter(m: torch.Tensor, inp, reduce: str = "index_add") -> torch.Tensor:
    """Upstream: tap combination, dense back-rotation, sum into target atoms."""
    msg = torch.bmm(inp.wigner_inv, _combine_taps(m, inp))  # (E, S, C)
    target = inp.edge_index[1]
    if reduce == "torch_scatter":
        from torch_scatter import scatter_sum

        return scatter_sum(msg, target, dim=0, dim_size=N_ATOMS)
    out = msg.new_zeros((N_ATOMS, *msg.shape[1:]))
    return out.index_add_(0, target, msg)


def _messages(inp, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    e, c = inp.edge_index.shape[1], inp.x.shape[-1]
    return torch.randn(e, inp.T * inp.R, c, generator=gen).to(device)


@pytest.mark.parametrize("lmax", LMAXES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("reduce", ["index_add", "torch_scatter"])
def test_reference(run_op, device, lmax, direction, reduce):
    if reduce == "torch_scatter" and not HAS_TORCH_SCATTER:
        pytest.skip("torch_scatter is not installed")
    inp = edge_inputs(lmax, device)
    m = _messages(inp, device).requires_grad_(direction != "fwd")
    grad = torch.randn(N_ATOMS, inp.S, m.shape[-1], device=device)

    fn = op_step(direction, lambda: reference_scatter(m, inp, reduce), [m], m, grad)
    run_op(fn, device, f"scatter_aggregation L{lmax} {direction} {device}")


@pytest.mark.parametrize("lmax", LMAXES)
@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_fused(run_op, device, backend, lmax, direction):
    inp = edge_inputs(lmax, device)
    m = _messages(inp, device).requires_grad_(direction != "fwd")
    grad = torch.randn(N_ATOMS, inp.S, m.shape[-1], device=device)

    def fused(m: torch.Tensor) -> torch.Tensor:
        combined = _combine_taps(m, inp).view(-1, 1, inp.R, m.shape[-1])
        return scatter_aggregation(combined, inp.wig, inp.csr_target, lmax, inp.mmax, backend)

    fn = op_step(direction, lambda: fused(m), [m], m, grad)
    run_op(fn, device, f"scatter_aggregation L{lmax} {direction} {device}")
