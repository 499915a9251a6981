"""Training data: the built-in EMT set, reading labelled ASE files, normalizers, batches, data order.

``emt_dataset`` makes small fcc slabs with an adsorbate, the bottom layer(s) fixed, labelled with
ASE's EMT calculator. ``load_structures("emt" | "builtin:emt" | FILE)`` returns labelled
``ase.Atoms``; ``TrainingSet`` holds their tensors (positions, energies, forces, fixed-atom masks)
and builds batches; ``fit_normalizers`` fits fairchem's target normalizers; ``SampleOrder`` is the
seeded, resumable order in which structures are drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ase import Atoms

from .data import AtomsBatch, read_frames

BUILTIN_DATASETS = ("emt", "builtin:emt")
EMT_METALS = ("Cu", "Pt", "Au", "Ni", "Ag")
EMT_ADSORBATES = ("O", "C", "H", "N")
_SITES = {"111": ("fcc", "hcp", "ontop"), "100": ("hollow", "bridge", "ontop")}
DEFAULT_EMT_SIZE = 64


# Distance from the adatom to its nearest surface atom (angstrom): around EMT's minimum.
_BOND_RANGE = {"H": (2.15, 2.5), "C": (1.9, 2.25), "N": (1.9, 2.3), "O": (2.0, 2.35)}


def _set_bond_length(slab: Atoms, bond: float) -> None:
    """Move the last atom (the adatom) along z so its nearest top-layer atom is ``bond`` away."""
    top = np.flatnonzero(slab.get_tags() == 1)
    vectors = slab.get_distances(len(slab) - 1, top, mic=True, vector=True)
    lateral = float(np.min(np.linalg.norm(vectors[:, :2], axis=1)))
    height = np.sqrt(max(bond**2 - lateral**2, 0.8**2))
    slab.positions[-1, 2] = slab.positions[top, 2].max() + height


def emt_dataset(n_structures: int = DEFAULT_EMT_SIZE, seed: int = 0) -> list[Atoms]:
    """``n_structures`` labelled slabs: a 2x2 fcc(111) or fcc(100) slab of Cu, Pt, Au, Ni or Ag with
    3 or 4 layers (bottom 1 or 2 layers fixed with ``FixAtoms``) and one O, C, H or N adatom on a
    random site, rattled; 13 or 17 atoms, pbc (True, True, False). Energies and forces (forces of
    all atoms, fixed ones included) come from ASE's EMT calculator and are attached through a
    ``SinglePointCalculator``, so they survive ``ase.io.write`` (extxyz, db). Same seed, same set."""
    from ase.build import add_adsorbate, fcc100, fcc111
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    if n_structures < 1:
        raise ValueError(f"n_structures must be >= 1, got {n_structures}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_structures):
        metal = str(rng.choice(EMT_METALS))
        facet = str(rng.choice(tuple(_SITES)))
        layers = int(rng.choice((3, 4)))
        build = fcc111 if facet == "111" else fcc100
        slab = build(metal, size=(2, 2, layers), vacuum=6.0)
        adsorbate = str(rng.choice(EMT_ADSORBATES))
        site = str(rng.choice(_SITES[facet]))
        add_adsorbate(slab, adsorbate, height=1.5, position=site)
        _set_bond_length(slab, float(rng.uniform(*_BOND_RANGE[adsorbate])))
        slab.center(vacuum=6.0, axis=2)
        slab.pbc = (True, True, False)
        slab.info.pop("adsorbate_info", None)  # ASE bookkeeping that file writers cannot store
        tags = slab.get_tags()  # layer index from the top (1), adsorbate 0
        slab.set_constraint(FixAtoms(mask=tags > layers - (1 if layers == 3 else 2)))
        slab.rattle(stdev=float(rng.uniform(0.02, 0.08)), seed=int(rng.integers(2**31)))
        slab.calc = EMT()
        energy = slab.get_potential_energy()
        forces = slab.get_forces(apply_constraint=False)
        slab.calc = SinglePointCalculator(slab, energy=energy, forces=forces)
        out.append(slab)
    return out


def load_structures(source: str) -> list[Atoms]:
    """Labelled structures from ``source``: ``"emt"`` / ``"builtin:emt"`` (``emt_dataset()``, seed 0)
    or the path of any ASE-readable file (all frames). FileNotFoundError / ValueError when the file
    is missing or unreadable; labels are checked by ``TrainingSet.from_atoms``."""
    if source in BUILTIN_DATASETS:
        return emt_dataset()
    return read_frames(source, "data file", " (or use --data emt for the built-in EMT set)")


def fixed_mask(atoms: Atoms) -> np.ndarray:
    """(n,) bool: atoms held fixed by an ASE ``FixAtoms`` constraint."""
    from ase.constraints import FixAtoms

    mask = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            mask[constraint.get_indices()] = True
    return mask


def _labels(atoms: Atoms, k: int, source: str) -> tuple[float, np.ndarray]:
    results = getattr(atoms.calc, "results", None) or {}
    missing = [name for name in ("energy", "forces") if results.get(name) is None]
    if missing:
        raise ValueError(
            f"structure {k} of {source} has no {' and no '.join(missing)}: training needs an energy "
            "and forces on every structure (e.g. extxyz with energy=... in the comment line and a "
            "forces column, or an ASE db written from atoms with a calculator)"
        )
    energy = float(np.asarray(results["energy"]).reshape(-1)[0])
    forces = np.asarray(results["forces"], dtype=np.float64)
    if forces.shape != (len(atoms), 3):
        raise ValueError(
            f"structure {k} of {source}: forces have shape {forces.shape}, expected ({len(atoms)}, 3)"
        )
    if not np.isfinite(energy) or not np.isfinite(forces).all():
        raise ValueError(f"structure {k} of {source} has a non-finite energy or force")
    return energy, forces


@dataclass
class LabeledBatch:
    """A batch with its targets: ``data`` (AtomsBatch of b structures, n atoms), ``energy`` (b,),
    ``forces`` (n, 3) (physical units, float64 on the batch device), ``free`` (n,) bool (atoms not
    fixed, the ones whose forces enter the loss)."""

    data: AtomsBatch
    energy: torch.Tensor
    forces: torch.Tensor
    free: torch.Tensor


class TrainingSet:
    """Labelled structures as tensors. Per structure k: positions (n_k, 3), cell (3, 3), pbc (3,),
    atomic numbers (n_k,), energy, forces (n_k, 3) (float64) and ``fixed`` (n_k,) bool."""

    def __init__(self, atoms_list: Sequence[Atoms], source: str = "data") -> None:
        if len(atoms_list) == 0:
            raise ValueError(f"{source} holds no structures")
        self.source = source
        self.pos, self.cell, self.pbc, self.numbers = [], [], [], []
        self.forces, self.fixed, energies = [], [], []
        for k, atoms in enumerate(atoms_list):
            if not isinstance(atoms, Atoms):
                raise ValueError(
                    f"structure {k} of {source} is a {type(atoms).__name__}, not Atoms"
                )
            energy, forces = _labels(atoms, k, source)
            energies.append(energy)
            self.forces.append(torch.as_tensor(forces))
            self.pos.append(torch.as_tensor(atoms.get_positions(), dtype=torch.float64))
            self.cell.append(torch.as_tensor(np.asarray(atoms.get_cell()[:]), dtype=torch.float64))
            self.pbc.append(torch.as_tensor(np.asarray(atoms.get_pbc(), dtype=bool)))
            self.numbers.append(torch.as_tensor(atoms.get_atomic_numbers(), dtype=torch.long))
            self.fixed.append(torch.as_tensor(fixed_mask(atoms)))
        self.energy = torch.tensor(energies, dtype=torch.float64)
        self.natoms = torch.tensor([len(p) for p in self.pos], dtype=torch.long)
        self.num_free = torch.tensor([int((~f).sum()) for f in self.fixed], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.pos)

    def batch(
        self,
        indices: Sequence[int],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> LabeledBatch:
        """The structures ``indices`` (in that order) as one ``LabeledBatch`` on ``device``;
        positions and cells in ``dtype``."""
        idx = [int(i) for i in indices]
        if not idx:
            raise ValueError("a batch needs at least one structure")
        natoms = self.natoms[idx]
        data = AtomsBatch(
            pos=torch.cat([self.pos[i] for i in idx]).to(dtype),
            cell=torch.stack([self.cell[i] for i in idx]).to(dtype),
            atomic_numbers=torch.cat([self.numbers[i] for i in idx]),
            natoms=natoms,
            batch=torch.repeat_interleave(torch.arange(len(idx)), natoms),
            pbc=torch.stack([self.pbc[i] for i in idx]),
        )
        return LabeledBatch(
            data=data.to(device) if device is not None else data,
            energy=self.energy[idx].to(device),
            forces=torch.cat([self.forces[i] for i in idx]).to(device),
            free=~torch.cat([self.fixed[i] for i in idx]).to(device),
        )


def fit_normalizers(dataset: TrainingSet) -> dict[str, dict[str, float]]:
    """fairchem's target normalizers fitted on ``dataset``: energy mean and rmsd = standard deviation
    of the energies (``torch.std``, unbiased), forces mean 0 and rmsd = standard deviation of all
    force components (every atom, fixed ones included). A standard deviation that is zero or
    undefined (one structure) becomes 1. Values are rounded to float32, the precision of fairchem's
    Normalizer buffers and of the checkpoint, so a resumed run uses exactly the same ones."""

    def _f32(value: float) -> float:
        return float(torch.tensor(value, dtype=torch.float32))

    def _std(values: torch.Tensor) -> float:
        std = float(values.std()) if values.numel() > 1 else 0.0
        return _f32(std) if np.isfinite(std) and std > 0 else 1.0

    forces = torch.cat([f.reshape(-1) for f in dataset.forces])
    return {
        "energy": {"mean": _f32(float(dataset.energy.mean())), "rmsd": _std(dataset.energy)},
        "forces": {"mean": 0.0, "rmsd": _std(forces)},
    }


class SampleOrder:
    """The order in which structures are drawn: a permutation of the n structures per epoch from a
    ``torch.Generator`` seeded with ``seed``; each global batch takes the next ``size`` indices of
    the current permutation, and the remainder of an epoch shorter than a batch is skipped (drop
    last), so no batch repeats a structure. ``state_dict`` / ``load_state_dict`` resume it exactly."""

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError("the training set is empty")
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.perm = torch.randperm(n, generator=self.generator)
        self.pos = 0

    def next_batch(self, size: int) -> list[int]:
        """The next ``size`` structure indices (a new epoch's permutation when this one runs out)."""
        if not 1 <= size <= self.n:
            raise ValueError(f"batch size {size} must be between 1 and the {self.n} structures")
        if self.pos + size > self.n:
            self.epoch += 1
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        out = self.perm[self.pos : self.pos + size].tolist()
        self.pos += size
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "epoch": self.epoch,
            "perm": self.perm.clone(),
            "pos": self.pos,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n"]) != self.n:
            raise ValueError(
                f"the checkpoint's data order is for {int(state['n'])} structures, the data has "
                f"{self.n}: resume with the same --data"
            )
        self.epoch = int(state["epoch"])
        self.perm = torch.as_tensor(state["perm"]).clone()
        self.pos = int(state["pos"])
        self.generator.set_state(state["generator"])


def rank_share(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous share of a global batch (its len must divide by world_size)."""
    if len(indices) % world_size:
        raise ValueError(
            f"batch size {len(indices)} is not divisible by the world size {world_size}"
        )
    per_rank = len(indices) // world_size
    return list(indices[rank * per_rank : (rank + 1) * per_rank])
