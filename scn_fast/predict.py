"""Predicting and relaxing structures with a model: batched energies and forces (eV, eV/Å) attached
to copies of the input frames, and relaxations with ASE optimizers through ``SCNCalculator``
(``FixAtoms`` constraints are kept, so fixed atoms stay in place)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from .batching import iter_batches
from .data import AtomsBatch

OPTIMIZERS = ("BFGS", "FIRE")


def _with_results(atoms: Atoms, energy: float, forces: np.ndarray) -> Atoms:
    out = atoms.copy()
    out.calc = SinglePointCalculator(out, energy=energy, free_energy=energy, forces=forces)
    return out


@torch.no_grad()
def predict_frames(
    model: Any,
    frames: Sequence[Atoms],
    batch_size: int | None = 16,
    max_atoms: int | None = None,
) -> list[Atoms]:
    """Copies of ``frames`` with ``model.predict``'s energy and forces attached (ASE's
    ``SinglePointCalculator``), computed in batches of at most ``batch_size`` structures and
    ``max_atoms`` atoms."""
    device = next(model.parameters()).device
    out: list[Atoms] = []
    for idx in iter_batches(range(len(frames)), lambda i: len(frames[i]), batch_size, max_atoms):
        batch = [frames[i] for i in idx]
        pred = model.predict(AtomsBatch.from_ase(batch, dtype=model.dtype, device=device))
        energy = pred["energy"].detach().to("cpu", torch.float64).numpy()
        if "forces" not in pred:
            raise ValueError("the model predicts no forces (regress_forces=False)")
        forces = pred["forces"].detach().to("cpu", torch.float64).numpy()
        offset = 0
        for k, atoms in enumerate(batch):
            n = len(atoms)
            out.append(_with_results(atoms, float(energy[k]), forces[offset : offset + n]))
            offset += n
    return out


def relax_frames(
    model: Any,
    frames: Sequence[Atoms],
    *,
    fmax: float = 0.05,
    steps: int = 200,
    optimizer: str = "BFGS",
    trajectory_dir: str | None = None,
    logfile: str | None = None,
) -> list[Atoms]:
    """Relax each frame with ``optimizer`` (BFGS or FIRE) until every force on a free atom is below
    ``fmax`` eV/Å or ``steps`` steps are done; ``FixAtoms`` constraints hold. Returns the final
    structures with energy and forces attached and ``info`` keys ``relax_steps``, ``converged``;
    ``trajectory_dir/structure_K.traj`` receives each relaxation's trajectory."""
    from ase.io.trajectory import Trajectory
    from ase.optimize import BFGS, FIRE

    from .ase import SCNCalculator

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}: use one of {OPTIMIZERS}")
    if not fmax > 0 or steps < 0:
        raise ValueError(f"--fmax must be > 0 and --steps >= 0, got {fmax}, {steps}")
    opt_class = {"BFGS": BFGS, "FIRE": FIRE}[optimizer]
    if trajectory_dir is not None:
        os.makedirs(trajectory_dir, exist_ok=True)
    calc = SCNCalculator(model)
    out = []
    for k, frame in enumerate(frames):
        atoms = frame.copy()
        atoms.calc = calc
        traj = None
        if trajectory_dir is not None:
            traj = Trajectory(os.path.join(trajectory_dir, f"structure_{k}.traj"), "w")
        try:
            opt = opt_class(atoms, trajectory=traj, logfile=logfile)
            converged = bool(opt.run(fmax=fmax, steps=steps))
        finally:
            if traj is not None:
                traj.close()
        energy = float(atoms.get_potential_energy())
        final = _with_results(atoms, energy, atoms.get_forces(apply_constraint=False))
        final.info.update({"relax_steps": int(opt.get_number_of_steps()), "converged": converged})
        out.append(final)
    return out
