"""Batches for evaluation and prediction: consecutive structures, up to a structure count and / or
an atom budget (``--batch-size``, ``--max-atoms-per-batch``), so that mixed-size datasets neither
waste memory nor run out of it. Training draws its batches through ``SampleOrder``
(scn_fast/datasets.py), which packs the same way."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence


def iter_batches(
    indices: Sequence[int],
    natoms: Callable[[int], int],
    batch_size: int | None = None,
    max_atoms: int | None = None,
) -> Iterator[list[int]]:
    """Split ``indices`` (in order) into consecutive batches of at most ``batch_size`` structures
    and at most ``max_atoms`` atoms (``natoms(i)``: the atom count of structure i; None: no limit).
    Every index lands in exactly one batch; a structure larger than ``max_atoms`` is a ValueError."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if max_atoms is not None and max_atoms < 1:
        raise ValueError(f"--max-atoms-per-batch must be >= 1, got {max_atoms}")
    batch: list[int] = []
    atoms = 0
    for index in indices:
        size = int(natoms(index)) if max_atoms is not None else 0
        if max_atoms is not None and size > max_atoms:
            raise ValueError(
                f"structure {index} has {size} atoms, more than --max-atoms-per-batch {max_atoms}"
            )
        full = batch_size is not None and len(batch) >= batch_size
        if batch and (full or (max_atoms is not None and atoms + size > max_atoms)):
            yield batch
            batch, atoms = [], 0
        batch.append(int(index))
        atoms += size
    if batch:
        yield batch
