"""Built-in OC20-like structures made with ASE (no downloads): slabs with adsorbates, bulk cells."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111, molecule


def cu111_co(
    size: tuple[int, int, int] = (3, 3, 4),
    vacuum: float = 10.0,
    rattle: float = 0.02,
    seed: int = 0,
) -> Atoms:
    """A Cu(111) slab of ``size`` (a, b, layers) with CO on an fcc hollow site, pbc (True, True, False)
    along the surface, lightly rattled so no neighbour ranking is an exact tie.

    (3, 3, 4) gives 38 atoms, (2, 2, 3) gives 14.
    """
    slab = fcc111("Cu", size=size, vacuum=vacuum)
    add_adsorbate(slab, molecule("CO"), height=1.9, position="fcc")
    slab.center(vacuum=vacuum, axis=2)
    slab.pbc = (True, True, False)
    slab.info.pop("adsorbate_info", None)  # ASE bookkeeping that file writers cannot store
    if rattle:
        slab.rattle(stdev=rattle, seed=seed)
    return slab


def pt_bulk(repeat: int = 1, rattle: float = 0.02, seed: int = 0) -> Atoms:
    """Periodic fcc Pt: the 4-atom cubic cell repeated ``repeat`` times per axis, rattled."""
    atoms = bulk("Pt", "fcc", a=3.92, cubic=True).repeat((repeat, repeat, repeat))
    if rattle:
        atoms.rattle(stdev=rattle, seed=seed)
    return atoms


def slab_of_size(natoms: int, seed: int = 0) -> Atoms:
    """A Cu(111)+CO slab with about ``natoms`` atoms (4 layers, the lateral size grown to fit)."""
    side = max(2, round(float(np.sqrt(max(natoms - 2, 8) / 4))))
    return cu111_co(size=(side, side, 4), seed=seed)
