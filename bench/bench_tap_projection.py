"""``tap_projection``: fc1_edge_proj over the 4 taps of every edge.

Reference (upstream): ``F.linear`` on the tap-expanded rotated features (E*T, 2*R*C) (materialised by
upstream's per-tap rotation) with W (H, 2*R*C). Fused: ``scn_fast.ops.tap_projection`` on the rotated
features once per edge (E, 2, R, C), using the tap symmetry: (5L+1)/(12L+4) of the GEMM FLOPs, exactly
(DESIGN.md section 3). Pure PyTorch (no backend choice). Forward, and forward + backward w.r.t. the
features, weight and bias.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, HIDDEN, LMAXES, edge_inputs

from scn_fast.ops import tap_projection
from scn_fast.ops.layout import tap_symmetry


def _operands(lmax: int, device: str, grad: bool):
    inp = edge_inputs(lmax, device)
    gen = torch.Generator().manual_seed(2)
    e, c, r = inp.edge_index.shape[1], inp.x.shape[-1], inp.R
    y = torch.randn(e, 2, r, c, generator=gen).to(device)
    w = (torch.randn(HIDDEN, 2 * r * c, generator=gen) / (2 * r * c) ** 0.5).to(device)
    b = torch.randn(HIDDEN, generator=gen).to(device)
    # Upstream's fc1_edge_proj input: tap t's rows are Q_t y (a signed row permutation per tap).
    q = tap_symmetry(lmax, inp.mmax, -1).q.to(device=device, dtype=y.dtype)  # (T, R, R)
    a = torch.einsum("trs,epsc->etprc", q, y).reshape(e * q.shape[0], 2 * r * c).contiguous()
    for t in (y, w, b, a):
        t.requires_grad_(grad)
    return inp, y, w, b, a


@pytest.mark.parametrize("lmax", LMAXES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_reference(run_op, device, lmax, direction):
    _, _, w, b, a = _operands(lmax, device, direction != "fwd")
    grad = torch.randn(a.shape[0], HIDDEN, device=device)

    def fn():
        if direction == "fwd":
            with torch.no_grad():
                return torch.nn.functional.linear(a, w, b)
        a.grad = w.grad = b.grad = None
        torch.nn.functional.linear(a, w, b).backward(grad)
        return w.grad

    run_op(fn, device, f"tap_projection L{lmax} {direction} {device}")


@pytest.mark.parametrize("lmax", LMAXES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_fused(run_op, device, lmax, direction):
    inp, y, w, b, _ = _operands(lmax, device, direction != "fwd")
    grad = torch.randn(y.shape[0], inp.T, HIDDEN, device=device)

    def fn():
        if direction == "fwd":
            with torch.no_grad():
                return tap_projection(y, w, b, lmax, inp.mmax, -1)
        y.grad = w.grad = b.grad = None
        tap_projection(y, w, b, lmax, inp.mmax, -1).backward(grad)
        return w.grad

    run_op(fn, device, f"tap_projection L{lmax} {direction} {device}")
