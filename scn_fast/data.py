"""Batches of atomic structures: ``AtomsBatch`` and the checks every model input goes through.

The model accepts any object with ``pos`` (N, 3), ``cell`` (B, 3, 3), ``atomic_numbers`` (N,),
``natoms`` (B,), ``batch`` (N,) and ``pbc`` (B, 3) (a torch_geometric Batch, a SimpleNamespace, or
``AtomsBatch``); ``Structure`` is the validated view of such an object that the model works on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch


@dataclass
class _StructureTensors:
    """The six tensors of B structures with N atoms in all (the fields ``AtomsBatch`` and
    ``Structure`` share): pos (N, 3), cell (B, 3, 3), atomic_numbers (N,), natoms (B,), batch (N,),
    pbc (B, 3)."""

    pos: torch.Tensor
    cell: torch.Tensor
    atomic_numbers: torch.Tensor
    natoms: torch.Tensor
    batch: torch.Tensor
    pbc: torch.Tensor


@dataclass
class AtomsBatch(_StructureTensors):
    """A batch of B structures with N atoms in all, atoms of each structure contiguous.

    pos (N, 3) float, cell (B, 3, 3) float (rows are lattice vectors), atomic_numbers (N,) int64,
    natoms (B,) int64, batch (N,) int64 structure index per atom, pbc (B, 3) bool. Optional
    precomputed graph: edge_index (2, E) [source; target], cell_offsets (E, 3), neighbors (B,).
    ``origin`` (B, 3) float64, set by ``from_ase``: the per-structure point subtracted from the
    positions (absolute position of atom n = pos[n] + origin[batch[n]]); None when pos is absolute.
    """

    edge_index: torch.Tensor | None = None
    cell_offsets: torch.Tensor | None = None
    neighbors: torch.Tensor | None = None
    origin: torch.Tensor | None = None

    @classmethod
    def from_ase(
        cls,
        atoms_list: Sequence[Any],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> AtomsBatch:
        """Batch a sequence of ``ase.Atoms`` (a single Atoms is accepted too).

        Positions are stored relative to a per-structure origin (``origin``, the structure's mean
        position), subtracted in float64 before the cast to ``dtype``: the model is
        translation-invariant, and float32 coordinates far from zero would lose precision (at
        1e6 Angstrom a float32 position is only good to 0.03 Angstrom).
        """
        from ase import Atoms

        if isinstance(atoms_list, Atoms):
            atoms_list = [atoms_list]
        if len(atoms_list) == 0:
            raise ValueError("AtomsBatch.from_ase needs at least one structure")
        for k, atoms in enumerate(atoms_list):
            if not isinstance(atoms, Atoms):
                raise ValueError(f"structure {k} is a {type(atoms).__name__}, not ase.Atoms")
        natoms = torch.tensor([len(a) for a in atoms_list], dtype=torch.long)
        pos = np.concatenate([a.get_positions() for a in atoms_list], axis=0).reshape(-1, 3)
        pos, origin = relative_positions(torch.as_tensor(pos, dtype=torch.float64), natoms)
        numbers = np.concatenate([a.get_atomic_numbers() for a in atoms_list], axis=0)
        cell = np.stack([np.asarray(a.get_cell()[:], dtype=np.float64) for a in atoms_list])
        pbc = np.stack([np.asarray(a.get_pbc(), dtype=bool) for a in atoms_list])
        out = cls(
            pos=torch.as_tensor(pos, dtype=dtype),
            cell=torch.as_tensor(cell, dtype=dtype),
            atomic_numbers=torch.as_tensor(numbers, dtype=torch.long),
            natoms=natoms,
            batch=torch.repeat_interleave(torch.arange(len(natoms)), natoms),
            pbc=torch.as_tensor(pbc),
            origin=origin,
        )
        return out.to(device) if device is not None else out

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> AtomsBatch:
        """A copy on ``device``; ``dtype`` converts the float fields (pos, cell)."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                if dtype is not None and f.name in ("pos", "cell"):
                    v = v.to(dtype=dtype)
                v = v.to(device) if device is not None else v
            kw[f.name] = v
        return AtomsBatch(**kw)

    def __len__(self) -> int:
        return len(self.natoms)


def relative_positions(
    pos: torch.Tensor, natoms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions relative to each structure's mean position, computed in ``pos``'s dtype.

    Cast float64 positions to float32 only after this: the difference keeps the precision that
    absolute coordinates far from zero would lose.

    Args:
        pos: (N, 3) positions (float64 for the precision to help), structures contiguous.
        natoms: (B,) int atoms per structure.

    Returns:
        (pos - origin[batch], origin): (N, 3) and (B, 3) in ``pos``'s dtype; a structure with no
        atoms gets origin 0.
    """
    natoms = torch.as_tensor(natoms, device=pos.device).long()
    batch = torch.repeat_interleave(torch.arange(len(natoms), device=pos.device), natoms)
    total = pos.new_zeros(len(natoms), 3).index_add_(0, batch, pos)
    origin = total / natoms.clamp_min(1).to(pos.dtype)[:, None]
    return pos - origin[batch], origin


@dataclass
class Structure(_StructureTensors):
    """Validated model input. pos (N, 3), cell (B, 3, 3) in the model's dtype; atomic_numbers,
    natoms, batch int64; pbc (B, 3) bool."""


def _field(data: Any, name: str) -> Any:
    value = getattr(data, name, None)
    if value is None and isinstance(data, dict):
        value = data.get(name)
    return value


def read_structure(
    data: Any, *, use_pbc: bool, max_num_elements: int, dtype: torch.dtype
) -> Structure:
    """Check ``data`` and return its fields as a ``Structure`` (ValueError naming any problem).

    Checks: required fields present; shapes agree (pos (N,3), natoms summing to N, batch equal to
    the structure index implied by natoms, cell (B,3,3), pbc (B,3) or (3,)); atomic numbers are
    integers in [0, max_num_elements). Geometric checks (finite values, coincident atoms, singular
    periodic cells) are done by ``graph.validate_structure``.
    """
    missing = [n for n in ("pos", "atomic_numbers", "natoms") if _field(data, n) is None]
    if missing:
        raise ValueError(f"input is missing required field(s) {missing}")
    pos = torch.as_tensor(_field(data, "pos"))
    if pos.dim() != 2 or pos.shape[1] != 3:
        raise ValueError(f"pos must have shape (N, 3), got {tuple(pos.shape)}")
    if not pos.is_floating_point():
        raise ValueError(f"pos must be a floating-point tensor, got {pos.dtype}")
    device = pos.device
    n = pos.shape[0]
    natoms = torch.as_tensor(_field(data, "natoms"), device=device).reshape(-1).long()
    b = natoms.numel()
    if b == 0:
        raise ValueError("natoms is empty: the batch holds no structure")
    if bool((natoms < 0).any()):
        raise ValueError(f"natoms has negative entries: {natoms.tolist()}")
    if int(natoms.sum()) != n:
        raise ValueError(f"natoms sums to {int(natoms.sum())} but pos has {n} atoms")

    z = torch.as_tensor(_field(data, "atomic_numbers"), device=device).reshape(-1)
    if z.numel() != n:
        raise ValueError(f"atomic_numbers has {z.numel()} entries but pos has {n} atoms")
    if z.is_floating_point() and bool((z != z.round()).any()):
        raise ValueError("atomic_numbers must be whole numbers")
    z = z.long()
    bad = ((z < 0) | (z >= max_num_elements)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"atomic number {int(z[i])} of atom {i} is outside [0, max_num_elements={max_num_elements})"
        )

    expected_batch = torch.repeat_interleave(torch.arange(b, device=device), natoms)
    batch = _field(data, "batch")
    if batch is None:
        batch = expected_batch
    else:
        batch = torch.as_tensor(batch, device=device).reshape(-1).long()
        if batch.numel() != n or not torch.equal(batch, expected_batch):
            raise ValueError(
                "batch disagrees with natoms: atoms of structure k must be contiguous and "
                f"batch must equal repeat_interleave(arange(B), natoms) (B={b}, N={n})"
            )

    cell = _field(data, "cell")
    if cell is None:
        if use_pbc:
            raise ValueError("input has no cell, which use_pbc=True needs")
        cell = torch.zeros(b, 3, 3, device=device)
    cell = torch.as_tensor(cell, device=device)
    if cell.dim() == 2 and b == 1:
        cell = cell.unsqueeze(0)
    if tuple(cell.shape) != (b, 3, 3):
        raise ValueError(f"cell must have shape (B, 3, 3) = ({b}, 3, 3), got {tuple(cell.shape)}")

    pbc = _field(data, "pbc") if use_pbc else None
    if pbc is None:
        pbc = torch.full((b, 3), bool(use_pbc), device=device)
    pbc = torch.as_tensor(pbc, device=device).bool()
    if pbc.shape != (3,) and (pbc.dim() != 2 or pbc.shape[1] != 3):
        raise ValueError(f"pbc must have shape (B, 3) or (3,), got {tuple(pbc.shape)}")
    if pbc.dim() == 1:
        pbc = pbc.view(1, -1).expand(b, -1)
    if tuple(pbc.shape) != (b, 3):
        raise ValueError(f"pbc must have shape (B, 3) or (3,), got {tuple(pbc.shape)}")

    return Structure(
        pos=pos.to(dtype),
        cell=cell.to(dtype),
        atomic_numbers=z,
        natoms=natoms,
        batch=batch,
        pbc=pbc.contiguous(),
    )


def read_frames(path: str, what: str = "file", missing_hint: str = "") -> list[Any]:
    """Every frame of the ASE-readable file at ``path`` as ``ase.Atoms``. FileNotFoundError
    ("no such {what}: {path}{missing_hint}") when it does not exist; ValueError when ASE cannot read it or it
    holds no structures."""
    import os

    import ase.io

    if not os.path.exists(path):
        raise FileNotFoundError(f"no such {what}: {path}{missing_hint}")
    try:
        frames = ase.io.read(path, index=":")
    except Exception as exc:  # ASE raises many types for unreadable files
        raise ValueError(f"cannot read {path} with ASE: {exc}") from exc
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise ValueError(f"{path} holds no structures")
    return frames
