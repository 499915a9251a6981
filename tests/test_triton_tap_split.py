"""The Triton split of the 4-tap projection's input and its adjoint (``kernels/tap_elementwise.py``
``tap_split`` / ``tap_assemble``, one launch each instead of two gathers and a sign pass, and five
ATen passes), in Triton's interpreter: against the ATen gathers they replace, and through
``gated_tap_projection`` with the GEMM strategies a GPU plan uses ("tap_ordered", "gathered"),
with gradcheck in float64 (zero edges included)."""

from __future__ import annotations

import importlib

import pytest
import torch
from scn_fast.kernels import tap_elementwise
from torch.nn.functional import silu

from scn_fast.ops import edge_layout, gated_tap_projection, tap_symmetry
from scn_fast.ops.tap_projection import to_tap_order
from scn_fast.ops.tap_rows import tap_rows

from .conftest import TOL, rel_max_error

tb = importlib.import_module("scn_fast.ops.tap_buffers")
DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize(("lmax", "edges"), [(1, 5), (4, 7), (6, 3), (4, 0)])
def test_triton_tap_split_matches_the_gathers_and_assemble_is_its_adjoint(lmax, edges, dtype):
    rows = tap_rows(lmax, 1, -1, torch.device("cpu"))
    r = edge_layout(lmax, 1).R
    gen = torch.Generator().manual_seed(lmax)
    y3 = torch.randn(edges, 2 * r, 5, generator=gen, dtype=torch.float64).to(dtype)
    y0, pair = tap_elementwise.tap_split(y3, rows.y0_rows, rows.pair_rows, rows.pair_signs)
    want0, want_pair = tb._split_input(y3.view(edges, 2, r, 5), rows, dtype, "reference")
    assert torch.equal(y0.reshape(edges, rows.n0 * 5), want0)
    assert torch.equal(pair.reshape(2 * edges, rows.n1 * 5), want_pair)
    g0 = torch.randn(y0.shape, generator=gen, dtype=torch.float64).to(dtype)
    gp = torch.randn(pair.shape, generator=gen, dtype=torch.float64).to(dtype)
    dy = tap_elementwise.tap_assemble(g0, gp, rows.assemble_a, rows.assemble_b, rows.assemble_sign)
    assert dy.shape == y3.shape
    torch.testing.assert_close(dy, tb._assemble(g0, gp.clone(), rows, "reference"), rtol=0, atol=0)
    lhs = (y0.double() * g0.double()).sum() + (pair.double() * gp.double()).sum()
    torch.testing.assert_close(lhs, (y3.double() * dy.double()).sum())


def test_triton_tap_split_checks_its_tables():
    rows = tap_rows(2, 1, -1, torch.device("cpu"))
    y3 = torch.randn(3, 2 * edge_layout(2, 1).R, 4)
    with pytest.raises(ValueError, match=r"pair_signs must be a contiguous torch\.float64"):
        tap_elementwise.tap_split(y3, rows.y0_rows, rows.pair_rows, rows.pair_signs.float())
    with pytest.raises(ValueError, match=r"y0_rows must be a contiguous torch\.int64"):
        tap_elementwise.tap_split(y3, rows.y0_rows.int(), rows.pair_rows, rows.pair_signs)


def _inputs(lmax, e, c, h, dtype, seed=0):
    r = edge_layout(lmax, 1).R
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(e, 2, r, c, generator=g, dtype=torch.float64)
    weight = torch.randn(h, 2 * r * c, generator=g, dtype=torch.float64) / (2 * r * c) ** 0.5
    bias = torch.randn(h, generator=g, dtype=torch.float64)
    gate = torch.randn(e, h, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (y, weight, bias, gate)]


def _gpu_strategy(gemm: str, lmax: int):
    """(weight transform, weight_order) of a GPU plan's GEMM strategy."""
    if gemm == "tap_ordered":
        return (lambda w: to_tap_order(w, lmax, 1, -1)), "tap"
    return (lambda w: w), "upstream"


@pytest.mark.parametrize("gemm", ["tap_ordered", "gathered"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_triton_split_path_of_gated_tap_projection_matches_upstream(gemm, dtype):
    lmax = 4
    y, w, b, gate = _inputs(lmax, 9, 6, 10, dtype)
    transform, order = _gpu_strategy(gemm, lmax)
    out = gated_tap_projection(
        y, transform(w), b, gate, lmax, 1, -1, backend="triton", weight_order=order, gemm=gemm
    )
    ref = gated_tap_projection(y.double(), w.double(), b.double(), gate.double(), lmax, 1, -1)
    tol = TOL["op_fp64"] if dtype == torch.float64 else TOL["op_fp32"]
    assert rel_max_error(out, ref) <= tol
    sym = tap_symmetry(lmax, 1, -1)
    assert out.shape == (9, sym.num_taps, 10)
    assert torch.isfinite(silu(out)).all()


@pytest.mark.parametrize("gemm", ["tap_ordered", "gathered"])
@pytest.mark.parametrize("edges", [4, 0])
def test_triton_split_path_gradcheck_float64(gemm, edges):
    lmax = 2
    y, w, b, gate = _inputs(lmax, edges, 2, 3, torch.float64)
    transform, order = _gpu_strategy(gemm, lmax)
    inputs = [t.requires_grad_() for t in (y, transform(w).detach(), b, gate)]

    def f(*a):
        return gated_tap_projection(
            *a, lmax, 1, -1, backend="triton", weight_order=order, gemm=gemm
        )

    assert torch.autograd.gradcheck(f, inputs)


def test_triton_tap_split_into_bfloat16():
    """float32 y gathered into bf16 GEMM operands in the same pass (native bf16 GEMMs on a GPU;
    the interpreter truncates where a GPU rounds to nearest even: within one bf16 ulp)."""
    rows = tap_rows(6, 1, -1, torch.device("cpu"))
    y3 = torch.randn(4, 2 * edge_layout(6, 1).R, 8, generator=torch.Generator().manual_seed(3))
    y0, pair = tap_elementwise.tap_split(
        y3, rows.y0_rows, rows.pair_rows, rows.pair_signs, torch.bfloat16
    )
    assert y0.dtype == pair.dtype == torch.bfloat16
    want0, want_pair = tb._split_input(y3.view(4, 2, -1, 8), rows, torch.float32, "reference")
    torch.testing.assert_close(y0.float().view(4, -1), want0, rtol=2**-7, atol=0)
    torch.testing.assert_close(pair.float().view(8, -1), want_pair, rtol=2**-7, atol=0)
    with pytest.raises(ValueError, match="out_dtype"):
        tap_elementwise.tap_split(
            y3.double(), rows.y0_rows, rows.pair_rows, rows.pair_signs, torch.bfloat16
        )
