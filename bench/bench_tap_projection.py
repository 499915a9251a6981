"""``tap_projection`` / ``gated_tap_projection``: fc1_edge_proj over the 4 taps of every edge.

Reference (upstream): ``F.linear`` on the tap-expanded rotated features (E*T, 2*R*C) (materialised by
upstream's per-tap rotation) with W (H, 2*R*C), then ``silu(.) * gate``. Fused:
``scn_fast.ops.gated_tap_projection`` on the rotated features once per edge (E, 2, R, C), using the
tap symmetry ((5L+1)/(12L+4) of the GEMM FLOPs, exactly; docs/algebra.md) and the activation and
gate fused (per backend's elementwise kernels), with the weight in upstream's column order (read in
place by row-blocked GEMMs on CPU) or in tap order (the fused model's layout: two GEMMs on its column
blocks). Forward, and forward + backward w.r.t. the features, weight, bias and gate.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, HIDDEN, LMAXES, backend_params, edge_inputs, op_step
from torch.nn.functional import linear, silu

from scn_fast.ops import gated_tap_projection
from scn_fast.ops.layout import tap_symmetry
from scn_fast.ops.tap_projection import to_tap_order


def _operands(lmax: int, device: str, grad: bool):
    inp = edge_inputs(lmax, device)
    gen = torch.Generator().manual_seed(2)
    e, c, r = inp.edge_index.shape[1], inp.x.shape[-1], inp.R
    y = torch.randn(e, 2, r, c, generator=gen).to(device)
    w = (torch.randn(HIDDEN, 2 * r * c, generator=gen) / (2 * r * c) ** 0.5).to(device)
    b = torch.randn(HIDDEN, generator=gen).to(device)
    gate = torch.randn(e, HIDDEN, generator=gen).to(device)
    # Upstream's fc1_edge_proj input: tap t's rows are Q_t y (a signed row permutation per tap).
    q = tap_symmetry(lmax, inp.mmax, -1).q.to(device=device, dtype=y.dtype)  # (T, R, R)
    a = torch.einsum("trs,epsc->etprc", q, y).reshape(e * q.shape[0], 2 * r * c).contiguous()
    for t in (y, w, b, a, gate):
        t.requires_grad_(grad)
    return inp, y, w, b, a, gate


@pytest.mark.parametrize("lmax", LMAXES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_reference(run_op, device, lmax, direction):
    inp, _, w, b, a, gate = _operands(lmax, device, direction != "fwd")
    grad = torch.randn(a.shape[0] // inp.T, inp.T, HIDDEN, device=device)

    def reference() -> torch.Tensor:
        return silu(linear(a, w, b)).view(-1, inp.T, HIDDEN) * gate.unsqueeze(1)

    fn = op_step(direction, reference, [a, w, b, gate], w, grad)
    run_op(fn, device, f"tap_projection L{lmax} {direction} {device}")


@pytest.mark.parametrize("weight_order", ["upstream", "tap"])
@pytest.mark.parametrize("lmax", LMAXES)
@pytest.mark.parametrize(("device", "backend"), backend_params())
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_fused(run_op, device, backend, lmax, direction, weight_order):
    inp, y, w, b, _, gate = _operands(lmax, device, direction != "fwd")
    if weight_order == "tap":
        w = to_tap_order(w.detach(), lmax, inp.mmax, -1).requires_grad_(w.requires_grad)
    grad = torch.randn(y.shape[0], inp.T, HIDDEN, device=device)
    kw = {"backend": backend, "weight_order": weight_order}

    def fused() -> torch.Tensor:
        return gated_tap_projection(y, w, b, gate, lmax, inp.mmax, -1, **kw)

    fn = op_step(direction, fused, [y, w, b, gate], w, grad)
    run_op(fn, device, f"tap_projection L{lmax} {direction} {device}")
