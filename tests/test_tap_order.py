"""fc1_edge_proj's weight held in tap order by the fused model (scn_fast.tap_order): everything a
user or a checkpoint sees stays upstream's (state_dict, calls, init under a seed, saved optimizer
and EMA state), and the conversions are exact."""

from __future__ import annotations

import pytest
import torch

from scn_fast import SphericalChannelNetwork
from scn_fast.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from scn_fast.ops.tap_projection import from_tap_order, to_tap_order
from scn_fast.tap_order import (
    TapOrderedLinear,
    optimizer_state_to_model,
    optimizer_state_to_upstream,
    params_to_upstream,
    tap_ordered_parameters,
    to_model_layout,
    to_upstream_layout,
)

from .conftest import golden_inputs, load_golden

GOLDEN = "tiny__pt_bulk_rattled.pt"


def pair(seed: int = 0) -> tuple[SphericalChannelNetwork, SphericalChannelNetwork]:
    """(reference, fused) models of the golden tiny config built under the same seed."""
    cfg = load_golden(GOLDEN)["config"]
    torch.manual_seed(seed)
    ref = SphericalChannelNetwork(**cfg)
    torch.manual_seed(seed)
    fused = SphericalChannelNetwork(**cfg, use_fused=True, backend="extension")
    return ref, fused


def test_fused_model_holds_tap_order_and_shows_upstream_state():
    ref, fused = pair()
    layers = tap_ordered_parameters(fused)
    assert layers and not tap_ordered_parameters(ref)  # 4-tap resolutions of every block
    assert all(isinstance(m, TapOrderedLinear) for m in layers.values())
    ref_state, fused_state = ref.state_dict(), fused.state_dict()
    assert ref_state.keys() == fused_state.keys()
    for key in ref_state:  # same seed, same numbers, upstream's layout
        assert torch.equal(ref_state[key], fused_state[key]), key
    params = dict(fused.named_parameters())
    for name, layer in layers.items():
        up = ref_state[name]
        assert torch.equal(params[name].detach(), to_tap_order(up, *layer.tap_layout))
        assert not torch.equal(params[name].detach(), up)  # really permuted
        assert torch.equal(from_tap_order(params[name].detach(), *layer.tap_layout), up)


def test_load_state_dict_converts_and_leaves_the_callers_dict_alone():
    _, fused = pair()
    other, _ = pair(seed=5)
    state = other.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    fused.load_state_dict(state, strict=True)
    for key, value in state.items():
        assert torch.equal(value, before[key]), key
        assert torch.equal(fused.state_dict()[key], value), key
    bad = dict(state)
    name = next(iter(tap_ordered_parameters(fused)))
    bad[name] = bad[name][:, :-1]
    with pytest.raises(RuntimeError, match="size mismatch"):
        fused.load_state_dict(bad)


def test_calling_the_layer_computes_upstreams_map():
    ref, fused = pair()
    name = next(iter(tap_ordered_parameters(fused)))
    layer_name = name.rsplit(".", 1)[0]
    up, mine = ref.get_submodule(layer_name), fused.get_submodule(layer_name)
    x = torch.randn(5, up.in_features)
    assert torch.allclose(mine(x), up(x), rtol=0, atol=1e-6)


def test_gradients_match_the_reference_in_upstream_layout():
    g = load_golden(GOLDEN)
    ref, fused = pair()
    ref.load_state_dict(g["state_dict"])
    fused.load_state_dict(g["state_dict"])
    grads = {}
    for name, model in (("ref", ref.double()), ("fused", fused.double())):
        model.zero_grad()
        torch.manual_seed(g["seed"])
        out = model(golden_inputs(g))
        (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
        grads[name] = {n: to_upstream_layout(model, n, p.grad) for n, p in model.named_parameters()}
    for name in tap_ordered_parameters(fused):
        a, b = grads["fused"][name], grads["ref"][name]
        assert (a - b).abs().max() <= 1e-10 * b.abs().max(), name


def test_optimizer_state_round_trip_is_exact_and_matches_the_reference():
    """AdamW on the fused model with the reference's gradients (moved into tap order) keeps moments
    that, converted, equal the reference optimizer's bit for bit; the conversions invert."""
    ref, fused = pair()
    torch.manual_seed(1)
    for p in ref.parameters():
        p.grad = torch.randn_like(p)
    for (n, p), q in zip(fused.named_parameters(), ref.parameters(), strict=True):
        p.grad = to_model_layout(fused, n, q.grad).clone()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, amsgrad=True) for m in (ref, fused)]
    for o in opts:
        o.step()
    ref_state = opts[0].state_dict()
    up = optimizer_state_to_upstream(fused, opts[1].state_dict())
    assert up["state"].keys() == ref_state["state"].keys()
    for index, entry in ref_state["state"].items():
        for key, value in entry.items():
            assert torch.equal(up["state"][index][key], value), (index, key)
    for name, value in ref.state_dict().items():  # the parameters moved identically
        assert torch.equal(fused.state_dict()[name], value), name
    back = optimizer_state_to_model(fused, up)
    for index, entry in opts[1].state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(back["state"][index][key], value), (index, key)


def test_checkpoint_ema_is_saved_and_read_in_upstream_layout(tmp_path):
    ref, fused = pair()
    shadow = [p.detach() * 2 for p in fused.parameters()]  # EMA-like tensors in the model's layout
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, fused, ema_shadow=shadow, ema_decay=0.999)
    saved = read_checkpoint(path)["ema"]["shadow_params"]
    for s, p in zip(saved, ref.parameters(), strict=True):
        assert torch.equal(s, p.detach() * 2)  # upstream's layout
    assert all(
        torch.equal(a, b) for a, b in zip(saved, params_to_upstream(fused, shadow), strict=True)
    )
    for use_fused in (False, True):
        model = load_checkpoint(path, use_ema=True, use_fused=use_fused)
        want = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            got = to_upstream_layout(model, name, p.detach())
            assert torch.equal(got, 2 * want[name].detach()), (use_fused, name)


@pytest.mark.parametrize("lmax", [1, 4, 6])
@pytest.mark.parametrize("mmax", [0, 1])
@pytest.mark.parametrize("num_taps", [-1, 1, 4])
def test_has_tap_order_agrees_with_the_tap_set(lmax, mmax, num_taps):
    """The arithmetic predicate (traceable by torch.compile) matches upstream's tap set."""
    from scn_fast.ops.layout import tap_symmetry
    from scn_fast.ops.tap_projection import has_tap_order

    four = tap_symmetry(lmax, mmax, num_taps).num_taps == 4
    assert has_tap_order(lmax, mmax, num_taps) == four
