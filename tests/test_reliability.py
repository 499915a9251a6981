"""Reliability regressions: training configurations that used to crash (a one-tap resolution
without edges) and input conditioning (absolute coordinates far from the origin)."""

from __future__ import annotations

import pytest
import torch

from scn_fast import AtomsBatch, SphericalChannelNetwork, preset

from .conftest import TOL, energy_forces_grads


@pytest.mark.parametrize("backend", ["extension", "triton"])
@pytest.mark.parametrize("knobs", [{"num_taps": 1}, {"mmax": 0}], ids=["num_taps=1", "mmax=0"])
def test_one_tap_resolution_without_edges_trains(knobs, backend):
    """CH4 in vacuum: 4 neighbours per atom, so the far resolution (ranks >= 12) has no edges.
    With one tap (num_taps=1, or mmax=0) the fused backward used to index row 0 of an empty
    tensor; it must now give the reference's energy, forces and every parameter gradient."""
    from ase.build import molecule

    atoms = molecule("CH4")
    atoms.center(vacuum=4.0)
    atoms.pbc = False
    data = AtomsBatch.from_ase([atoms], dtype=torch.float64)
    cfg = {**preset("tiny"), **knobs, "deterministic_frames": True}
    torch.manual_seed(0)
    ref = SphericalChannelNetwork(**cfg).double()
    fused = SphericalChannelNetwork(**cfg, use_fused=True, backend=backend)
    fused.load_state_dict(ref.state_dict())
    fused.double()
    e0, f0, g0 = energy_forces_grads(ref, data)
    e1, f1, g1 = energy_forces_grads(fused, data)
    assert fused.explain()["edge_rotation"]["ran"] == backend
    tol = TOL["fused_fp64"]
    assert (e1 - e0).abs().max() <= tol["energy"] * max(1.0, float(e0.abs().max()))
    assert (f1 - f0).abs().max() <= tol["force"] * float(f0.abs().max())
    assert set(g1) == set(g0)
    for key in g0:
        scale = max(float(g0[key].abs().max()), 1e-30)
        assert float((g1[key] - g0[key]).abs().max()) <= tol["force"] * scale, key


def test_far_from_origin_positions_keep_their_precision():
    """A slab 1e6 Angstrom from the origin used to round positions by 0.025 Angstrom in float32
    and move the forces by 0.66%; from_ase now subtracts a per-structure origin in float64, so
    the float32 forces agree with the same slab at the origin to float32 rounding."""
    from ase.build import add_adsorbate, fcc111

    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    add_adsorbate(slab, "O", 1.5, "fcc")
    slab.rattle(0.05, seed=1)
    far = slab.copy()
    far.translate([1e6, -2e6, 1e6])
    torch.manual_seed(0)
    cfg = {**preset("tiny"), "num_interactions": 1, "cutoff": 6.0}
    model = SphericalChannelNetwork(**cfg, deterministic_frames=True)
    with torch.no_grad():
        near_out = model(AtomsBatch.from_ase([slab]))
        far_out = model(AtomsBatch.from_ase([far]))
    scale = float(near_out["forces"].abs().max())
    assert float((far_out["forces"] - near_out["forces"]).abs().max()) <= 1e-4 * scale
    assert abs(float(far_out["energy"] - near_out["energy"])) <= 1e-5 * max(
        1.0, abs(float(near_out["energy"]))
    )
    batch = AtomsBatch.from_ase([far])
    absolute = batch.pos.double() + batch.origin[batch.batch]
    assert torch.allclose(absolute, torch.as_tensor(far.get_positions()), atol=1e-5, rtol=0)


_CACHE_ENV_SCRIPT = """
import os, torch
from scn_fast.extension import load_extension
ext = load_extension()
for text in ["1e9", "abc", "-1", " 5", "", "99999999999999999999999", "12MB"]:
    os.environ["SCN_FAST_CPU_CACHE_BYTES"] = text
    try:
        ext.cached_empty([1 << 20], torch.float32)
    except RuntimeError as exc:
        assert "SCN_FAST_CPU_CACHE_BYTES" in str(exc) and repr(text)[1:-1] in str(exc), str(exc)
    else:
        raise SystemExit(f"accepted {text!r}")
os.environ["SCN_FAST_CPU_CACHE_BYTES"] = "8388608"
t = ext.cached_empty([1 << 20], torch.float32)
del t
print("cached", ext.cpu_cache_bytes())
"""


def test_cpu_cache_limit_is_parsed_strictly():
    """SCN_FAST_CPU_CACHE_BYTES used to read "1e9" as 1 byte, "abc" as 0 and "-1" as unlimited:
    anything but decimal digits is now an error naming the variable (a fresh process, as the
    limit is read once, at the cache's first use)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "SCN_FAST_CPU_CACHE_BYTES"}
    run = subprocess.run(
        [sys.executable, "-c", _CACHE_ENV_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == f"cached {4 << 20}"


def test_train_out_naming_a_file_is_a_clear_error(tmp_path):
    """--out names a directory; an existing file there used to end the run (after training) with
    a raw FileExistsError traceback."""
    from scn_fast.cli import main

    out = tmp_path / "taken"
    out.write_text("")
    argv = ["train", "--data", "emt", "--preset", "tiny", "--steps", "1", "--out", str(out)]
    with pytest.raises(SystemExit, match=r"--out .*taken is a file"):
        main(argv)


def test_pbc_of_wrong_shape_is_reported_as_given():
    import types

    data = AtomsBatch.from_ase([_small_slab()])
    bad = types.SimpleNamespace(**{**vars(data), "pbc": torch.tensor([True, True])})
    model = SphericalChannelNetwork(**{**preset("tiny"), "num_interactions": 1})
    with pytest.raises(ValueError, match=r"pbc must have shape \(B, 3\) or \(3,\), got \(2,\)"):
        model(bad)


def _small_slab():
    from ase.build import fcc111

    return fcc111("Cu", size=(1, 1, 2), vacuum=4.0)


def test_empty_checkpoint_file_names_the_reason(tmp_path):
    """An empty file used to give an empty reason and suggest weights_only=False."""
    from scn_fast import load_checkpoint

    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty") as info:
        load_checkpoint(path)
    assert "weights_only=False" not in str(info.value)
    truncated = tmp_path / "truncated.pt"
    torch.save({"a": torch.zeros(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"truncated.pt as a checkpoint .*: \S"):
        load_checkpoint(truncated)


def test_checkpoint_config_mismatch_warns(tmp_path):
    """num_taps and distance_function change the model without changing its shapes: a checkpoint
    whose config was edited, or a load that overrides them, used to load silently."""
    import warnings

    from scn_fast import load_checkpoint
    from scn_fast.checkpoint import save_checkpoint

    cfg = {**preset("tiny"), "num_interactions": 1}
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, SphericalChannelNetwork(**cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(path)  # unchanged: no warning
    with pytest.warns(UserWarning, match="num_taps: trained -1, now 1"):
        load_checkpoint(path, num_taps=1)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["model"]["distance_function"] = "sigmoid"
    with pytest.warns(UserWarning, match="distance_function: trained 'gaussian', now 'sigmoid'"):
        load_checkpoint(ckpt)
