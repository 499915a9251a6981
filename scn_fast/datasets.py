"""Training data: the built-in EMT set, opening any supported dataset, normalizers, batches, data
order.

``emt_dataset`` makes small fcc slabs with an adsorbate, the bottom layer(s) fixed, labelled with
ASE's EMT calculator. ``open_dataset(source)`` opens the built-in set or a file / folder in any
supported format as a lazy ``StructureDataset`` (scn_fast/readers.py, scn_fast/oc20_lmdb.py);
``TrainingSet`` draws labelled batches from it, reading only the structures a batch needs;
``fit_normalizers`` fits fairchem's target normalizers; ``SampleOrder`` is the seeded, resumable
order in which structures are drawn (fixed-size batches, or packs up to an atom budget).

Formats (by path): ``*.lmdb`` file or a folder of them: OC20 S2EF LMDB; ``*.aselmdb`` file or a
folder of them: ASE-LMDB (``ase-db-backends``); ``*.db`` / ``*.json``: ASE database; ``*.traj``: ASE
trajectory; anything else ASE reads (extxyz, ...): read whole at open.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ase import Atoms

from .data import AtomsBatch, read_frames, relative_positions
from .oc20_lmdb import OC20LmdbDataset, write_oc20_lmdb
from .readers import (
    AseDbDataset,
    AtomsListDataset,
    ConcatDataset,
    Sample,
    StructureDataset,
    Subset,
    TrajectoryDataset,
    fixed_mask,
    list_files,
)

__all__ = [
    "BUILTIN_DATASETS",
    "LabeledBatch",
    "Sample",
    "SampleOrder",
    "StructureDataset",
    "TrainingSet",
    "emt_dataset",
    "fit_normalizers",
    "fixed_mask",
    "open_dataset",
    "rank_share",
]

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
    is missing or unreadable; labels are checked by ``TrainingSet``."""
    if source in BUILTIN_DATASETS:
        return emt_dataset()
    return read_frames(source, "data file", _HINT)


_HINT = " (or use --data emt for the built-in EMT set)"


def open_dataset(source: str, what: str = "data file") -> StructureDataset:
    """The structures of ``source`` as a lazy ``StructureDataset``: ``emt`` / ``builtin:emt``, or a
    path whose format is told by its name (module docstring). FileNotFoundError when it does not
    exist, ValueError when it cannot be read, ImportError naming the ``scn_fast[lmdb]`` extra when
    an LMDB format's package is missing."""
    if source in BUILTIN_DATASETS:
        return AtomsListDataset(emt_dataset(), source=source)
    if not os.path.exists(source):
        raise FileNotFoundError(f"no such {what}: {source}{_HINT}")
    if os.path.isdir(source):
        if list_files(source, ".lmdb"):
            return OC20LmdbDataset(source)
        files = list_files(source, ".aselmdb")
        if not files:
            raise ValueError(f"the folder {source} holds no *.lmdb or *.aselmdb files")
        parts = [AseDbDataset(f) for f in files]
        return parts[0] if len(parts) == 1 else ConcatDataset(parts, source=source)
    name = source.lower()
    if name.endswith(".lmdb"):
        return OC20LmdbDataset(source)
    if name.endswith((".aselmdb", ".db", ".json")):
        return AseDbDataset(source)
    if name.endswith(".traj"):
        return TrajectoryDataset(source)
    return AtomsListDataset(read_frames(source, what, _HINT), source=source)


def write_dataset(path: str, structures: Sequence[Atoms], lmdb_layout: str = "pyg") -> None:
    """Write labelled ``structures`` to ``path`` in the format its name tells: ``*.lmdb`` an OC20
    S2EF LMDB (records in ``lmdb_layout``, see ``scn_fast.oc20_lmdb.encode_record``), ``*.aselmdb``
    / ``*.db`` / ``*.json`` an ASE database, anything else through ``ase.io.write`` (extxyz, traj,
    ...). Databases are refused when the file exists (ASE would append to it)."""
    import ase.io

    name = path.lower()
    if name.endswith(".lmdb"):
        write_oc20_lmdb(path, structures, layout=lmdb_layout)
        return
    if name.endswith((".aselmdb", ".db", ".json")):
        import ase.db

        if os.path.exists(path):
            raise FileExistsError(
                f"{path} exists; remove it first (a database would be appended to)"
            )
        if name.endswith(".aselmdb"):
            from .readers import _require_aselmdb

            _require_aselmdb()
        with ase.db.connect(path) as db:
            for atoms in structures:
                db.write(atoms)
        return
    ase.io.write(path, list(structures))


def split_dataset(
    dataset: StructureDataset, fraction: float, seed: int
) -> tuple[StructureDataset, StructureDataset]:
    """(train, validation): a seeded random ``fraction`` of the structures held out for validation
    (at least one; the rest, at least one, for training)."""
    n = len(dataset)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {fraction}")
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise ValueError(f"--val-fraction {fraction} of {n} structure(s) leaves none for training")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val, train = sorted(perm[:n_val]), sorted(perm[n_val:])
    return (
        Subset(dataset, train, source=f"{dataset.source} (training part)"),
        Subset(dataset, val, source=f"{dataset.source} (validation part)"),
    )


@dataclass
class LabeledBatch:
    """A batch with its targets: ``data`` (AtomsBatch of b structures, n atoms), ``energy`` (b,),
    ``forces`` (n, 3) (physical units, float64 on the batch device), ``free`` (n,) bool (atoms not
    fixed, the ones whose forces enter the loss)."""

    data: AtomsBatch
    energy: torch.Tensor
    forces: torch.Tensor
    free: torch.Tensor


def samples_to_batch(
    samples: Sequence[Sample],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> AtomsBatch:
    """The structures of ``samples`` as one ``AtomsBatch`` (positions and cells in ``dtype``).
    As in ``AtomsBatch.from_ase``, positions are taken relative to each structure's mean position
    in float64 before the cast (``origin``), so coordinates far from zero keep their precision."""
    if not samples:
        raise ValueError("a batch needs at least one structure")
    natoms = torch.tensor([len(s) for s in samples], dtype=torch.long)
    pos, origin = relative_positions(
        torch.cat([torch.as_tensor(s.positions, dtype=torch.float64) for s in samples]), natoms
    )
    cell = torch.stack([torch.as_tensor(s.cell, dtype=torch.float64) for s in samples])
    data = AtomsBatch(
        pos=pos.to(dtype),
        cell=cell.to(dtype),
        atomic_numbers=torch.cat([torch.as_tensor(s.numbers, dtype=torch.long) for s in samples]),
        natoms=natoms,
        batch=torch.repeat_interleave(torch.arange(len(samples)), natoms),
        pbc=torch.stack([torch.as_tensor(s.pbc, dtype=torch.bool) for s in samples]),
        origin=origin,
    )
    return data.to(device) if device is not None else data


def labeled_batch(
    samples: Sequence[Sample],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> LabeledBatch:
    """``samples`` (labelled: see ``Sample.check_labels``) as a ``LabeledBatch``."""
    forces = torch.cat([torch.as_tensor(s.forces, dtype=torch.float64) for s in samples])
    fixed = torch.cat([torch.as_tensor(s.fixed, dtype=torch.bool) for s in samples])
    return LabeledBatch(
        data=samples_to_batch(samples, dtype, device),
        energy=torch.tensor([s.energy for s in samples], dtype=torch.float64).to(device),
        forces=forces.to(device),
        free=(~fixed).to(device),
    )


class TrainingSet:
    """Labelled structures, read when a batch needs them. ``structures``: a ``StructureDataset``
    (see ``open_dataset``) or a list of ``ase.Atoms``. The first structure's labels are checked at
    once (a file without labels fails before training starts), every other one when it is read
    (ValueError naming the structure, the file and the missing labels)."""

    def __init__(
        self, structures: StructureDataset | Sequence[Atoms], source: str | None = None
    ) -> None:
        if isinstance(structures, StructureDataset):
            self.dataset = structures
        else:
            self.dataset = AtomsListDataset(structures, source=source or "data")
        self.source = source or self.dataset.source
        if len(self.dataset) == 0:
            raise ValueError(f"{self.source} holds no structures")
        self.sample(0)

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int) -> Sample:
        """Structure ``index`` with its labels checked."""
        sample = self.dataset[index]
        sample.check_labels(int(index), self.source)
        return sample

    def natoms(self, index: int) -> int:
        """Atom count of structure ``index``."""
        return self.dataset.natoms(index)

    @property
    def num_free(self) -> torch.Tensor:
        """(n_structures,) int64 free-atom counts (reads every structure)."""
        return torch.tensor([int((~self.dataset[i].fixed).sum()) for i in range(len(self))])

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
        return labeled_batch([self.sample(i) for i in idx], dtype, device)


# Normalizers are fitted on at most this many structures (a seeded random subset beyond it).
NORMALIZER_SAMPLES = 10_000


def fit_normalizers(
    dataset: TrainingSet, max_structures: int = NORMALIZER_SAMPLES, seed: int = 0
) -> dict[str, dict[str, float]]:
    """fairchem's target normalizers fitted on ``dataset``: energy mean and rmsd = standard deviation
    of the energies (``torch.std``, unbiased), forces mean 0 and rmsd = standard deviation of all
    force components (every atom, fixed ones included). A standard deviation that is zero or
    undefined (one structure) becomes 1. Values are rounded to float32, the precision of fairchem's
    Normalizer buffers and of the checkpoint, so a resumed run uses exactly the same ones. Sets
    larger than ``max_structures`` are fitted on a random subset of that size (seeded), so a large
    LMDB is not read whole."""
    n = len(dataset)
    if n <= max_structures:
        indices = list(range(n))
    else:
        gen = torch.Generator().manual_seed(seed)
        indices = sorted(torch.randperm(n, generator=gen)[:max_structures].tolist())
    samples = [dataset.sample(i) for i in indices]
    energies = torch.tensor([s.energy for s in samples], dtype=torch.float64)

    def _f32(value: float) -> float:
        return float(torch.tensor(value, dtype=torch.float32))

    def _std(values: torch.Tensor) -> float:
        std = float(values.std()) if values.numel() > 1 else 0.0
        return _f32(std) if np.isfinite(std) and std > 0 else 1.0

    forces = torch.cat(
        [torch.as_tensor(s.forces, dtype=torch.float64).reshape(-1) for s in samples]
    )
    return {
        "energy": {"mean": _f32(float(energies.mean())), "rmsd": _std(energies)},
        "forces": {"mean": 0.0, "rmsd": _std(forces)},
    }


class SampleOrder:
    """The order in which structures are drawn: a permutation of the n structures per epoch from a
    ``torch.Generator`` seeded with ``seed``; each global batch takes the next ``size`` indices of
    the current permutation, and the remainder of an epoch shorter than a batch is skipped (drop
    last), so no batch repeats a structure. ``next_packs`` instead fills batches up to an atom
    budget. ``state_dict`` / ``load_state_dict`` resume it exactly."""

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
            self._new_epoch()
        out = self.perm[self.pos : self.pos + size].tolist()
        self.pos += size
        return out

    def _new_epoch(self) -> None:
        self.epoch += 1
        self.perm = torch.randperm(self.n, generator=self.generator)
        self.pos = 0

    def next_packs(
        self,
        natoms: Callable[[int], int],
        max_atoms: int,
        num_packs: int = 1,
        max_structures: int | None = None,
    ) -> list[list[int]]:
        """The next ``num_packs`` packs (one per rank) of consecutive structures of the order: each
        takes structures while its atom count stays <= ``max_atoms`` (and it holds at most
        ``max_structures``), as fairchem's atom-budget samplers do. ``natoms(i)`` is structure i's
        atom count. Packs never cross an epoch: when the epoch's remainder cannot fill the packs
        the last pack is shorter, or, if some pack would be empty, the remainder is skipped and a
        new epoch starts. ValueError when a structure alone exceeds the budget."""
        if max_atoms < 1 or num_packs < 1:
            raise ValueError("max_atoms and num_packs must be >= 1")
        for attempt in range(2):
            packs: list[list[int]] = []
            pos = self.pos
            while len(packs) < num_packs and pos < self.n:
                pack: list[int] = []
                atoms = 0
                while pos < self.n and (max_structures is None or len(pack) < max_structures):
                    i = int(self.perm[pos])
                    size = int(natoms(i))
                    if size > max_atoms:
                        raise ValueError(
                            f"structure {i} has {size} atoms, more than --max-atoms-per-batch "
                            f"{max_atoms}"
                        )
                    if atoms + size > max_atoms:
                        break
                    pack.append(i)
                    atoms += size
                    pos += 1
                packs.append(pack)
            if len(packs) == num_packs:
                self.pos = pos
                return packs
            if attempt == 0:
                self._new_epoch()
        raise ValueError(
            f"{self.n} structures cannot fill {num_packs} batches (one per process): use fewer "
            "processes or more data"
        )

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
