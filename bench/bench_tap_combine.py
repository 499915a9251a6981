"""``tap_combine``: the message block's last activation and tap combination.

Reference (upstream): ``silu(z + b)`` on the fc2_edge output (E, T*R, C), then
``einsum("abc,bd->adc", ., mapping_y_rot)`` with the dense (T*R, R) tap mapping (a transposed copy
for a batched GEMM and a copy back). Fused: ``scn_fast.ops.tap_combine`` (bias + SiLU + the T signed
terms per output row in one pass; backward: SiLU' and the bias gradient in one pass), per backend.
Forward, and forward + backward w.r.t. z and the bias.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CHANNELS, DEVICES, E_EDGES, LMAXES, backend_params, op_step
from torch.nn.functional import silu

from scn_fast import so3
from scn_fast.ops.tap_combine import tap_combine


def _operands(lmax: int, device: str, grad: bool):
    mapping = so3.tap_set(lmax, 1, -1).mapping.float().to(device)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(E_EDGES, mapping.shape[0], CHANNELS, generator=gen).to(device)
    b = torch.randn(mapping.shape[1], CHANNELS, generator=gen).to(device)
    for t in (z, b):
        t.requires_grad_(grad)
    return mapping, z, b


def _run(run_op, device, lmax, direction, fn, label):
    mapping, z, b = _operands(lmax, device, direction != "fwd")
    grad = torch.randn(E_EDGES, mapping.shape[1], CHANNELS, device=device)

    call = op_step(direction, lambda: fn(z, b, mapping), [z, b], b, grad)
    run_op(call, device, f"tap_combine L{lmax} {direction} {device}")


def _upstream(z, b, mapping):
    t = mapping.shape[0] // mapping.shape[1]
    return torch.einsum("abc,bd->adc", silu(z + b.repeat(t, 1)), mapping)


@pytest.mark.parametrize("lmax", LMAXES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_reference(run_op, device, lmax, direction):
    _run(run_op, device, lmax, direction, _upstream, "reference")


@pytest.mark.parametrize("lmax", LMAXES)
@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_fused(run_op, device, backend, lmax, direction):
    _run(
        run_op,
        device,
        lmax,
        direction,
        lambda z, b, _m: tap_combine(z, b, lmax, 1, -1, backend),
        backend,
    )
