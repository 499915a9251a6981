"""S2EF metrics as fairchem reports them, accumulated over batches (and ranks).

For structures i with predicted / reference energies E_i, E*_i (eV), n_i atoms, and free atoms a
(atoms not held fixed; fixed atoms never enter the force metrics, as in fairchem's evaluator) with
forces F_a, F*_a (eV/Å):

- ``energy_mae``          = mean_i |E_i - E*_i|                                    (eV)
- ``energy_per_atom_mae`` = mean_i |E_i - E*_i| / n_i                              (eV/atom)
- ``forces_mae``          = mean over free atoms a and components c of |F_ac - F*_ac| (eV/Å)
- ``forces_l2mae``        = mean_a ||F_a - F*_a||_2                                (eV/Å)
- ``forces_cosine``       = mean_a F_a·F*_a / (||F_a|| ||F*_a||)  (each norm clamped at 1e-8)
- ``efwt``                = fraction of structures with |E_i - E*_i| < 0.02 eV and every
  free-atom force component |F_ac - F*_ac| < 0.03 eV/Å (a structure without free atoms
  counts on its energy alone)

``MetricSums`` keeps float64 sums, so batches (and, with ``all_reduce``, ranks) combine exactly
into the metrics of the whole set.
"""

from __future__ import annotations

import torch

EFWT_ENERGY_THRESHOLD = 0.02  # eV
EFWT_FORCE_THRESHOLD = 0.03  # eV/Å
METRIC_NAMES = (
    "energy_mae",
    "energy_per_atom_mae",
    "forces_mae",
    "forces_l2mae",
    "forces_cosine",
    "efwt",
)
# Order of the sums in MetricSums.values.
_SUMS = (
    "structures",
    "atoms",
    "free_atoms",
    "energy_abs",
    "energy_per_atom_abs",
    "force_abs",
    "force_l2",
    "force_cosine",
    "efwt",
)


class MetricSums:
    """Running float64 sums of the S2EF metrics (see the module docstring); ``add`` one batch at a
    time, ``result()`` for the metrics. ``values`` (9,) can be summed over ranks with all_reduce."""

    def __init__(self) -> None:
        self.values = torch.zeros(len(_SUMS), dtype=torch.float64)

    def add(
        self,
        energy: torch.Tensor,
        energy_ref: torch.Tensor,
        forces: torch.Tensor | None,
        forces_ref: torch.Tensor | None,
        natoms: torch.Tensor,
        free: torch.Tensor,
    ) -> None:
        """One batch of b structures, n atoms: energy, energy_ref (b,); forces, forces_ref (n, 3)
        (None for an energy-only model: force metrics stay 0); natoms (b,); free (n,) bool."""
        e = energy.detach().to("cpu", torch.float64).reshape(-1)
        e_ref = energy_ref.detach().to("cpu", torch.float64).reshape(-1)
        natoms = natoms.detach().to("cpu", torch.long).reshape(-1)
        free = free.detach().to("cpu", torch.bool).reshape(-1)
        if e.shape != e_ref.shape or e.shape != natoms.shape:
            raise ValueError(
                f"energy {tuple(e.shape)}, reference {tuple(e_ref.shape)} and natoms "
                f"{tuple(natoms.shape)} disagree"
            )
        if free.numel() != int(natoms.sum()):
            raise ValueError(f"free mask has {free.numel()} atoms, natoms sums to {natoms.sum()}")
        energy_err = (e - e_ref).abs()
        ok = energy_err < EFWT_ENERGY_THRESHOLD
        sums = torch.zeros_like(self.values)
        sums[0] = e.numel()
        sums[1] = natoms.sum()
        sums[2] = free.sum()
        sums[3] = energy_err.sum()
        sums[4] = (energy_err / natoms.clamp(min=1)).sum()
        if forces is not None and forces_ref is not None:
            f = forces.detach().to("cpu", torch.float64)
            f_ref = forces_ref.detach().to("cpu", torch.float64)
            if f.shape != f_ref.shape or f.shape != (free.numel(), 3):
                raise ValueError(
                    f"forces {tuple(f.shape)} and reference {tuple(f_ref.shape)} must be "
                    f"({free.numel()}, 3)"
                )
            err = (f - f_ref).abs()
            sums[5] = err[free].sum()
            sums[6] = torch.linalg.vector_norm(f - f_ref, dim=-1)[free].sum()
            norms = torch.linalg.vector_norm(f, dim=-1).clamp(min=1e-8) * torch.linalg.vector_norm(
                f_ref, dim=-1
            ).clamp(min=1e-8)
            sums[7] = ((f * f_ref).sum(-1) / norms)[free].sum()
            # per structure: the largest free-atom component error (0 without free atoms)
            structure = torch.repeat_interleave(torch.arange(e.numel()), natoms)
            worst = torch.zeros(e.numel(), dtype=torch.float64)
            worst.scatter_reduce_(0, structure[free], err[free].amax(-1), reduce="amax")
            ok = ok & (worst < EFWT_FORCE_THRESHOLD)
        sums[8] = ok.sum()
        self.values += sums

    def merge(self, other: MetricSums) -> None:
        """Add another accumulator's sums (e.g. another rank's)."""
        self.values += other.values

    @property
    def num_structures(self) -> int:
        return int(self.values[0])

    @property
    def num_atoms(self) -> int:
        return int(self.values[1])

    def result(self) -> dict[str, float]:
        """The metrics (module docstring) plus ``num_structures``, ``num_atoms``,
        ``num_free_atoms``. ValueError when nothing was added."""
        s = dict(zip(_SUMS, self.values.tolist(), strict=True))
        if s["structures"] == 0:
            raise ValueError("no structures were evaluated")
        free = max(s["free_atoms"], 1.0)
        return {
            "energy_mae": s["energy_abs"] / s["structures"],
            "energy_per_atom_mae": s["energy_per_atom_abs"] / s["structures"],
            "forces_mae": s["force_abs"] / (3.0 * free),
            "forces_l2mae": s["force_l2"] / free,
            "forces_cosine": s["force_cosine"] / free,
            "efwt": s["efwt"] / s["structures"],
            "num_structures": int(s["structures"]),
            "num_atoms": int(s["atoms"]),
            "num_free_atoms": int(s["free_atoms"]),
        }
