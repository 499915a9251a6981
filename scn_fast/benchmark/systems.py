"""Built-in OC20-like benchmark systems: Cu(111)+CO slabs of several sizes, and batches of them.

A size is given as a string: ``"N"`` is one slab of about N atoms (``"14"`` is exactly the 14-atom
cu111_co(size=(2, 2, 3)), ``"38"`` the 38-atom cu111_co(size=(3, 3, 4)); N from 3 to 13 is a cluster
of exactly N atoms, the 14-atom slab's first N - 2 Cu atoms and its CO, not periodic (every pair is an
edge, N (N - 1) in all: for checks that must be cheap, e.g. Triton's CPU interpreter); other N use
``slab_of_size``, 4 layers grown laterally, so the actual count may differ a little); ``"BxN"`` is a batch of B such slabs
(rattle seeds 0..B-1), e.g. ``"6x38"`` (228 atoms), an OC20-sized training batch. Everything is
deterministic: the same spec always gives the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass

from ase import Atoms

from ..systems import cu111_co, slab_of_size

DEFAULT_SIZES_CPU = ("14", "38")
DEFAULT_SIZES_CUDA = ("14", "38", "6x38", "500", "1000", "2000", "4000")
# ``scn-fast bench --large``: one slab per size, up to what a 24 GB, 2-core CPU or one GPU can take
LARGE_SIZES_CPU = ("38", "200", "500", "1000", "2000")
LARGE_SIZES_CUDA = ("38", "500", "1000", "2000", "4000", "8000")


@dataclass(frozen=True)
class SystemSpec:
    """``count`` slabs of about ``size`` atoms each."""

    count: int
    size: int

    @property
    def label(self) -> str:
        return str(self.size) if self.count == 1 else f"{self.count}x{self.size}"


def parse_size(spec: str | int) -> SystemSpec:
    """``"N"`` or ``"BxN"`` (see module doc) -> SystemSpec; ValueError on anything else."""
    text = str(spec).strip().lower()
    count, _, size = text.rpartition("x")
    try:
        b = int(count) if count else 1
        n = int(size)
    except ValueError:
        raise ValueError(f"bad system size {spec!r}: expected N or BxN (e.g. 38 or 6x38)") from None
    if b < 1 or n < 2:
        raise ValueError(f"bad system size {spec!r}: need B >= 1 and N >= 2")
    return SystemSpec(b, n)


def parse_sizes(text: str) -> list[SystemSpec]:
    """A comma-separated list of sizes, e.g. ``"14,38,6x38,500"``."""
    return [parse_size(s) for s in text.split(",") if s.strip()]


def slab(natoms: int, seed: int = 0) -> Atoms:
    """One Cu(111)+CO slab of about ``natoms`` atoms (exact for 3 to 14 and for 38; below 14, a cluster)."""
    if natoms == 14:
        return cu111_co(size=(2, 2, 3), seed=seed)
    if natoms == 38:
        return cu111_co(size=(3, 3, 4), seed=seed)
    if natoms < 14:
        full = cu111_co(size=(2, 2, 3), seed=seed)
        cluster = full[[*range(max(1, natoms - 2)), len(full) - 2, len(full) - 1]]
        cluster.pbc = False
        return cluster
    return slab_of_size(natoms, seed=seed)


def build_system(spec: SystemSpec) -> list[Atoms]:
    """The structures of ``spec`` (a batch of ``spec.count`` slabs, seeds 0..count-1)."""
    return [slab(spec.size, seed=k) for k in range(spec.count)]
