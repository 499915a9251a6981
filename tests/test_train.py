"""``scn-fast train``: loss, normalizers, LR schedule, EMA, the CLI run, resume, YAML, errors, DDP."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from scn_fast import AtomsBatch, load_checkpoint
from scn_fast.checkpoint import read_checkpoint
from scn_fast.cli import main
from scn_fast.datasets import (
    LabeledBatch,
    SampleOrder,
    TrainingSet,
    emt_dataset,
    fit_normalizers,
    rank_share,
)
from scn_fast.train import (
    ExponentialMovingAverage,
    energy_abs_sum,
    force_l2_sum,
    training_loss,
    warmup_lr_lambda,
)

STEP_RE = re.compile(r"^step (\d+) loss=(\S+)", re.MULTILINE)
# Small, fast settings shared by the runs (tiny preset, 2-structure steps, no warmup).
COMMON = ["--preset", "tiny", "--warmup-steps", "0", "--seed", "3", "--deterministic-frames"]


def _losses(text: str) -> list[float]:
    return [float(m.group(2)) for m in STEP_RE.finditer(text)]


def _rel_diff(a: dict, b: dict) -> tuple[float, float]:
    """(max |a - b| / max |b| over all weights together, the worst of that per tensor)."""
    assert a.keys() == b.keys()
    diff = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}
    scale = {k: b[k].double().abs().max().item() for k in a}
    worst = max(diff[k] / max(scale[k], 1e-12) for k in a)
    return max(diff.values()) / max(scale.values()), worst


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: multithreaded MKL picks its thread count by machine load, so two
    identical runs can differ at rounding level; with one thread training is bitwise repeatable
    (and faster on a busy 2-core machine). torchrun's workers get OMP_NUM_THREADS=1 too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def emt_file(tmp_path_factory) -> Path:
    """Four EMT-labelled slabs written by ``scn-fast make-dataset``."""
    path = tmp_path_factory.mktemp("data") / "emt4.extxyz"
    assert main(["make-dataset", str(path), "--n", "4", "--seed", "1"]) == 0
    return path


# ----------------------------------------------------------------------------- pure functions


def _toy_batch() -> LabeledBatch:
    data = AtomsBatch.from_ase([Atoms("H2", positions=[[0, 0, 0], [0, 0, 1]]), Atoms("H")])
    return LabeledBatch(
        data=data,
        energy=torch.tensor([0.0, 4.0], dtype=torch.float64),
        forces=torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0], [100.0, 0.0, 0.0]]).double(),
        free=torch.tensor([True, True, False]),
    )


def test_loss_hand_computed():
    batch = _toy_batch()
    out = {"energy": torch.tensor([1.0, 2.0]), "forces": torch.zeros(3, 3)}
    assert energy_abs_sum(out["energy"], batch.energy.float()).item() == 3.0  # |1| + |-2|
    # ||(3,4,0)|| + ||(0,0,1)||; the fixed atom's force of 100 is excluded.
    assert force_l2_sum(out["forces"], batch.forces.float(), batch.free).item() == 6.0
    kw = {"energy_coefficient": 2.0, "force_coefficient": 100.0}
    loss = training_loss(out, batch, {}, num_structures=2, num_free_atoms=2, **kw)
    assert loss.item() == pytest.approx(2 * 1.5 + 100 * 3.0)  # MAE 1.5, L2MAE 3
    # Normalized targets: energy (E - 1) / 2 = (-0.5, 1.5); forces F / 0.5.
    norms = {"energy": {"mean": 1.0, "rmsd": 2.0}, "forces": {"mean": 0.0, "rmsd": 0.5}}
    loss = training_loss(out, batch, norms, num_structures=2, num_free_atoms=2, **kw)
    assert loss.item() == pytest.approx(2 * (1.5 + 0.5) / 2 + 100 * (10 + 2) / 2)
    # A rank's share uses the global counts: shares over a split batch sum to the whole.
    half = training_loss(out, batch, norms, num_structures=4, num_free_atoms=5, **kw)
    assert half.item() == pytest.approx(2 * 2 / 4 + 100 * 12 / 5)


def test_normalizers_and_fixed_atoms():
    atoms = []
    for k, energy in enumerate((1.0, 3.0)):
        a = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]], cell=[5, 5, 5], pbc=True)
        forces = np.array([[1.0, -1.0, 0.0], [2.0, 0.0, k]])
        a.set_constraint(FixAtoms(indices=[0]))
        a.calc = SinglePointCalculator(a, energy=energy, forces=forces)
        atoms.append(a)
    ts = TrainingSet(atoms)
    norms = fit_normalizers(ts)
    assert norms["energy"]["mean"] == pytest.approx(2.0)
    assert norms["energy"]["rmsd"] == pytest.approx(math.sqrt(2.0))  # unbiased std
    components = torch.tensor([1.0, -1, 0, 2, 0, 0, 1, -1, 0, 2, 0, 1])
    assert norms["forces"] == {"mean": 0.0, "rmsd": pytest.approx(float(components.std()))}
    batch = ts.batch([1, 0])
    assert batch.free.tolist() == [False, True, False, True]  # FixAtoms -> not in the loss
    assert batch.energy.tolist() == [3.0, 1.0]
    assert ts.num_free.tolist() == [1, 1]


def test_lr_schedule_values():
    sched = {"warmup_steps": 10, "warmup_factor": 0.2, "lr_milestones": [20, 30], "lr_gamma": 0.5}
    values = [warmup_lr_lambda(s, **sched) for s in (0, 5, 10, 19, 20, 29, 30, 100)]
    assert values == pytest.approx([0.2, 0.6, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    assert warmup_lr_lambda(0, 0, 0.2, [], 0.3) == 1.0  # no warmup


def test_ema_update_math():
    p = torch.nn.Parameter(torch.zeros(2))
    ema = ExponentialMovingAverage([p], decay=0.5)
    expected = torch.zeros(2)
    for k, value in enumerate((1.0, 3.0, -2.0), start=1):
        with torch.no_grad():
            p.fill_(value)
        decay = min(0.5, (1 + k) / (10 + k))  # 2/11, 3/12, then 0.5
        ema.update([p])
        expected = expected + (1 - decay) * (value - expected)
        assert torch.allclose(ema.shadow_params[0], expected)
    assert ema.num_updates == 3


def test_data_order_and_rank_split():
    a, b = SampleOrder(5, seed=0), SampleOrder(5, seed=1)
    first = a.next_batch(2) + a.next_batch(2)
    assert len(set(first)) == 4 and a.epoch == 0
    a.next_batch(2)  # one structure left: skipped, a new permutation (drop last)
    assert a.epoch == 1
    b.load_state_dict(a.state_dict())
    assert [a.next_batch(2) for _ in range(4)] == [b.next_batch(2) for _ in range(4)]
    assert rank_share([7, 8, 9, 10], 1, 2) == [9, 10]
    with pytest.raises(ValueError, match="not divisible"):
        rank_share([1, 2, 3], 0, 2)


def test_emt_dataset_labels():
    structures = emt_dataset(n_structures=3, seed=5)
    for atoms in structures:
        assert len(atoms) <= 20 and atoms.constraints
        assert np.abs(atoms.calc.results["forces"]).max() > 0
    again = emt_dataset(n_structures=3, seed=5)
    for x, y in zip(structures, again, strict=True):
        assert np.array_equal(x.positions, y.positions)


# ----------------------------------------------------------------------------- CLI runs


def test_train_run_checkpoint_predict(emt_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", str(emt_file), *COMMON, "--steps", "20", "--batch-size", "4"]
    assert main([*argv, "--lr", "5e-3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rank 0 of 1: 4 samples per step" in text
    losses = _losses(text)
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    # Full-batch steps (4 structures, batch 4): the loss must go down.
    assert losses[-1] < 0.99 * losses[0], losses

    ckpt = read_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 20 and ckpt["config"]["model"]["name"] == "scn"
    assert {"optimizer", "scheduler", "train_state"} <= ckpt.keys()
    assert ckpt["ema"]["num_updates"] == 20
    assert ckpt["train_state"]["losses"] == pytest.approx(losses, rel=1e-6)
    norms = fit_normalizers(TrainingSet(ase.io.read(emt_file, ":")))
    assert float(ckpt["normalizers"]["energy"]["rmsd"]) == pytest.approx(norms["energy"]["rmsd"])

    model = load_checkpoint(out / "checkpoint.pt", deterministic_frames=True)
    for p, s in zip(model.parameters(), ckpt["ema"]["shadow_params"], strict=True):
        assert torch.equal(p.detach(), s)  # EMA weights for prediction
    atoms = ase.io.read(emt_file, ":")
    with torch.no_grad():
        pred = model.predict(AtomsBatch.from_ase(atoms))
    assert pred["energy"].shape == (4,) and torch.isfinite(pred["forces"]).all()


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_resume_reproduces_uninterrupted_run(emt_file, tmp_path, capsys, fused):
    """Resuming continues bit for bit; with the fused model too, whose fc1_edge_proj weights (and
    so their Adam moments and EMA shadows) are in tap order in memory, upstream's in the file."""
    argv = ["train", "--data", str(emt_file), *COMMON, "--batch-size", "2", "--lr", "5e-3"]
    argv += ["--use-fused"] if fused else []
    argv += ["--lr-milestones", "3", "--lr-gamma", "0.5"]
    main([*argv, "--steps", "6", "--out", str(tmp_path / "a")])
    full = _losses(capsys.readouterr().out)
    main([*argv, "--steps", "3", "--out", str(tmp_path / "b")])
    main([*argv, "--steps", "4", "--out", str(tmp_path / "b"), "--resume"])  # b/checkpoint.pt
    resume = ["--resume", str(tmp_path / "b" / "checkpoint.pt"), "--checkpoint-every", "1"]
    main([*argv, "--steps", "6", "--out", str(tmp_path / "c"), *resume])
    resumed = _losses(capsys.readouterr().out)
    assert resumed == full  # steps 1-3, 4, then 5-6 after two resumptions
    a, b = (read_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("a", "c"))
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        assert torch.equal(x, y)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6


def test_model_config_yaml_and_builtin_data(tmp_path, capsys):
    yaml_path = tmp_path / "scn.yml"
    yaml_path.write_text(
        "model:\n  name: scn\n  use_pbc: true\n  otf_graph: true\n  num_interactions: 1\n  hidden_channels: 8\n  sphere_channels: 4\n"
        "  sphere_channels_reduce: 4\n  num_sphere_samples: 8\n  num_basis_functions: 8\n"
        "  lmax: 4\n  num_bands: 1\n  cutoff: 5.0\n  max_num_neighbors: 12\noptim:\n  lr_initial: 1.0\n"
    )
    out = tmp_path / "run"
    argv = ["train", "--data", "builtin:emt", "--model-config", str(yaml_path), "--steps", "1"]
    assert main([*argv, "--batch-size", "2", "--ema-decay", "0", "--out", str(out)]) == 0
    assert len(_losses(capsys.readouterr().out)) == 1
    ckpt = read_checkpoint(out / "checkpoint.pt")
    assert ckpt["config"]["model"]["num_bands"] == 1 and ckpt["ema"] is None
    assert load_checkpoint(out / "checkpoint.pt").model_config["num_interactions"] == 1


def test_bad_inputs(emt_file, tmp_path, monkeypatch):
    unlabeled = tmp_path / "plain.extxyz"
    ase.io.write(unlabeled, [Atoms("Cu", cell=[3, 3, 3], pbc=True)])
    base = ["train", "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"structure 0 of .* has no energy and no forces"):
        main([*base, "--data", str(unlabeled), "--preset", "tiny"])
    with pytest.raises(SystemExit, match="unknown preset 'huge'"):
        main([*base, "--data", str(emt_file), "--preset", "huge"])
    with pytest.raises(SystemExit, match="no such data file"):
        main([*base, "--data", str(tmp_path / "missing.xyz"), "--preset", "tiny"])
    with pytest.raises(SystemExit, match="exactly one of --preset"):
        main([*base, "--data", str(emt_file)])
    with pytest.raises(SystemExit, match="exceeds the 4 structures"):
        main([*base, "--batch-size", "5", "--data", str(emt_file), "--preset", "tiny"])
    # As a process of a 2-process torchrun sees it: 3 structures per step cannot be split.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match=r"--batch-size 3 .* not divisible by the world size 2"):
        main([*base, "--batch-size", "3", "--data", str(emt_file), "--preset", "tiny"])


@pytest.mark.slow
def test_ddp_two_processes_match_one(emt_file, tmp_path, capsys):
    argv = ["train", "--data", str(emt_file), *COMMON, "--batch-size", "4", "--lr", "1e-3"]
    argv += ["--steps", "4", "--warmup-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, "-m", "scn_fast.cli", *argv, "--out", str(tmp_path / "ddp")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"rank {rank} of 2: 2 samples per step" in proc.stdout
    main([*argv, "--out", str(tmp_path / "one")])
    one = _losses(capsys.readouterr().out)
    two = _losses(proc.stdout)
    assert len(two) == len(one) == 4
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(two, one, strict=True))
    ckpts = [read_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("ddp", "one")]
    weight_rel, worst_tensor = _rel_diff(ckpts[0]["state_dict"], ckpts[1]["state_dict"])
    print(
        f"DDP vs one process: losses {loss_rel:.2e}, weights {weight_rel:.2e} (max |dw| / max |w|;"
        f" worst single tensor {worst_tensor:.2e})"
    )
    # Per tensor the match can be looser: some bias entries (m != 0 of fc2_edge) have gradients
    # that vanish up to rounding, which Adam's normalisation turns into O(lr) steps of either sign.
    assert loss_rel < 1e-4 and weight_rel < 1e-4
