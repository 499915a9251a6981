"""One interface over the structure files training and evaluation read: ``Sample`` and
``StructureDataset``, with readers for ASE files (extxyz, ``.traj``, anything ``ase.io`` reads) and
ASE databases (``.db``, ``.json``, ``.aselmdb``). OC20 S2EF LMDBs live in ``scn_fast/oc20_lmdb.py``;
``scn_fast.datasets.open_dataset`` picks the reader from the path.

Every reader is lazy where its format allows: ``len()`` is known at open, and a structure is
decoded only when ``dataset[i]`` asks for it (ASE databases and trajectories read one row / frame;
text formats such as extxyz have no index, so ASE parses the whole file at open).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms


@dataclass
class Sample:
    """One structure with its labels. numbers (n,) int64, positions (n, 3) float64 (Å), cell (3, 3)
    float64 (rows are lattice vectors), pbc (3,) bool, energy (eV) or None, forces (n, 3) float64
    (eV/Å) or None, fixed (n,) bool (atoms held fixed: ``FixAtoms`` or OC20's ``fixed``), tags (n,)
    int64 or None (OC20: 0 subsurface, 1 surface, 2 adsorbate), sid / fid: identifiers or None."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: float | None = None
    forces: np.ndarray | None = None
    fixed: np.ndarray | None = None
    tags: np.ndarray | None = None
    sid: Any = None
    fid: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.numbers)
        if self.fixed is None:
            self.fixed = np.zeros(n, dtype=bool)

    def __len__(self) -> int:
        return len(self.numbers)

    def missing_labels(self) -> list[str]:
        """Names of the labels training and evaluation need that this sample lacks."""
        return [name for name in ("energy", "forces") if getattr(self, name) is None]

    def check_labels(self, index: int, source: str) -> None:
        """ValueError naming the missing labels, the structure and the file; also checks shapes and
        finiteness."""
        missing = self.missing_labels()
        if missing:
            raise ValueError(
                f"structure {index} of {source} has no {' and no '.join(missing)}: training and "
                "evaluation need an energy and forces on every structure (e.g. extxyz with "
                "energy=... in the comment line and a forces column, an ASE db written from atoms "
                "with a calculator, or an OC20 LMDB with y and force)"
            )
        n = len(self)
        if self.forces.shape != (n, 3):
            raise ValueError(
                f"structure {index} of {source}: forces have shape {self.forces.shape}, "
                f"expected ({n}, 3)"
            )
        if not np.isfinite(self.energy) or not np.isfinite(self.forces).all():
            raise ValueError(f"structure {index} of {source} has a non-finite energy or force")

    @classmethod
    def from_atoms(cls, atoms: Atoms) -> Sample:
        """Positions, cell, pbc, numbers, tags and ``FixAtoms`` of ``atoms``; energy and forces from
        its calculator's stored results (``atoms.calc.results``, never a new calculation)."""
        results = getattr(atoms.calc, "results", None) or {}
        energy = results.get("energy")
        forces = results.get("forces")
        tags = atoms.get_tags()
        return cls(
            numbers=np.asarray(atoms.get_atomic_numbers(), dtype=np.int64),
            positions=np.asarray(atoms.get_positions(), dtype=np.float64),
            cell=np.asarray(atoms.get_cell()[:], dtype=np.float64),
            pbc=np.asarray(atoms.get_pbc(), dtype=bool),
            energy=None if energy is None else float(np.asarray(energy).reshape(-1)[0]),
            forces=None if forces is None else np.asarray(forces, dtype=np.float64),
            fixed=fixed_mask(atoms),
            tags=np.asarray(tags, dtype=np.int64),
            sid=atoms.info.get("sid"),
            fid=atoms.info.get("fid"),
        )

    def to_atoms(self) -> Atoms:
        """``ase.Atoms`` with ``FixAtoms`` on the fixed atoms, tags, sid / fid in ``info`` and, when
        labelled, a ``SinglePointCalculator`` holding energy and forces."""
        from ase.calculators.singlepoint import SinglePointCalculator
        from ase.constraints import FixAtoms

        atoms = Atoms(
            numbers=self.numbers,
            positions=self.positions,
            cell=self.cell,
            pbc=self.pbc,
            tags=self.tags,
        )
        if self.fixed is not None and self.fixed.any():
            atoms.set_constraint(FixAtoms(mask=self.fixed))
        for key in ("sid", "fid"):
            value = getattr(self, key)
            if value is not None:
                atoms.info[key] = value
        atoms.info.update(self.info)
        results = {}
        if self.energy is not None:
            results["energy"] = self.energy
        if self.forces is not None:
            results["forces"] = self.forces
        if results:
            atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms


def fixed_mask(atoms: Atoms) -> np.ndarray:
    """(n,) bool: atoms held fixed by an ASE ``FixAtoms`` constraint."""
    from ase.constraints import FixAtoms

    mask = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            mask[constraint.get_indices()] = True
    return mask


class StructureDataset:
    """A read-only, indexable set of ``Sample``. Subclasses implement ``__len__`` and ``_get(i)``;
    ``natoms(i)`` may be cheaper than reading the structure (it is cached per index)."""

    source: str = "data"

    def __len__(self) -> int:
        raise NotImplementedError

    def _get(self, index: int) -> Sample:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        n = len(self)
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"structure {index} out of range for {self.source} ({n} structures)")
        return self._get(i % n)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def natoms(self, index: int) -> int:
        """Atom count of structure ``index`` (cached)."""
        cache = self.__dict__.setdefault("_natoms_cache", {})
        i = int(index)
        if i not in cache:
            cache[i] = self._natoms(i)
        return cache[i]

    def _natoms(self, index: int) -> int:
        return len(self[index])

    def atoms(self, index: int) -> Atoms:
        """Structure ``index`` as ``ase.Atoms`` (``Sample.to_atoms``)."""
        return self[index].to_atoms()


class AtomsListDataset(StructureDataset):
    """Structures already in memory (a list of ``ase.Atoms``)."""

    def __init__(self, atoms_list: Sequence[Atoms], source: str = "data") -> None:
        for k, atoms in enumerate(atoms_list):
            if not isinstance(atoms, Atoms):
                raise ValueError(
                    f"structure {k} of {source} is a {type(atoms).__name__}, not Atoms"
                )
        self.atoms_list = list(atoms_list)
        self.source = source

    def __len__(self) -> int:
        return len(self.atoms_list)

    def _get(self, index: int) -> Sample:
        return Sample.from_atoms(self.atoms_list[index])

    def _natoms(self, index: int) -> int:
        return len(self.atoms_list[index])

    def atoms(self, index: int) -> Atoms:
        return self.atoms_list[int(index)]


class TrajectoryDataset(StructureDataset):
    """An ASE ``.traj`` file, one frame read per access (ase.io.Trajectory indexes its frames)."""

    def __init__(self, path: str) -> None:
        from ase.io.trajectory import Trajectory

        self.source = path
        try:
            self._traj = Trajectory(path)
            self._len = len(self._traj)
        except Exception as exc:
            raise ValueError(f"cannot read {path} as an ASE trajectory: {exc}") from exc
        if self._len == 0:
            raise ValueError(f"{path} holds no structures")

    def __len__(self) -> int:
        return self._len

    def _get(self, index: int) -> Sample:
        return Sample.from_atoms(self._traj[index])


class AseDbDataset(StructureDataset):
    """An ASE database (``.db`` SQLite, ``.json``, ``.aselmdb`` from ``ase-db-backends``): the row ids
    are listed at open, each row is read when asked for (``row.toatoms()``: constraints, energy and
    forces included)."""

    def __init__(self, path: str) -> None:
        self.source = path
        self._db = connect_ase_db(path)
        self._ids = _row_ids(self._db, path)
        if not self._ids:
            raise ValueError(f"{path} holds no structures")

    def __len__(self) -> int:
        return len(self._ids)

    def _row(self, index: int) -> Any:
        return self._db.get(id=self._ids[index])

    def _get(self, index: int) -> Sample:
        row = self._row(index)
        sample = Sample.from_atoms(row.toatoms())
        for key in ("sid", "fid"):
            value = row.get("data", {}).get(key, row.get(key))
            if value is not None:
                setattr(sample, key, value)
        return sample

    def _natoms(self, index: int) -> int:
        return int(self._row(index).natoms)


def connect_ase_db(path: str) -> Any:
    """``ase.db.connect`` for an existing database; ``.aselmdb`` needs the ``ase-db-backends``
    package (ImportError naming the ``scn_fast[lmdb]`` extra when it is missing)."""
    import ase.db

    if path.endswith(".aselmdb"):
        _require_aselmdb()
        from ase_db_backends.aselmdb import LMDBDatabase

        try:
            return LMDBDatabase(path, readonly=True)
        except Exception as exc:
            raise ValueError(f"cannot open {path} as an ASE-LMDB database: {exc}") from exc
    try:
        return ase.db.connect(path)
    except Exception as exc:
        raise ValueError(f"cannot open {path} as an ASE database: {exc}") from exc


def _require_aselmdb() -> None:
    try:
        import ase_db_backends.aselmdb  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "reading or writing .aselmdb files needs the ase-db-backends package: "
            "pip install 'scn_fast[lmdb]'"
        ) from exc


def _row_ids(db: Any, path: str) -> list[int]:
    ids = getattr(db, "ids", None)
    if ids is not None:
        return [int(i) for i in ids]
    try:
        return [int(row.id) for row in db.select(columns=["id"], include_data=False)]
    except TypeError:  # backends without column selection
        return [int(row.id) for row in db.select()]
    except Exception as exc:
        raise ValueError(f"cannot list the rows of {path}: {exc}") from exc


class Subset(StructureDataset):
    """The structures ``indices`` of ``parent``, in that order."""

    def __init__(self, parent: StructureDataset, indices: Sequence[int], source: str) -> None:
        self.parent = parent
        self.indices = [int(i) for i in indices]
        self.source = source

    def __len__(self) -> int:
        return len(self.indices)

    def _get(self, index: int) -> Sample:
        return self.parent[self.indices[index]]

    def _natoms(self, index: int) -> int:
        return self.parent.natoms(self.indices[index])

    def atoms(self, index: int) -> Atoms:
        return self.parent.atoms(self.indices[int(index)])


class ConcatDataset(StructureDataset):
    """Several datasets one after another (e.g. the files of a folder)."""

    def __init__(self, parts: Sequence[StructureDataset], source: str) -> None:
        self.parts = list(parts)
        self.source = source
        self._offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, index: int) -> tuple[StructureDataset, int]:
        part = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self.parts[part], index - int(self._offsets[part])

    def _get(self, index: int) -> Sample:
        part, i = self._locate(index)
        return part[i]

    def _natoms(self, index: int) -> int:
        part, i = self._locate(index)
        return part.natoms(i)


def list_files(folder: str, suffix: str) -> list[str]:
    """The files of ``folder`` ending in ``suffix``, sorted by name."""
    return sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if f.endswith(suffix) and os.path.isfile(os.path.join(folder, f))
    )
