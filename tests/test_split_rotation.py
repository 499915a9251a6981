"""The CPU split rotation: ``edge_rotation_split`` (the extension's gather_rotate_split) writes
fc1_edge_proj's two GEMM operands straight from the rotation, and ``gated_tap_projection_split`` takes
them. Checked against the general path (rotation, then the projection's own split): the operands
bit for bit, the composition's outputs and gradients in float64, gradcheck, and the model with
``planning.SPLIT_ROTATION`` on and off."""

from __future__ import annotations

import pytest
import torch

import scn_fast.ops.message_path as messages_mod
import scn_fast.planning as planning_mod
from scn_fast import SphericalChannelNetwork
from scn_fast.ops import compact_wigner, edge_csr, edge_layout, edge_rotation, gated_tap_projection
from scn_fast.ops.edge_rotation import edge_rotation_split
from scn_fast.ops.tap_buffers import _split_input
from scn_fast.ops.tap_projection import gated_tap_projection_split, tap_rows
from scn_fast.tap_order import to_upstream_layout

from .conftest import golden_inputs, load_golden


@pytest.fixture
def ext():
    from scn_fast.extension import load_extension

    try:
        return load_extension()
    except RuntimeError as exc:
        pytest.skip(f"the C++ extension cannot be built here: {exc}")


def _edges(lmax, dtype, n=6, e=11, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, (lmax + 1) ** 2, c, generator=g, dtype=dtype)
    frames = torch.linalg.qr(torch.randn(e, 3, 3, generator=g, dtype=torch.float64))[0]
    frames = frames * torch.linalg.det(frames).sign().view(-1, 1, 1)
    wig = compact_wigner(frames, lmax, 1).to(dtype)
    idx = torch.randint(0, n, (e, 2), generator=g)
    return x, wig, edge_csr(idx, n), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("lmax", [1, 4, 6])
def test_split_rotation_writes_the_projection_operands(ext, lmax, dtype):
    x, wig, csr, _ = _edges(lmax, dtype, c=19)  # 19 channels: vector chunks and scalar tails
    rows = tap_rows(lmax, 1, -1, torch.device("cpu"))
    y0, pair = edge_rotation_split(x, wig, csr, lmax, 1, rows)
    want0, want_pair = _split_input(
        edge_rotation(x, wig, csr, lmax, 1, "extension"), rows, dtype, "reference"
    )
    e = csr.idx.shape[0]
    assert torch.equal(y0.view(e, -1), want0) and torch.equal(pair.view(2 * e, -1), want_pair)
    tables = (rows.assemble_a, rows.assemble_b, rows.assemble_sign)
    with pytest.raises(RuntimeError, match="out of range"):
        ext.gather_rotate_split(x, wig, csr.idx, lmax, 1, tables[0] + 99, *tables[1:], y0, pair)
    with pytest.raises(RuntimeError, match="float64"):
        ext.gather_rotate_split(x, wig, csr.idx, lmax, 1, *tables[:2], tables[2].float(), y0, pair)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ext.gather_rotate_split(x.bfloat16(), wig.float(), csr.idx, lmax, 1, *tables, y0, pair)
    with pytest.raises(ValueError, match="float32/float64"):
        edge_rotation_split(x.bfloat16(), wig.float(), csr, lmax, 1, rows)


@pytest.mark.parametrize("lmax", [2, 4])
def test_split_path_equals_the_general_path_and_passes_gradcheck(ext, lmax):
    x, wig, csr, g = _edges(lmax, torch.float64, c=3, e=7)
    r = edge_layout(lmax, 1).R
    h = 6
    weight = torch.randn(h, 2 * r * 3, generator=g, dtype=torch.float64) / 4
    bias = torch.randn(h, generator=g, dtype=torch.float64)
    gate = torch.randn(csr.idx.shape[0], h, generator=g, dtype=torch.float64)
    rows = tap_rows(lmax, 1, -1, torch.device("cpu"))

    def split_path(x, weight, bias, gate):
        y0, pair = edge_rotation_split(x, wig, csr, lmax, 1, rows)
        return gated_tap_projection_split(y0, pair, weight, bias, gate)

    def general_path(x, weight, bias, gate):
        y = edge_rotation(x, wig, csr, lmax, 1, "extension")
        return gated_tap_projection(
            y, weight, bias, gate, lmax, 1, -1, backend="extension", weight_order="tap"
        )

    inputs = [t.clone().requires_grad_() for t in (x, weight, bias, gate)]
    assert torch.autograd.gradcheck(split_path, inputs)
    dout = torch.randn(csr.idx.shape[0], 4, h, generator=g, dtype=torch.float64)
    results = []
    for fn in (split_path, general_path):
        args = [t.clone().requires_grad_() for t in (x, weight, bias, gate)]
        out = fn(*args)
        out.backward(dout)
        results.append([out.detach(), *(a.grad for a in args)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_model_with_and_without_the_split_rotation(monkeypatch):
    """The fused model (extension, float64) with the split rotation and without it: the same energies,
    forces and parameter gradients; the split path really ran."""
    g = load_golden("tiny__pt_bulk_rattled.pt")
    calls = []
    real = messages_mod.edge_rotation_split
    monkeypatch.setattr(
        messages_mod, "edge_rotation_split", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    results = {}
    for split in (True, False):
        monkeypatch.setattr(planning_mod, "SPLIT_ROTATION", split)
        model = SphericalChannelNetwork(**g["config"], use_fused=True, backend="extension")
        model.load_state_dict(g["state_dict"])
        model.double()
        torch.manual_seed(g["seed"])
        out = model(golden_inputs(g))
        (out["energy"].pow(2).sum() + out["forces"].pow(2).sum()).backward()
        grads = {n: to_upstream_layout(model, n, p.grad) for n, p in model.named_parameters()}
        results[split] = (out["energy"].detach(), out["forces"].detach(), grads)
        assert model.explain()["edge_rotation"]["variant"]["split_rotation"] == split
        if split:
            assert calls, "the split rotation did not run"
            calls.clear()
        else:
            assert not calls
    (e1, f1, g1), (e0, f0, g0) = results[True], results[False]
    torch.testing.assert_close(e1, e0, rtol=1e-12, atol=0)
    torch.testing.assert_close(f1, f0, rtol=1e-10, atol=1e-12 * f0.abs().max().item())
    for key in g0:
        scale = max(g0[key].abs().max().item(), 1e-30)
        assert (g1[key] - g0[key]).abs().max() <= 1e-10 * scale, key
