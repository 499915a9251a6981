"""load_checkpoint / save_checkpoint / predict against the golden trainer checkpoints.

tests/golden/checkpoints holds one small SCN saved as ocpmodels and as fairchem saved it (weights under
``module.``, EMA shadow weights, normalizers), and what upstream computed from it: ``forward`` with the
plain weights (``raw_state_dict_weights``) and fairchem's prediction (``predicted_ev``: EMA weights,
energy * std + mean, forces * std). The expected values are upstream float32; the float32 tolerance
(docs/tolerances.md) is judged against our float64 run of the same weights and frame draws, relative
to upstream's own float32 error there.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from scn_fast import SphericalChannelNetwork, load_checkpoint, preset, save_checkpoint
from scn_fast.checkpoint import read_checkpoint

from .conftest import GOLDEN_DIR, TOL, energy_error, force_error

CKPT_DIR = GOLDEN_DIR / "checkpoints"
LAYOUTS = ["ocpmodels", "fairchem"]


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(CKPT_DIR / "scn_public_expected.pt", weights_only=True)


def _inputs(e: dict, dtype: torch.dtype = torch.float32) -> types.SimpleNamespace:
    data = types.SimpleNamespace(**{k: v.clone() for k, v in e["inputs"].items()})
    data.pos, data.cell = data.pos.to(dtype), data.cell.to(dtype)
    return data


def _run(model, e: dict, dtype: torch.dtype, predict: bool) -> dict:
    torch.manual_seed(e["seed"])
    with torch.no_grad():
        return (model.predict if predict else model)(_inputs(e, dtype))


def _check_fp32(ours: dict, upstream: dict, truth: dict) -> None:
    u = force_error(upstream["forces"], truth["forces"])
    tol = TOL["reference_fp32"]
    assert energy_error(ours["energy"], truth["energy"]) <= tol["energy"]
    assert force_error(ours["forces"], truth["forces"]) <= max(
        tol["force_u_factor"] * u, tol["force_floor"]
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("use_ema", [False, None], ids=["state_dict", "ema_default"])
def test_golden_checkpoint(layout: str, use_ema: bool | None, expected: dict) -> None:
    path = CKPT_DIR / f"scn_public_{layout}_layout.pt"
    predict = use_ema is None  # fairchem's prediction: EMA weights and normalizers
    want = expected["predicted_ev" if predict else "raw_state_dict_weights"]
    model = load_checkpoint(path, use_ema=use_ema)
    assert not model.training
    ours = _run(model, expected, torch.float32, predict)
    truth = _run(load_checkpoint(path, use_ema=use_ema).double(), expected, torch.float64, predict)
    _check_fp32(ours, want, truth)


def test_layouts_agree_and_normalizers(expected: dict) -> None:
    a = load_checkpoint(CKPT_DIR / "scn_public_ocpmodels_layout.pt")
    b = load_checkpoint(CKPT_DIR / "scn_public_fairchem_layout.pt")
    assert a.normalizers == b.normalizers
    assert a.normalizers["energy"]["mean"] == pytest.approx(-0.7554, abs=1e-4)
    assert a.normalizers["forces"]["mean"] == 0.0
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


def test_ema_weights_differ_from_state_dict() -> None:
    path = CKPT_DIR / "scn_public_fairchem_layout.pt"
    plain, ema = load_checkpoint(path, use_ema=False), load_checkpoint(path)
    ckpt = read_checkpoint(path)
    shadow = ckpt["ema"]["shadow_params"]
    params = list(ema.parameters())
    assert all(torch.equal(p, s) for p, s in zip(params, shadow, strict=True))
    assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), params, strict=True))


def test_model_kwargs_override_and_unknown_keys(tmp_path) -> None:
    ckpt = read_checkpoint(CKPT_DIR / "scn_public_ocpmodels_layout.pt")
    ckpt["config"]["model_attributes"] = {
        **ckpt["config"]["model_attributes"],
        "num_atoms": 0,
        "bond_feat_dim": 50,
        "num_targets": 1,
        "some_future_flag": True,
    }
    with pytest.warns(UserWarning, match="some_future_flag"):
        model = load_checkpoint(ckpt, use_fused=True, deterministic_frames=True)
    assert model.dispatcher.use_fused and model.deterministic_frames


def test_bad_checkpoints(tmp_path) -> None:
    ckpt = read_checkpoint(CKPT_DIR / "scn_public_fairchem_layout.pt")
    state = dict(ckpt["state_dict"])
    state.pop("module.energy_fc1.weight")
    state["module.extra.weight"] = torch.zeros(1)
    state["module.energy_fc3.bias"] = torch.zeros(2)
    with pytest.raises(ValueError) as err:
        load_checkpoint({**ckpt, "state_dict": state})
    msg = str(err.value)
    assert "energy_fc1.weight" in msg and "extra.weight" in msg and "energy_fc3.bias" in msg
    other = {**ckpt, "config": {**ckpt["config"], "model": {"name": "gemnet_oc"}}}
    with pytest.raises(ValueError, match="gemnet_oc"):
        load_checkpoint(other)
    with pytest.raises(ValueError, match="no EMA"):
        load_checkpoint({**ckpt, "ema": None}, use_ema=True)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_save_roundtrip(tmp_path) -> None:
    torch.manual_seed(3)
    model = SphericalChannelNetwork(**preset("tiny"), deterministic_frames=True)
    shadow = [p.detach() + 0.01 for p in model.parameters()]
    norms = {"energy": {"mean": -1.5, "rmsd": 2.0}, "forces": {"mean": 0.0, "rmsd": 0.5}}
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, normalizers=norms, ema_shadow=shadow, ema_decay=0.99, step=7)
    loaded = load_checkpoint(path, deterministic_frames=True)
    assert loaded.normalizers == norms
    assert all(torch.equal(p, s) for p, s in zip(loaded.parameters(), shadow, strict=True))
    plain = load_checkpoint(path, use_ema=False, deterministic_frames=True)
    from scn_fast.systems import cu111_co

    raw = model.eval()(__import__("scn_fast").AtomsBatch.from_ase(cu111_co()))
    with torch.no_grad():
        out = plain.predict(cu111_co())
    assert torch.allclose(out["energy"], raw["energy"] * 2.0 - 1.5, rtol=1e-6, atol=1e-6)
    assert torch.allclose(out["forces"], raw["forces"] * 0.5, rtol=1e-6, atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_checkpoint(path)["config"]["model"]["name"] == "scn"
