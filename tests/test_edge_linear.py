"""The edge MLP's fused Linear layers (``scn_fast.ops.edge_linear``, ``kernels/edge_mlp.py``) and the
GEMM prologue they use: values and gradients against ATen, gradcheck in float64 (empty inputs
too), the fake implementations (opcheck), the plan that chooses them, and that a parameter's
gradient from these ops is taken over by autograd, not copied (what the launch recorder assumes)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("triton")

from scn_fast.kernels import edge_mlp, gemm

from scn_fast import plan as build_plan
from scn_fast import preset
from scn_fast.ops.edge_linear import linear_act, linear_act_weights
from scn_fast.ops.silu_linear import silu_mm

needs_interpreter = pytest.mark.skipif(
    not gemm.is_interpreted(), reason="CPU tensors need Triton's interpreter"
)


def _rnd(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _layer(k, n, bias=True, seed=0):
    layer = torch.nn.Linear(k, n, bias=bias).double()
    with torch.no_grad():
        layer.weight.copy_(_rnd(n, k, seed=seed) / k**0.5)
        if bias:
            layer.bias.copy_(_rnd(n, seed=seed + 1))
    return layer


@needs_interpreter
@pytest.mark.parametrize("act", [True, False], ids=["silu", "identity"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("rows", [13, 0], ids=["rows", "empty"])
def test_linear_act_gradcheck_float64(act, bias, rows):
    layer = _layer(7, 5, bias)
    x = _rnd(rows, 7, seed=3).requires_grad_()
    params = [layer.weight] + ([layer.bias] if bias else [])

    def fn(x, *p):
        return linear_act_weights(x, p[0], p[1] if bias else None, act, "triton")

    assert torch.autograd.gradcheck(fn, [x, *params])


@needs_interpreter
@pytest.mark.parametrize("act", [True, False], ids=["silu", "identity"])
def test_linear_act_matches_aten_float32(act):
    layer = _layer(40, 24).float()
    x = _rnd(150, 40, seed=4, dtype=torch.float32)
    dy = _rnd(150, 24, seed=5, dtype=torch.float32)
    grads = []
    for impl in ("triton", "aten"):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y = linear_act(layer, xi, act, impl)
        y.backward(dy)
        grads.append((y.detach(), xi.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_inference_stores_no_pre_activation():
    layer = _layer(6, 4)
    x = _rnd(9, 6, seed=17)
    with torch.no_grad():
        y = linear_act(layer, x, True, "triton")
    torch.testing.assert_close(y, F.silu(layer(x)).detach(), rtol=1e-12, atol=1e-12)
    stored = {}
    original = edge_mlp.linear_act_forward

    def keep(*args):
        out = original(*args)
        stored["pre"] = out[1].shape
        return out

    try:
        edge_mlp.linear_act_forward = keep
        with torch.no_grad():
            linear_act(layer, x, True, "triton")
        assert stored["pre"] == (0,)
        linear_act(layer, x, True, "triton")  # parameters require grad: a backward may follow
        assert stored["pre"] == (9, 4)
    finally:
        edge_mlp.linear_act_forward = original


@needs_interpreter
def test_linear_act_input_without_grad_skips_dx():
    layer = _layer(6, 4)
    x = _rnd(9, 6, seed=6)  # no requires_grad: only the parameters' gradients
    linear_act(layer, x, True, "triton").sum().backward()
    ref = _layer(6, 4)
    F.silu(ref(x)).sum().backward()
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-12, atol=1e-12)


@needs_interpreter
@pytest.mark.parametrize("rows", [11, 0], ids=["rows", "empty"])
def test_silu_mm_triton_gradcheck_float64(rows):
    h = _rnd(rows, 6, seed=7).requires_grad_()
    w = _rnd(5, 6, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: silu_mm(a, b, "triton"), [h, w])
    if rows:
        torch.testing.assert_close(silu_mm(h, w, "triton"), silu_mm(h, w), rtol=1e-12, atol=1e-12)


@needs_interpreter
def test_gemm_prologue_and_row_sums():
    """PRO_SILU reads silu(A), PRO_DSILU A * silu'(ZA) (ZA with A's strides, here transposed
    views), ROWSUM the row sums of A as read; an empty B still writes the row sums."""
    a, za, b = _rnd(30, 20, seed=9), _rnd(30, 20, seed=10), _rnd(20, 9, seed=11)
    out = torch.empty(30, 9, dtype=torch.float64)
    gemm.mm(a, b, out, prologue=gemm.PRO_SILU)
    torch.testing.assert_close(out, F.silu(a) @ b)
    rs = torch.empty(20, dtype=torch.float64)
    out_t = torch.empty(20, 9, dtype=torch.float64)
    b2 = _rnd(30, 9, seed=12)
    gemm.mm(a.t(), b2, out_t, prologue=gemm.PRO_DSILU, za=za.t(), rowsum=rs)
    d = torch.ops.aten.silu_backward(a, za)
    torch.testing.assert_close(out_t, d.t() @ b2)
    torch.testing.assert_close(rs, d.sum(0))
    rs2 = torch.empty(30, dtype=torch.float64)
    gemm.mm(a, b[:, :0], torch.empty(30, 0, dtype=torch.float64), rowsum=rs2)
    torch.testing.assert_close(rs2, a.sum(1))


def test_gemm_prologue_arguments_are_checked():
    a = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="za"):
        gemm.mm(a, a, torch.empty(4, 4), prologue=gemm.PRO_DSILU)
    with pytest.raises(ValueError, match="za"):
        gemm.mm(a, a, torch.empty(4, 4), prologue=gemm.PRO_DSILU, za=torch.zeros(4, 4).t()[:3])
    with pytest.raises(ValueError, match="rowsum"):
        gemm.mm(a, a, torch.empty(4, 4), rowsum=torch.empty(5))
    with pytest.raises(ValueError, match="prologue"):
        gemm.mm(a, a, torch.empty(4, 4), prologue=3)


def test_linear_act_rejects_bad_input():
    layer = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="impl"):
        linear_act(layer, torch.zeros(2, 4), True, "cuda")
    with pytest.raises(ValueError, match="width 5"):
        linear_act(layer, torch.zeros(2, 5), True, "triton")
    with pytest.raises(ValueError, match="impl 'aten'"):
        silu_mm(torch.zeros(2, 4), torch.zeros(3, 4), "aten", "tf32")


def test_fake_implementations_trace_on_meta():
    """The custom ops' fakes give the shapes the launchers produce (what torch.compile traces)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w, b = torch.empty(10, 6), torch.empty(4, 6), torch.empty(4)
        y, pre = torch.ops.scn_fast.linear_act(x, w, b, True, "fp32", True)
        assert y.shape == (10, 4) and pre.shape == (10, 4)
        assert torch.ops.scn_fast.linear_act(x, w, b, True, "fp32", False)[1].shape == (0,)
        dx, dw, db = torch.ops.scn_fast.linear_act_backward(y, x, w, pre, True, True, False, "fp32")
        assert dx.shape == (0,) and dw.shape == (4, 6) and db.shape == (4,)
        z = torch.ops.scn_fast.silu_mm(x, w, "triton", "tf32")
        assert z.shape == (10, 4)


@needs_interpreter
def test_opcheck_linear_act():
    x, w, b = _rnd(8, 5, seed=13), _rnd(3, 5, seed=14), _rnd(3, seed=15)
    for act in (True, False):
        torch.library.opcheck(
            torch.ops.scn_fast.linear_act.default,
            (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), act, "fp32", True),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )


@needs_interpreter
def test_parameter_gradients_are_taken_over_not_copied():
    """autograd keeps the weight and bias gradients these ops return (same storage): no copy
    kernel on a GPU (``scn_fast.launches`` leaves the recorder's copies out for this reason)."""
    returned = {}
    original = edge_mlp.linear_act_backward

    def keep(*args):
        out = original(*args)
        returned.update(dw=out[1].data_ptr(), db=out[2].data_ptr())
        return out

    layer = _layer(8, 4)
    try:
        edge_mlp.linear_act_backward = keep
        linear_act(layer, _rnd(5, 8, seed=16).requires_grad_(), True, "triton").sum().backward()
    finally:
        edge_mlp.linear_act_backward = original
    assert returned["dw"] == layer.weight.grad.data_ptr()
    assert returned["db"] == layer.bias.grad.data_ptr()


@pytest.mark.parametrize(
    ("precision", "dtype", "impl"),
    [("fp32", torch.float32, "triton"), ("tf32", torch.float32, "triton"),
     ("fp32", torch.float64, "triton"), ("bf16", torch.float32, "aten")],
)  # fmt: skip
def test_cuda_plan_runs_the_edge_mlp_on_triton(precision, dtype, impl):
    p = build_plan(preset("scn-t4-b2"), device="cuda", dtype=dtype, precision=precision)
    variant = p["tap_combine"].variant
    assert variant["edge_mlp"] == impl
    assert p.edge_mlp[0] == impl
    if impl == "triton":
        assert variant["fc2"] == "silu_mm"
        assert p.edge_mlp[1] == ("fp32" if dtype == torch.float64 else precision)


def test_cpu_plan_keeps_aten_linears():
    p = build_plan(preset("scn-t4-b2"), device="cpu")
    assert p["tap_combine"].variant["edge_mlp"] == "aten"
    assert p.edge_mlp == ("aten", "fp32")
