"""Precision modes (scn_fast.precision): TF32/bf16 rounding, the low-precision Linear (native and
emulated), and the model in each mode against the float32 reference (the rows of docs/tolerances.md)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import scn_fast.planning as planning_module
from scn_fast import SphericalChannelNetwork, load_checkpoint
from scn_fast.precision import (
    Linear,
    gemm_operand,
    gemm_support,
    low_precision_linear,
    round_tf32,
    round_to,
)

from .conftest import GOLDEN_DIR, TOL, golden_inputs, load_golden


def test_round_tf32() -> None:
    torch.manual_seed(0)
    x = torch.randn(10_000) * torch.logspace(-20, 20, 10_000)
    r = round_tf32(x)
    assert torch.all((r.view(torch.int32) & 0x1FFF) == 0)  # 10 mantissa bits left
    assert torch.all((r - x).abs() <= x.abs() * 2.0**-11)  # round to nearest
    one = torch.tensor([1.0])
    half_ulp = 2.0**-11
    assert round_tf32(one + half_ulp).item() == 1.0  # tie to even (down)
    assert round_tf32(one + 3 * half_ulp).item() == 1.0 + 4 * half_ulp  # tie to even (up)
    special = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    assert torch.equal(round_tf32(special), special)
    assert torch.isnan(round_tf32(torch.tensor([float("nan")]))).all()


def test_round_to_and_operand() -> None:
    x = torch.randn(64, requires_grad=True)
    assert torch.equal(round_to(x, "bf16"), x.bfloat16().float())
    assert round_to(x, "fp32") is x
    y = gemm_operand(x, "bf16")
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(64))  # straight-through
    assert gemm_operand(x.double(), "bf16").dtype == torch.float64


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("native", [False, True])
def test_low_precision_linear(precision: str, native: bool) -> None:
    if precision == "tf32" and native:
        pytest.skip("native TF32 needs a CUDA device of sm_80+")
    torch.manual_seed(1)
    x = torch.randn(37, 5, 24, requires_grad=True)
    w = torch.randn(16, 24, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    y = low_precision_linear(x, w, b, precision, native)
    assert y.shape == (37, 5, 16) and y.dtype == torch.float32
    xr, wr = round_to(x.detach(), precision), round_to(w.detach(), precision)
    want = F.linear(xr.double(), wr.double(), b.detach().double())
    # fp32 accumulation of exactly rounded operands (native bf16 also rounds the output to bf16)
    tol = 2e-2 if native else 1e-5
    assert (y.double() - want).abs().max() <= tol * want.abs().max()
    g = torch.randn_like(y)
    y.backward(g)
    gr = round_to(g, precision).double().reshape(-1, 16)
    gx = (gr @ wr.double()).view_as(x)
    gw = gr.t() @ xr.double().reshape(-1, 24)
    assert (x.grad.double() - gx).abs().max() <= tol * gx.abs().max()
    assert (w.grad.double() - gw).abs().max() <= tol * gw.abs().max()
    assert torch.allclose(b.grad, g.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_linear_is_nn_linear() -> None:
    torch.manual_seed(2)
    a = torch.nn.Linear(8, 4)
    torch.manual_seed(2)
    b = Linear(8, 4)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)  # same init draws
    assert list(a.state_dict()) == list(b.state_dict())
    x = torch.randn(3, 8)
    assert torch.equal(a(x), b(x))


def test_gemm_support_cpu() -> None:
    native, why = gemm_support("tf32", "cpu")
    assert not native and "tf32" in why
    assert gemm_support("fp32", "cpu")[0]
    with pytest.raises(ValueError, match="precision"):
        gemm_support("fp16", "cpu")


def _build(g: dict, precision: str, fused: bool) -> SphericalChannelNetwork:
    model = SphericalChannelNetwork(
        **g["config"], use_fused=fused, precision=precision, deterministic_frames=True
    )
    model.load_state_dict(g["state_dict"])
    return model.eval()


def _check_row(out: dict, ref: dict, precision: str) -> None:
    row = TOL[precision]
    e = ((out["energy"] - ref["energy"]).abs() / ref["energy"].abs().clamp(min=1.0)).max()
    f, fr = out["forces"].flatten(), ref["forces"].flatten()
    cos = F.cosine_similarity(f, fr, dim=0)
    fmax = (f - fr).abs().max() / fr.abs().max()
    assert e <= row["energy"], (precision, e.item())
    assert cos >= row["force_cos"], (precision, cos.item())
    assert fmax <= row["force_max"], (precision, fmax.item())


@pytest.mark.parametrize("name", ["tiny__cu111_co.pt", "t4b2_shaped__pt_bulk_rattled.pt"])
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_model_within_row(name: str, fused: bool, precision: str) -> None:
    g = load_golden(name)
    with torch.no_grad():
        ref = _build(g, "fp32", False)(golden_inputs(g))
        model = _build(g, precision, fused)
        out = model(golden_inputs(g))
    _check_row(out, ref, precision)
    report = model.explain()["gemm_precision"]
    native, _ = gemm_support(precision, "cpu")  # bf16 is native on CPUs with AVX512-BF16/AMX
    assert report["ran"] == f"{precision} {'native' if native else 'emulated'}"
    assert ("native" in report["refused"]) != native
    assert model.energy_fc1.precision == "fp32"  # heads stay float32
    assert model.edge_blocks[0].message_blocks[0].fc1_edge.precision == precision


def test_native_bf16_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The native bf16 Linear (slow on CPUs without bf16 units, fine at this size) in the model."""
    monkeypatch.setattr(
        planning_module, "gemm_support", lambda p, d, c=None: (True, "forced for the test")
    )
    g = load_golden("tiny__cu111_co.pt")
    with torch.no_grad():
        ref = _build(g, "fp32", False)(golden_inputs(g))
        model = _build(g, "bf16", True)
        out = model(golden_inputs(g))
    assert model.explain()["gemm_precision"]["ran"] == "bf16 native"
    _check_row(out, ref, "bf16")


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_bf16_training_gradients(fused: bool) -> None:
    g = load_golden("tiny__cu111_co.pt")
    grads = {}
    for precision in ("fp32", "bf16"):
        model = _build(g, precision, fused).train()
        out = model(golden_inputs(g))
        (out["energy"].sum() + 100 * out["forces"].pow(2).sum()).backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(grads["bf16"]).all()
    cos = F.cosine_similarity(grads["bf16"], grads["fp32"], dim=0)
    assert cos >= 0.99, cos.item()


def test_precision_switch_and_checkpoint() -> None:
    g = load_golden("tiny__pt_bulk_rattled.pt")
    model = _build(g, "fp32", False)
    with torch.no_grad():
        a = model(golden_inputs(g))
        model.precision = "bf16"
        b = model(golden_inputs(g))
        model.precision = "fp32"
        c = model(golden_inputs(g))
    assert not torch.equal(a["forces"], b["forces"]) and torch.equal(a["forces"], c["forces"])
    assert "gemm_precision" not in model.explain()
    with pytest.raises(ValueError, match="precision"):
        model.precision = "int8"
    path = GOLDEN_DIR / "checkpoints" / "scn_public_fairchem_layout.pt"
    assert load_checkpoint(path, precision="tf32").precision == "tf32"


def test_float64_ignores_precision() -> None:
    g = load_golden("tiny__pt_bulk_rattled.pt")
    a = _build(g, "fp32", False).double()
    b = _build(g, "bf16", False).double()
    inputs = golden_inputs(g)
    inputs.pos, inputs.cell = inputs.pos.double(), inputs.cell.double()
    with torch.no_grad():
        assert torch.equal(a(inputs)["forces"], b(inputs)["forces"])
