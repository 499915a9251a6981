"""Validation while training, ``scn-fast evaluate`` and ``scn-fast predict`` with a checkpoint
(extxyz output, relaxation), batches by atom budget; all on a few EMT slabs and the tiny preset."""

from __future__ import annotations

import csv
import json
import re

import ase.io
import numpy as np
import pytest
import torch

from scn_fast import load_checkpoint
from scn_fast.checkpoint import read_checkpoint
from scn_fast.cli import main
from scn_fast.datasets import open_dataset
from scn_fast.evaluate import evaluate_model
from scn_fast.readers import fixed_mask

TRAIN = ["--preset", "tiny", "--warmup-steps", "0", "--seed", "3", "--deterministic-frames"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step run on 4 EMT slabs (atom-budget batches), validated on 2 others (an ASE db)
    every 2 steps."""
    root = tmp_path_factory.mktemp("run")
    data, val = root / "train.extxyz", root / "val.db"
    assert main(["make-dataset", str(data), "--n", "4", "--seed", "1"]) == 0
    assert main(["make-dataset", str(val), "--n", "2", "--seed", "2"]) == 0
    out = root / "out"
    argv = ["train", "--data", str(data), "--val-data", str(val), *TRAIN, "--steps", "4"]
    argv += ["--batch-size", "4", "--max-atoms-per-batch", "40", "--eval-every", "2"]
    argv += ["--lr", "5e-3", "--out", str(out)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture runs before the per-test one-thread fixture
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return {"data": data, "val": val, "out": out}


def test_validation_while_training(run, capsys):
    out = run["out"]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]
    for r in rows:
        assert float(r["forces_mae"]) > 0 and 0 <= float(r["efwt"]) <= 1
        assert int(r["num_structures"]) == 2
    best = read_checkpoint(out / "best_checkpoint.pt")
    maes = [float(r["forces_mae"]) for r in rows]
    assert best["step"] == [2, 4][int(np.argmin(maes))]
    assert best["train_state"]["best_val_forces_mae"] == pytest.approx(min(maes), rel=1e-6)
    # The logged metrics are those of the EMA weights: re-evaluate the final checkpoint.
    model = load_checkpoint(out / "checkpoint.pt", deterministic_frames=True)
    sums, _ = evaluate_model(model, open_dataset(str(run["val"])), batch_size=1)
    assert sums.result()["forces_mae"] == pytest.approx(maes[-1], rel=1e-5)


def test_val_fraction_and_log_line(tmp_path, run, capsys):
    argv = ["train", "--data", str(run["data"]), "--val-fraction", "0.25", *TRAIN]
    argv += ["--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert re.search(r"^val step 1 energy_mae=\S+ .*forces_mae=\S+", text, re.MULTILINE)
    assert (tmp_path / "o" / "best_checkpoint.pt").exists()
    with pytest.raises(SystemExit):
        main([*argv, "--val-data", str(run["val"])])
    assert "not allowed with argument" in capsys.readouterr().err


def test_evaluate_cli(run, tmp_path, capsys):
    ckpt = str(run["out"] / "checkpoint.pt")
    report = tmp_path / "m.json"
    argv = ["evaluate", "--checkpoint", ckpt, str(run["val"]), "--out", str(report)]
    assert main([*argv, "--batch-size", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "structures/s" in text and "atoms/s" in text
    metrics = json.loads(report.read_text())["metrics"]
    assert metrics["num_structures"] == 2
    # Batched by atom budget: the same numbers.
    argv2 = ["evaluate", "--checkpoint", ckpt, str(run["val"]), "--no-progress"]
    assert main([*argv2, "--max-atoms-per-batch", "40", "--out", str(tmp_path / "b.json")]) == 0
    again = json.loads((tmp_path / "b.json").read_text())["metrics"]
    for key in ("energy_mae", "forces_mae", "forces_cosine", "efwt"):
        assert again[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-7)
    with pytest.raises(SystemExit, match="no such data file"):
        main(["evaluate", "--checkpoint", ckpt, str(tmp_path / "missing.extxyz")])


def test_predict_with_checkpoint_writes_extxyz(run, tmp_path, capsys):
    ckpt = str(run["out"] / "checkpoint.pt")
    out = tmp_path / "pred.extxyz"
    argv = ["predict", str(run["val"]), "--checkpoint", ckpt, "--out", str(out)]
    assert main([*argv, "--max-atoms-per-batch", "20"]) == 0
    frames = ase.io.read(out, ":")
    model = load_checkpoint(ckpt, deterministic_frames=True, otf_graph=True)
    ref = model.predict(ase.io.read(run["val"], ":"))
    assert len(frames) == 2
    energies = [a.get_potential_energy() for a in frames]
    np.testing.assert_allclose(energies, ref["energy"].double().numpy(), rtol=1e-5)
    forces = np.concatenate([a.get_forces(apply_constraint=False) for a in frames])
    np.testing.assert_allclose(forces, ref["forces"].double().numpy(), rtol=1e-4, atol=1e-5)
    assert "checkpoint" in capsys.readouterr().out


def test_predict_relax_keeps_fixed_atoms(run, tmp_path, capsys):
    ckpt = str(run["out"] / "checkpoint.pt")
    out = tmp_path / "relaxed.extxyz"
    argv = ["predict", str(run["val"]), "--checkpoint", ckpt, "--relax", "--out", str(out)]
    assert main([*argv, "--steps", "3", "--fmax", "1e-6", "--optimizer", "FIRE"]) == 0
    start = ase.io.read(run["val"], ":")
    final = ase.io.read(out, ":")
    for a, b in zip(start, final, strict=True):
        fixed = fixed_mask(a)
        assert fixed.any() and np.array_equal(fixed_mask(b), fixed)
        np.testing.assert_allclose(b.positions[fixed], a.positions[fixed], atol=1e-8)
        assert not np.allclose(b.positions[~fixed], a.positions[~fixed])
        assert 1 <= b.info["relax_steps"] <= 3
    traj = ase.io.read(tmp_path / "relaxed_trajectories" / "structure_1.traj", ":")
    assert len(traj) >= 2
    with pytest.raises(SystemExit, match="--relax needs --out"):
        main(["predict", str(run["val"]), "--checkpoint", ckpt, "--relax"])


def test_resume_with_validation_and_atom_budget(run, tmp_path, capsys):
    """Validation (forked RNG) and atom-budget packs resume exactly; metrics.csv is continued."""
    argv = ["train", "--data", str(run["data"]), "--val-fraction", "0.25", *TRAIN]
    argv += ["--batch-size", "2", "--max-atoms-per-batch", "34", "--eval-every", "1"]
    main([*argv, "--steps", "3", "--out", str(tmp_path / "a")])
    full = capsys.readouterr().out
    main([*argv, "--steps", "2", "--out", str(tmp_path / "b")])
    main([*argv, "--steps", "3", "--out", str(tmp_path / "b"), "--resume"])
    resumed = capsys.readouterr().out
    lines = [x for x in full.splitlines() if x.startswith(("step", "val step"))]
    again = [x for x in resumed.splitlines() if x.startswith(("step", "val step"))]
    assert again == lines and len(lines) == 6
    assert (tmp_path / "a" / "metrics.csv").read_text() == (
        tmp_path / "b" / "metrics.csv"
    ).read_text()
