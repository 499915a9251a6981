"""The extension's CPU kernels exist as AVX-512, AVX2 and baseline clones picked at run time
(csrc/cpu/cpu_isa.h). Capping the ISA runs each clone on this machine: every one must match the
reference, with vector bodies and scalar tails (channel counts that are not multiples of 8 or 16).
tap_combine's clones are checked in test_tap_combine.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scn_fast.ops import edge_csr, edge_rotation, gated_tap_projection, scatter_aggregation
from scn_fast.ops import grid_projection as gp
from scn_fast.ops import reference as ref_ops
from scn_fast.ops.layout import compact_wigner

from .conftest import TOL, rel_max_error

CAPS = [2, 1, 0]


@pytest.mark.parametrize("cap", CAPS)
def test_edge_ops_every_clone(isa_cap, cap):
    isa_cap(cap)
    g = torch.Generator().manual_seed(cap)
    n, e, c, lmax, mmax = 6, 21, 19, 6, 1
    x = torch.randn(n, 49, c, generator=g)
    frames = torch.linalg.qr(torch.randn(e, 3, 3, generator=g, dtype=torch.float64))[0]
    frames = frames * torch.linalg.det(frames).sign().view(-1, 1, 1)
    wig = compact_wigner(frames, lmax, mmax).float()
    idx = torch.randint(0, n, (e, 2), generator=g)
    csr = edge_csr(idx, n)
    y = edge_rotation(x, wig, csr, lmax, mmax, "extension")
    assert rel_max_error(y, ref_ops.gather_rotate(x, wig, idx, lmax, mmax)) <= TOL["op_fp32"]
    m = torch.randn(y.shape, generator=g)
    out = scatter_aggregation(m, wig, csr, lmax, mmax, "extension")
    want = ref_ops.rotate_scatter(m, wig, idx, lmax, mmax, n)
    assert rel_max_error(out, want) <= TOL["op_fp32"]


@pytest.mark.parametrize("cap", CAPS)
def test_tap_gate_every_clone(isa_cap, cap):
    """SiLU(A +- B) x gate and its backward (H = 21: vector body and tail) against ATen ops."""
    isa_cap(cap)
    g = torch.Generator().manual_seed(10 + cap)
    y = torch.randn(7, 2, 19, 4, generator=g)
    w = torch.randn(21, 2 * 19 * 4, generator=g) / 10
    b = torch.randn(21, generator=g)
    gate = torch.randn(7, 21, generator=g)
    dout = torch.randn(7, 4, 21, generator=g)
    grads = {}
    for backend in ("extension", "reference"):
        args = [t.clone().requires_grad_() for t in (y, w, b, gate)]
        out = gated_tap_projection(*args, 6, 1, -1, backend=backend)
        out.backward(dout)
        grads[backend] = [out.detach(), *(a.grad for a in args)]
    for got, want in zip(grads["extension"], grads["reference"], strict=True):
        assert rel_max_error(got, want) <= TOL["op_fp32"]


@pytest.mark.parametrize("save", [False, True], ids=["recompute", "saved"])
@pytest.mark.parametrize("cap", CAPS)
def test_grid_every_clone(isa_cap, cap, save):
    """bias + SiLU and SiLU' + column sums of the grid MLP (2bC = 36 columns) against upstream's
    computation, forward and every gradient."""
    isa_cap(cap)
    torch.manual_seed(20 + cap)
    lmax, bands, channels, atoms = 2, 2, 9, 5
    fc1, fc2 = nn.Linear(36, 36), nn.Linear(36, 18)
    fc3 = nn.Linear(18, 9)
    xd = torch.randn(atoms, 9, channels, requires_grad=True)
    xn = torch.randn(atoms, 9, channels, requires_grad=True)
    params = [xd, xn, *(t for m in (fc1, fc2, fc3) for t in (m.weight, m.bias))]
    outs = {}
    for backend in ("extension", "reference"):
        kw = {"save_activations": save} if backend == "extension" else {}
        out = gp.grid_mlp(
            xd, xn, fc1, fc2, fc3, lmax=lmax, num_bands=bands, backend=backend, tile_atoms=2, **kw
        )
        gout = torch.ones_like(out)
        outs[backend] = [out.detach(), *torch.autograd.grad(out, params, gout)]
    for got, want in zip(outs["extension"], outs["reference"], strict=True):
        assert rel_max_error(got, want) <= TOL["op_fp32"]
