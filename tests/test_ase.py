"""scn_fast.ase.SCNCalculator: predict through ASE, graph rebuilt as atoms move, optimizers and MD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import molecule
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from scn_fast import load_checkpoint
from scn_fast.ase import SCNCalculator
from scn_fast.systems import cu111_co

from .conftest import GOLDEN_DIR

CKPT = GOLDEN_DIR / "checkpoints" / "scn_public_fairchem_layout.pt"


@pytest.fixture(scope="module")
def calc() -> SCNCalculator:
    return SCNCalculator(CKPT)


def test_matches_predict(calc: SCNCalculator) -> None:
    atoms = cu111_co()
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    model = load_checkpoint(CKPT, deterministic_frames=True)
    out = model.predict(atoms)
    assert energy == pytest.approx(out["energy"].item(), rel=1e-6, abs=1e-7)
    np.testing.assert_allclose(forces, out["forces"].double().numpy(), rtol=1e-5, atol=1e-9)
    assert forces.dtype == np.float64 and forces.shape == (len(atoms), 3)


def test_changes_when_an_atom_moves(calc: SCNCalculator) -> None:
    atoms = cu111_co()
    atoms.calc = calc
    e0, f0 = atoms.get_potential_energy(), atoms.get_forces().copy()
    assert atoms.get_potential_energy() == e0  # cached, not recomputed
    atoms.positions[-1] += [0.3, 0.0, 0.2]
    e1, f1 = atoms.get_potential_energy(), atoms.get_forces()
    assert e1 != e0 and not np.allclose(f1, f0)
    atoms.positions[-1] -= [0.3, 0.0, 0.2]
    assert atoms.get_potential_energy() == pytest.approx(e0, rel=1e-6)  # deterministic frames


def test_pbc_and_cell_from_atoms(calc: SCNCalculator) -> None:
    mol = molecule("CO")  # no cell, no pbc
    mol.calc = calc
    assert np.isfinite(mol.get_potential_energy())
    periodic = Atoms("Cu", positions=[[0, 0, 0]], cell=np.eye(3) * 2.6, pbc=True)
    periodic.calc = calc
    e_periodic = periodic.get_potential_energy()
    periodic.pbc = False  # only the cell's images made neighbours: now an isolated atom
    assert periodic.get_potential_energy() != e_periodic


def test_bfgs_and_md_run(calc: SCNCalculator) -> None:
    atoms = cu111_co()
    atoms.calc = calc
    opt = BFGS(atoms, logfile=None)
    opt.run(fmax=1e-6, steps=3)
    assert opt.get_number_of_steps() == 3
    e_before = atoms.get_potential_energy()
    atoms.set_momenta(np.random.default_rng(0).normal(scale=0.5, size=(len(atoms), 3)))
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs, logfile=None)
    dyn.run(3)
    assert np.isfinite(atoms.get_potential_energy()) and atoms.get_potential_energy() != e_before


def test_model_instance_and_errors() -> None:
    model = load_checkpoint(CKPT, deterministic_frames=True)
    calc = SCNCalculator(model, device="cpu")
    assert calc.model is model
    atoms = cu111_co()
    atoms.calc = calc
    assert np.isfinite(atoms.get_potential_energy())
    with pytest.raises(ValueError, match="load_kwargs"):
        SCNCalculator(model, use_fused=True)
    with pytest.raises(TypeError, match="checkpoint path"):
        SCNCalculator(42)  # type: ignore[arg-type]
    bad = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 0]])
    bad.calc = calc
    with pytest.raises(ValueError):
        bad.get_potential_energy()
    assert torch.is_tensor(next(calc.model.parameters()))
