"""Op level: tap_projection (fc1_edge_proj over all taps via the tap symmetry) against upstream's way
(every tap's rotated copy through the full linear map), gradcheck, and the tap identities."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.nn.functional import linear, silu

from scn_fast.frames import edge_frames
from scn_fast.model import Resolution
from scn_fast.ops import (
    compact_wigner,
    edge_layout,
    gated_tap_projection,
    tap_projection,
    tap_symmetry,
)
from scn_fast.ops.layout import dense_from_compact
from scn_fast.ops.tap_rows import tap_rows

from .conftest import TOL, elementwise_backend, rel_max_error

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


# ----------------------------------------------------------------------------------------------
# gated_tap_projection: silu(pre) * gate, every backend's epilogue kernels
# ----------------------------------------------------------------------------------------------
GATE_BACKENDS = ["reference", "extension", "triton"]


def _gated_inputs(lmax, mmax, e, c, h, dtype, seed=0):
    r = edge_layout(lmax, mmax).R
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(e, 2, r, c, generator=g, dtype=torch.float64)
    weight = torch.randn(h, 2 * r * c, generator=g, dtype=torch.float64) / (2 * r * c) ** 0.5
    bias = torch.randn(h, generator=g, dtype=torch.float64)
    gate = torch.randn(e, h, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (y, weight, bias, gate)]


@pytest.mark.parametrize(("lmax", "mmax", "num_taps"), CONFIGS)
@pytest.mark.parametrize("backend", GATE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_gated_matches_upstream(lmax, mmax, num_taps, backend, dtype):
    y, w, b, gate = _gated_inputs(lmax, mmax, 11, 6, 10, dtype)
    sym = tap_symmetry(lmax, mmax, num_taps)
    out = gated_tap_projection(
        y, w, b, gate, lmax, mmax, num_taps, backend=elementwise_backend(backend)
    )
    ref = silu(_upstream_taps(y.double(), w.double(), b.double(), sym)) * gate.double().unsqueeze(1)
    assert out.shape == (11, sym.num_taps, 10) and out.dtype == dtype
    assert rel_max_error(out, ref) <= (TOL["op_fp64"] if dtype == torch.float64 else TOL["op_fp32"])


@pytest.mark.parametrize(("lmax", "mmax", "num_taps"), [(2, 1, -1), (2, 0, -1), (3, 1, 1)])
@pytest.mark.parametrize("backend", GATE_BACKENDS)
def test_gated_gradcheck_float64(lmax, mmax, num_taps, backend):
    inputs = [t.requires_grad_() for t in _gated_inputs(lmax, mmax, 4, 2, 3, torch.float64)]
    be = elementwise_backend(backend)
    assert torch.autograd.gradcheck(
        lambda *a: gated_tap_projection(*a, lmax, mmax, num_taps, backend=be), inputs
    )


@pytest.mark.parametrize("backend", ["extension", "triton"])
def test_gated_float32_gradients_match_upstream(backend):
    """Production shape (L = 6, C = 128): every input's gradient against upstream's autograd."""
    lmax, sym = 6, tap_symmetry(6, 1, -1)
    inputs = _gated_inputs(lmax, 1, 24, 128, 64, torch.float32, seed=1)
    dout = torch.randn(24, 4, 64, generator=torch.Generator().manual_seed(2))
    grads = {}
    for name in ("fused", "upstream"):
        args = [t.clone().requires_grad_() for t in inputs]
        if name == "fused":
            out = gated_tap_projection(*args, lmax, 1, -1, backend=elementwise_backend(backend))
        else:
            out = silu(_upstream_taps(*args[:3], sym)) * args[3].unsqueeze(1)
        out.backward(dout)
        grads[name] = [a.grad for a in args]
    for fused, ref in zip(grads["fused"], grads["upstream"], strict=True):
        assert rel_max_error(fused, ref) <= TOL["op_fp32"]


def test_row_blocked_and_gathered_strategies_agree():
    """The CPU strategy (GEMMs per row block reading the weight in place) and the gathered one
    (used on GPUs and for native bf16) give the same outputs and gradients."""
    inputs = _gated_inputs(6, 1, 30, 128, 96, torch.float32, seed=3)
    dout = torch.randn(30, 4, 96, generator=torch.Generator().manual_seed(4))
    results = []
    for gemm in ("row_blocked", "gathered"):
        args = [t.clone().requires_grad_() for t in inputs]
        out = gated_tap_projection(*args, 6, 1, -1, backend="extension", gemm=gemm)
        out.backward(dout)
        results.append([out.detach(), *[a.grad for a in args]])
    for a, b in zip(*results, strict=True):
        assert rel_max_error(a, b) <= TOL["op_fp32"]


@pytest.mark.parametrize("native", [True, False], ids=["native", "emulated"])
@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_low_precision_rounds_the_operands(precision, native):
    """tf32/bf16 round the GEMM operands (native bf16 GEMMs on CPU work anywhere, slowly without
    bf16 units; "native" tf32 is a CUDA notion and runs float32 GEMMs here): the result moves by
    about the precision's rounding, no more."""
    y, w, b, gate = _gated_inputs(6, 1, 16, 32, 24, torch.float32, seed=5)
    ref = gated_tap_projection(y, w, b, gate, 6, 1, -1, backend="extension")
    out = gated_tap_projection(y, w, b, gate, 6, 1, -1, precision, native, backend="extension")
    err = rel_max_error(out, ref)
    if precision == "tf32" and native:
        assert err <= TOL["op_fp32"]  # no TF32 units on CPU: float32 GEMMs
    else:
        unit = 2.0**-8 if precision == "bf16" else 2.0**-11
        assert 1e-2 * unit < err < 30 * unit, err


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("fp32", torch.float32), ("fp32", torch.float64), ("bf16", torch.float32)],
    ids=["fp32", "fp64", "bf16"],
)
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
def test_weight_in_tap_order_gives_the_same_results(gated, precision, dtype):
    """weight_order="tap" (the fused model's layout: [W0 | W1] columns, no gather) against the
    upstream-ordered weight: same outputs, same input gradients, the weight gradient in tap order."""
    from scn_fast.ops.tap_projection import from_tap_order, to_tap_order

    y, w, b, gate = _gated_inputs(6, 1, 20, 16, 24, dtype, seed=7)
    dout = torch.randn(20, 4, 24, generator=torch.Generator().manual_seed(8), dtype=dtype)
    results = {}
    for order in ("upstream", "tap"):
        weight = w if order == "upstream" else to_tap_order(w, 6, 1, -1)
        args = [t.clone().requires_grad_() for t in (y, weight, b, gate)]
        kw = {"precision": precision, "backend": "extension", "weight_order": order}
        if gated:
            out = gated_tap_projection(*args, 6, 1, -1, **kw)
        else:
            out = tap_projection(*args[:3], 6, 1, -1, **kw)
        out.backward(dout)
        grads = [a.grad for a in args[: 4 if gated else 3]]
        if order == "tap":
            grads[1] = from_tap_order(grads[1], 6, 1, -1)
        results[order] = [out.detach(), *grads]
    tol = TOL["op_fp64"] if dtype == torch.float64 else TOL["op_fp32"]
    for a, b_ in zip(results["tap"], results["upstream"], strict=True):
        assert rel_max_error(a, b_) <= (tol if precision == "fp32" else 1e-2)


def test_weight_order_checks():
    y, w, b, _ = _gated_inputs(2, 1, 3, 4, 5, torch.float64, seed=1)
    with pytest.raises(ValueError, match="weight_order must be"):
        tap_projection(y, w, b, 2, 1, -1, weight_order="permuted")
    r = edge_layout(2, 0).R
    y0 = torch.randn(3, 2, r, 4, dtype=torch.float64)
    w0 = torch.randn(5, 2 * r * 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs 4 taps"):
        tap_projection(y0, w0, b, 2, 0, -1, weight_order="tap")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("lmax", [1, 4, 6])
def test_extension_split_and_its_adjoint(lmax, dtype):
    """The extension's tap_split equals the gathers it replaces, and tap_assemble is its adjoint:
    <split(y), (g0, gp)> = <y, assemble(g0, gp)> for random y, g0, gp."""
    from scn_fast.extension import load_extension

    tb = importlib.import_module("scn_fast.ops.tap_buffers")
    ext = load_extension()
    rows = tap_rows(lmax, 1, -1, torch.device("cpu"))
    r = edge_layout(lmax, 1).R
    gen = torch.Generator().manual_seed(lmax)
    y3 = torch.randn(7, 2 * r, 5, generator=gen, dtype=dtype)
    y0 = y3.new_empty((7, rows.n0, 5))
    pair = y3.new_empty((7, 2 * rows.n1, 5))
    ext.tap_split(y3, rows.y0_rows, rows.pair_rows, rows.pair_signs, y0, pair)
    want0, want_pair = tb._split_input(y3.view(7, 2, r, 5), rows, dtype, "reference")
    assert torch.equal(y0.view(7, -1), want0) and torch.equal(pair.view(14, -1), want_pair)
    g0, gp = torch.randn_like(y0), torch.randn_like(pair)
    dy = ext.tap_assemble(g0, gp, rows.assemble_a, rows.assemble_b, rows.assemble_sign)
    lhs = (y0 * g0).sum() + (pair * gp).sum()
    assert torch.allclose(lhs, (y3 * dy).sum(), rtol=1e-5 if dtype == torch.float32 else 1e-12)
    # the ATen bodies that other devices run (exercised here on CPU): the same numbers
    y0_aten, pair_aten = torch.empty_like(y0), torch.empty_like(pair)
    ext._tap_split_aten(y3, rows.y0_rows, rows.pair_rows, rows.pair_signs, y0_aten, pair_aten)
    assert torch.equal(y0_aten, y0) and torch.equal(pair_aten, pair)
    dy_aten = ext._tap_assemble_aten(g0, gp, rows.assemble_a, rows.assemble_b, rows.assemble_sign)
    assert torch.equal(dy_aten, dy)
    assert torch.equal(dy, tb._assemble(g0, gp, rows, "reference"))  # Python's ATen path too
    with pytest.raises(RuntimeError, match="out of range"):
        ext.tap_split(y3, rows.y0_rows + 2 * r, rows.pair_rows, rows.pair_signs, y0, pair)
    with pytest.raises(RuntimeError, match="float64"):
        ext.tap_split(y3, rows.y0_rows, rows.pair_rows, rows.pair_signs.float(), y0, pair)
    with pytest.raises(RuntimeError, match="outputs must be"):
        ext.tap_split(y3, rows.y0_rows, rows.pair_rows, rows.pair_signs, pair, y0)
