"""Op level: tap_projection (fc1_edge_proj over all taps via the tap symmetry) against upstream's way
(every tap's rotated copy through the full linear map), gradcheck, and the tap identities."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import linear

from scn_fast.frames import edge_frames
from scn_fast.model import Resolution
from scn_fast.ops import compact_wigner, edge_layout, tap_projection, tap_symmetry
from scn_fast.ops.layout import dense_from_compact

from .conftest import TOL, rel_max_error

CONFIGS = [(6, 1, -1), (4, 1, -1), (3, 0, -1), (5, 1, 1), (1, 1, -1), (10, 1, -1)]


def _upstream_taps(y, weight, bias, sym):
    """Upstream: pre[:, t] = fc1_edge_proj([Q_t y_src, Q_t y_tgt]) for every tap t."""
    q = sym.q.to(y.dtype)
    e = y.shape[0]
    return torch.stack(
        [
            linear(torch.einsum("rs,epsc->eprc", q[t], y).reshape(e, -1), weight, bias)
            for t in range(sym.num_taps)
        ],
        dim=1,
    )


@pytest.mark.parametrize(("lmax", "mmax", "num_taps"), CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_every_tap_through_the_full_weight(lmax, mmax, num_taps, dtype):
    sym = tap_symmetry(lmax, mmax, num_taps)
    r = edge_layout(lmax, mmax).R
    g = torch.Generator().manual_seed(lmax)
    y = torch.randn(13, 2, r, 5, generator=g, dtype=dtype)
    weight = torch.randn(9, 2 * r * 5, generator=g, dtype=dtype)
    bias = torch.randn(9, generator=g, dtype=dtype)
    out = tap_projection(y, weight, bias, lmax, mmax, num_taps)
    ref = _upstream_taps(y.double(), weight.double(), bias.double(), sym)
    assert out.shape == (13, sym.num_taps, 9) and out.dtype == dtype
    assert rel_max_error(out, ref) <= (TOL["op_fp64"] if dtype == torch.float64 else TOL["op_fp32"])


@pytest.mark.parametrize(("lmax", "mmax", "num_taps"), [(2, 1, -1), (2, 0, -1), (3, 1, 1)])
def test_gradcheck_float64(lmax, mmax, num_taps):
    r = edge_layout(lmax, mmax).R
    y = torch.randn(4, 2, r, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2 * r * 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: tap_projection(*a, lmax, mmax, num_taps), (y, weight, bias)
    )


@pytest.mark.parametrize(("lmax", "mmax", "num_taps"), CONFIGS)
def test_taps_are_signed_permutations_of_tap_zero(lmax, mmax, num_taps):
    """W_t(e) = Q_t W_0(e) against upstream's own per-tap Wigner rows, in float64."""
    frames = edge_frames(torch.randn(40, 3, dtype=torch.float64))
    res = Resolution(lmax, mmax, num_taps, 8, 1.0)
    dense, _ = res.wigner(frames)
    dense = dense.view(40, res.num_taps, res.sphere_basis_reduce, res.sphere_basis)
    w0 = dense_from_compact(compact_wigner(frames, lmax, mmax), lmax, mmax)
    sym = tap_symmetry(lmax, mmax, num_taps)
    for t in range(res.num_taps):
        torch.testing.assert_close(dense[:, t], sym.q[t] @ w0, rtol=0, atol=1e-13)


def test_four_taps_use_41_percent_of_the_flops():
    """(R0 + 2 R1) / (4 R) = (5L + 1) / (12L + 4): 31/76 = 0.408 at L = 6."""
    sym, r = tap_symmetry(6, 1, -1), edge_layout(6, 1).R
    assert (len(sym.rows0) + 2 * len(sym.rows1)) / (4 * r) == pytest.approx(31 / 76)
