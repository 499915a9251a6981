"""Op level: tap_combine (bias + SiLU + upstream's tap combination, fused) on every backend against
upstream's way (``silu(z + b)`` then ``einsum("abc,bd->adc", ., mapping_y_rot)`` with the dense
mapping), gradcheck, determinism, bad input; and the Triton kernels' GPU compilation."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import silu

from scn_fast import so3
from scn_fast.ops.tap_combine import combine_tables, tap_combine

from .conftest import TOL, elementwise_backend, rel_max_error
from .cuda_compile import triton_compile_main

CONFIGS = [(6, 1, -1), (4, 1, -1), (3, 0, -1), (5, 1, 1), (1, 1, -1)]
BACKENDS = ["reference", "extension", "triton"]


def _upstream(z: torch.Tensor, bias: torch.Tensor, lmax: int, mmax: int, num_taps: int):
    mapping = so3.tap_set(lmax, mmax, num_taps).mapping.to(z.dtype)
    t = mapping.shape[0] // mapping.shape[1]
    return torch.einsum("abc,bd->adc", silu(z + bias.repeat(t, 1)), mapping)


def _inputs(lmax, mmax, num_taps, e, c, dtype, seed=0):
    mapping = so3.tap_set(lmax, mmax, num_taps).mapping
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(e, mapping.shape[0], c, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(mapping.shape[1], c, generator=g, dtype=torch.float64).to(dtype)
    return z, bias


@pytest.mark.parametrize(("lmax", "mmax", "num_taps"), CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("channels", [128, 5])
def test_matches_upstream(lmax, mmax, num_taps, backend, dtype, channels):
    z, bias = _inputs(lmax, mmax, num_taps, 9, channels, dtype)
    out = tap_combine(z, bias, lmax, mmax, num_taps, elementwise_backend(backend))
    ref = _upstream(z.double(), bias.double(), lmax, mmax, num_taps)
    assert out.shape == ref.shape and out.dtype == dtype
    tol = TOL["op_fp64"] if dtype == torch.float64 else TOL["op_fp32"]
    assert rel_max_error(out, ref) <= tol


@pytest.mark.parametrize(("lmax", "mmax", "num_taps"), [(2, 1, -1), (2, 0, -1), (3, 1, 1)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(lmax, mmax, num_taps, backend):
    z, bias = _inputs(lmax, mmax, num_taps, 3, 2, torch.float64)
    z.requires_grad_()
    bias.requires_grad_()
    be = elementwise_backend(backend)
    assert torch.autograd.gradcheck(
        lambda a, b: tap_combine(a, b, lmax, mmax, num_taps, be), (z, bias)
    )


@pytest.mark.parametrize("backend", ["extension", "triton"])
def test_float32_gradients_match_upstream(backend):
    z, bias = _inputs(6, 1, -1, 17, 128, torch.float32)
    dm = torch.randn(17, 19, 128, generator=torch.Generator().manual_seed(3))
    grads = {}
    for name, fn in (
        ("fused", lambda a, b: tap_combine(a, b, 6, 1, -1, elementwise_backend(backend))),
        ("upstream", lambda a, b: _upstream(a, b, 6, 1, -1)),
    ):
        a, b = z.clone().requires_grad_(), bias.clone().requires_grad_()
        fn(a, b).backward(dm)
        grads[name] = (a.grad, b.grad)
    for fused, ref in zip(grads["fused"], grads["upstream"], strict=True):
        assert rel_max_error(fused, ref) <= TOL["op_fp32"]


def test_tables_are_the_mapping():
    """src/coef rebuild upstream's dense (T*R, R) mapping exactly (float64)."""
    for lmax, mmax, num_taps in CONFIGS:
        mapping = so3.tap_set(lmax, mmax, num_taps).mapping
        src, coef = combine_tables(lmax, mmax, num_taps, torch.float64, torch.device("cpu"))
        dense = torch.zeros_like(mapping)
        for r in range(mapping.shape[1]):
            dense[src[r], r] = coef[r]
        assert torch.equal(torch.sort(src.flatten()).values, torch.arange(mapping.shape[0]))
        torch.testing.assert_close(dense, mapping, rtol=0, atol=1e-15)


def test_bias_gradient_is_deterministic():
    """The extension sums the bias gradient per fixed chunk of edges: bit-identical every run."""
    z, bias = _inputs(6, 1, -1, 300, 128, torch.float32, seed=4)
    dm = torch.randn(300, 19, 128, generator=torch.Generator().manual_seed(5))
    grads = []
    for _ in range(3):
        b = bias.clone().requires_grad_()
        tap_combine(z, b, 6, 1, -1, "extension").backward(dm)
        grads.append(b.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_edges(backend):
    z, bias = _inputs(4, 1, -1, 0, 8, torch.float32)
    z.requires_grad_()
    out = tap_combine(z, bias, 4, 1, -1, elementwise_backend(backend))
    assert out.shape == (0, 13, 8)
    out.sum().backward()
    assert z.grad.shape == z.shape


def test_extension_rejects_bad_input():
    from scn_fast.extension import load_extension

    ext = load_extension()
    z, bias = _inputs(4, 1, -1, 3, 8, torch.float32)
    src, coef = combine_tables(4, 1, -1, torch.float32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="permutation"):
        ext.tap_combine_forward(z, bias, torch.zeros_like(src), coef)
    with pytest.raises(RuntimeError, match="bias must be"):
        ext.tap_combine_forward(z, bias[:, :3], src, coef)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ext.tap_combine_forward(z.half(), bias.half(), src, coef.half())
    with pytest.raises(RuntimeError, match="dm must be"):
        ext.tap_combine_backward(z, z, bias, src, coef)


@pytest.mark.gpu_compile
def test_triton_kernels_compile_for_sm80_sm90(tmp_path):
    """Every specialisation of the tap_gate / tap_combine / tap_split / tap_assemble kernels
    compiles to a cubin for sm_80 and sm_90 (kernels/tap_elementwise.py compile_main,
    TRITON_INTERPRET unset)."""
    results = triton_compile_main("tap_elementwise", tmp_path, timeout=900)
    assert {r["kernel"].split("[")[0] for r in results} == {
        "tap_gate_fwd",
        "tap_gate_bwd",
        "tap_combine_fwd",
        "tap_combine_bwd",
        "tap_split",
        "tap_assemble",
    }


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["extension", "triton"])
def test_cuda_matches_cpu(backend):
    z, bias = _inputs(6, 1, -1, 500, 128, torch.float32)
    ref = tap_combine(z, bias, 6, 1, -1, "reference")
    out = tap_combine(z.cuda(), bias.cuda(), 6, 1, -1, backend)
    assert rel_max_error(out.cpu(), ref) <= TOL["op_fp32"]


@pytest.mark.parametrize("backend", ["reference", "extension", "triton"])
def test_bfloat16_z_is_read_as_it_is(backend):
    """A native bf16 GEMM's output (bf16 z, float32 bias): the same outputs and bias gradient as
    the float32 op on those bf16 values, and dz rounded to bf16 (to nearest even, as torch does)."""
    z, bias = _inputs(6, 1, -1, 40, 128, torch.float32, seed=6)
    zb = (3 * z).bfloat16()
    dm = torch.randn(40, 19, 128, generator=torch.Generator().manual_seed(7))
    be = elementwise_backend(backend)
    results = []
    for zz in (zb, zb.float()):
        a, b = zz.clone().requires_grad_(), bias.clone().requires_grad_()
        out = tap_combine(a, b, 6, 1, -1, be)
        out.backward(dm)
        results.append((out.detach(), a.grad, b.grad))
    (out_b, dz_b, db_b), (out_f, dz_f, db_f) = results
    assert out_b.dtype == torch.float32 and dz_b.dtype == torch.bfloat16
    assert rel_max_error(out_b, out_f) <= TOL["op_fp32"]
    assert rel_max_error(db_b, db_f) <= TOL["op_fp32"]
    assert rel_max_error(dz_b.float(), dz_f.bfloat16().float()) <= 2**-8


def test_z_dtype_must_match_bias():
    z, bias = _inputs(4, 1, -1, 3, 8, torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        tap_combine(z.bfloat16(), bias, 4, 1, -1, "extension")


@pytest.mark.parametrize("zdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_cpu_clone_agrees(isa_cap, zdtype):
    """The AVX-512, AVX2 and baseline clones of the extension's kernels (each run here by capping
    the ISA; the widest the CPU lacks falls back to the next): forward, dz and the bias gradient
    against the reference backend, with vector bodies and scalar tails (C = 133 = 8 x 16 + 5)."""
    z, bias = _inputs(6, 1, -1, 11, 133, torch.float32, seed=9)
    z = (3 * z).to(zdtype)
    dm = torch.randn(11, 19, 133, generator=torch.Generator().manual_seed(10))
    results = {}
    for cap in (2, 1, 0, "reference"):
        if cap != "reference":
            isa_cap(cap)
        a, b = z.clone().requires_grad_(), bias.clone().requires_grad_()
        out = tap_combine(a, b, 6, 1, -1, "reference" if cap == "reference" else "extension")
        out.backward(dm)
        results[cap] = (out.detach(), a.grad.float(), b.grad)
    ref = results["reference"]
    dz_tol = TOL["op_fp32"] if zdtype == torch.float32 else 2**-8
    for cap in (2, 1, 0):
        out, dz, db = results[cap]
        assert rel_max_error(out, ref[0]) <= TOL["op_fp32"], cap
        assert rel_max_error(dz, ref[1]) <= dz_tol, cap
        assert rel_max_error(db, ref[2]) <= TOL["op_fp32"], cap
    for got, want in zip(results[2], results[1], strict=True):  # same polynomial, lane by lane
        assert torch.equal(got, want)
