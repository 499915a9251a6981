"""Op level: the fused edge ops (edge_rotation, scatter_aggregation) of every backend against the
reference ops (dense rotations, index_add) and gradcheck in float64, through the public custom ops.

Backends run by name here, so a backend that cannot run fails the test (no silent fallback).
Triton runs in its interpreter on CPU (small shapes).
"""

from __future__ import annotations

import pytest
import torch

from scn_fast.ops import edge_csr, edge_layout, edge_rotation, scatter_aggregation
from scn_fast.ops import reference as ref_ops
from scn_fast.ops.backends import get_backend
from scn_fast.ops.layout import compact_wigner

from .conftest import TOL, rel_max_error

BACKENDS = ["extension", "triton"]


def _tol(dtype):
    return TOL["op_fp64"] if dtype == torch.float64 else TOL["op_fp32"]


def _problem(lmax, mmax, n, e, c, p, dtype, seed=0, extra_s=0):
    g = torch.Generator().manual_seed(seed)
    lay = edge_layout(lmax, mmax)
    x = torch.randn(n, lay.sphere_basis + extra_s, c, generator=g, dtype=torch.float64).to(dtype)
    frames = torch.linalg.qr(torch.randn(e, 3, 3, generator=g, dtype=torch.float64))[0]
    frames = frames * torch.linalg.det(frames).sign().view(-1, 1, 1)
    wig = compact_wigner(frames, lmax, mmax).to(dtype)
    # Node 0 never appears (a node with no edges), unless n == 1.
    lo = 1 if n > 1 else 0
    idx = torch.randint(lo, n, (e, p), generator=g)
    return x, wig, idx


CASES = [
    # lmax, mmax, n, e, c, p
    (1, 1, 5, 9, 1, 2),
    (4, 1, 7, 23, 3, 2),
    (6, 1, 6, 17, 17, 2),
    (6, 0, 4, 11, 5, 1),
    (10, 1, 3, 5, 2, 2),
    (3, 0, 4, 0, 3, 2),  # no edges
    (2, 1, 1, 4, 4, 1),  # a single atom
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(("lmax", "mmax", "n", "e", "c", "p"), CASES)
def test_ops_match_reference(backend, dtype, lmax, mmax, n, e, c, p):
    x, wig, idx = _problem(lmax, mmax, n, e, c, p, dtype, extra_s=3)
    csr = edge_csr(idx, n)
    y = edge_rotation(x, wig, csr, lmax, mmax, backend)
    y_ref = ref_ops.gather_rotate(x, wig, idx, lmax, mmax)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert rel_max_error(y, y_ref) <= _tol(dtype)

    m = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(
        dtype
    )
    out = scatter_aggregation(m, wig, csr, lmax, mmax, backend)
    out_ref = ref_ops.rotate_scatter(m, wig, idx, lmax, mmax, n)
    assert out.shape == out_ref.shape == (n, (lmax + 1) ** 2, c)
    assert rel_max_error(out, out_ref) <= _tol(dtype)
    if n > 1:
        assert torch.count_nonzero(out[0]) == 0  # node 0 has no edges


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_is_bit_identical_run_to_run(backend):
    _, wig, idx = _problem(6, 1, 6, 60, 7, 2, torch.float32, seed=3)
    csr = edge_csr(idx, 6)
    m = torch.randn(60, 2, edge_layout(6, 1).R, 7)
    first = scatter_aggregation(m, wig, csr, 6, 1, backend)
    for _ in range(3):
        assert torch.equal(scatter_aggregation(m, wig, csr, 6, 1, backend), first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("lmax", "mmax", "p"), [(2, 1, 2), (1, 0, 1)])
def test_gradcheck_float64(backend, lmax, mmax, p):
    """Small shapes: under Triton's interpreter each call costs ~0.1 s and gradcheck makes one per
    input element."""
    x, wig, idx = _problem(lmax, mmax, 3, 4, 1, p, torch.float64, seed=5, extra_s=1)
    csr = edge_csr(idx, 3)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x_: edge_rotation(x_, wig, csr, lmax, mmax, backend), (x,)
    )
    m = torch.randn(4, p, edge_layout(lmax, mmax).R, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda m_: scatter_aggregation(m_, wig, csr, lmax, mmax, backend), (m,)
    )


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="no backend 'cuda'"):
        get_backend("cuda")


def test_fake_implementations_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, wig, idx = _problem(4, 1, 5, 8, 3, 2, torch.float32)
    csr = edge_csr(idx, 5)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = edge_rotation(x, wig, csr, 4, 1, "extension")
        out = scatter_aggregation(y, wig, csr, 4, 1, "extension")
    assert tuple(y.shape) == (8, 2, 13, 3) and tuple(out.shape) == (5, 25, 3)
