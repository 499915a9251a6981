"""MD overhead: the ASE calculator's reuse between steps and time split, and ``scn-fast bench-md``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scn_fast import SphericalChannelNetwork
from scn_fast.ase import SCNCalculator
from scn_fast.benchmark.md import md_benchmark
from scn_fast.cli import main
from scn_fast.presets import preset
from scn_fast.systems import cu111_co


@pytest.fixture(scope="module")
def model() -> SphericalChannelNetwork:
    torch.manual_seed(0)
    return SphericalChannelNetwork(
        **preset("tiny"), use_fused=True, deterministic_frames=True
    ).eval()


def test_calculator_timings_and_reuse(model: SphericalChannelNetwork) -> None:
    atoms = cu111_co(size=(2, 2, 3))
    calc = SCNCalculator(model)
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    assert set(calc.timings) == {"transfer", "graph", "model", "total"}
    assert all(v >= 0 for v in calc.timings.values()) and calc.timings["model"] > 0
    parts = calc.timings["transfer"] + calc.timings["graph"] + calc.timings["model"]
    assert parts <= calc.timings["total"] + 1e-9
    fixed = dict(calc.runner._fixed)
    atoms.positions[0] += [0.1, 0.0, 0.0]
    e1 = atoms.get_potential_energy()
    assert e1 != e0 and calc.timing_totals["calls"] == 2
    # positions changed, nothing else: the device tensors of numbers, cell, pbc are the same objects
    assert all(calc.runner._fixed[k] is v for k, v in fixed.items())
    # the outputs are those of predict
    out = model.predict(atoms)
    assert e1 == pytest.approx(out["energy"].item(), rel=1e-6, abs=1e-7)
    np.testing.assert_allclose(atoms.get_forces(), out["forces"].double().numpy(), atol=1e-6)
    # a changed element rebuilds them, and is seen by the model
    atoms.numbers[-1] = 8
    e2 = atoms.get_potential_energy()
    assert calc.runner._fixed["atomic_numbers"] is not fixed["atomic_numbers"]
    assert int(calc.runner._fixed["atomic_numbers"][-1]) == 8 and e2 != e1
    with pytest.raises(TypeError, match="bucketing"):
        SCNCalculator(model, bucketing="yes")


def test_md_benchmark_records() -> None:
    (rec,) = md_benchmark("tiny", [14], steps=2, warmup=0, echo=False)
    assert rec.atoms == 14 and rec.edges > 0 and rec.steps == 2 and rec.path == "fused"
    assert rec.steps_per_s > 0 and rec.cpu_seconds > 0
    assert rec.steps_per_s == pytest.approx(2 / rec.seconds, rel=1e-4)
    assert rec.ns_per_day_at_1fs == pytest.approx(rec.steps_per_s * 0.0864, rel=1e-4)
    assert rec.atom_steps_per_s == pytest.approx(rec.steps_per_s * 14, rel=1e-4)
    assert set(rec.per_step_ms) == {"transfer", "graph", "model", "calculator", "ase_and_other"}
    assert rec.per_step_ms["model"] > 0 and len(rec.shapes) >= 1


def test_bench_md_cli(tmp_path, capsys) -> None:
    out = tmp_path / "md.json"
    args = ["bench-md", "--preset", "tiny", "--sizes", "14", "--steps", "1", "--warmup", "0"]
    assert main([*args, "--bucketing", "--out", str(out)]) == 0
    (rec,) = json.loads(out.read_text())
    assert rec["bucketing"] is True and rec["path"] == "fused" and rec["atoms"] == 14
    assert len(rec["shapes"]) == 1 and rec["shapes"][0][0] > 14  # padded atoms
    assert "steps/s" in capsys.readouterr().out
