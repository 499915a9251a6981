"""An ASE calculator for SCN: energies (eV) and forces (eV/Å) of ``ase.Atoms`` via ``model.predict``.

    from scn_fast.ase import SCNCalculator
    atoms.calc = SCNCalculator("checkpoint.pt", use_fused=True)
    BFGS(atoms).run(fmax=0.05)

The radius graph is rebuilt from the Atoms' positions, cell and pbc at every calculation, so the
calculator works in relaxations (``ase.optimize``) and dynamics (``ase.md``). What does not change
between calls is kept (scn_fast/ase_step.py); ``calc.timings`` holds the last call's time split
(transfer, graph, model, total; seconds) and ``calc.timing_totals`` their sums and ``calls``.
``bucketing=True`` pads atom and edge counts to capacities that stay put along a trajectory, with
outputs unchanged (scn_fast/bucketing.py), for compiled models and CUDA graphs.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from ase.calculators.calculator import Calculator, all_changes

from .ase_step import StepRunner
from .bucketing import BucketPolicy
from .checkpoint import load_checkpoint
from .model import SphericalChannelNetwork


class SCNCalculator(Calculator):
    """ASE calculator around an SCN (a model, or a checkpoint path loaded with ``load_checkpoint``).

    model_or_checkpoint_path: a ``SphericalChannelNetwork`` (used as given; its ``normalizers`` turn
    outputs into physical units) or a trainer checkpoint path. device: where the model runs (default:
    the model's device; for a path, CPU). load_kwargs go to ``load_checkpoint`` (``use_ema``,
    ``use_fused``, ``precision``, ...); for a path, ``deterministic_frames`` defaults to True so the
    energy is a function of the positions alone (upstream draws a random frame roll per call), and
    ``otf_graph`` to True (the calculator builds the graph itself). bucketing: False (default), True
    or a ``BucketPolicy`` (scn_fast.bucketing).
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces"]

    def __init__(
        self,
        model_or_checkpoint_path: SphericalChannelNetwork | str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        bucketing: bool | BucketPolicy = False,
        **load_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(model_or_checkpoint_path, SphericalChannelNetwork):
            if load_kwargs:
                raise ValueError(
                    f"load_kwargs {sorted(load_kwargs)} only apply when loading a checkpoint path"
                )
            model = model_or_checkpoint_path
            if device is not None:
                model = model.to(device)
        elif isinstance(model_or_checkpoint_path, (str, os.PathLike)):
            load_kwargs.setdefault("deterministic_frames", True)
            load_kwargs.setdefault("otf_graph", True)
            model = load_checkpoint(model_or_checkpoint_path, map_location=device, **load_kwargs)
        else:
            raise TypeError(
                "SCNCalculator needs a SphericalChannelNetwork or a checkpoint path, got "
                f"{type(model_or_checkpoint_path).__name__}"
            )
        if not model.regress_forces:
            raise ValueError("SCNCalculator needs a model with regress_forces=True")
        self.model = model.eval()
        self.runner = StepRunner(self.model, bucketing)

    @property
    def timings(self) -> dict[str, float]:
        """The last calculation's time split in seconds: transfer, graph, model, total."""
        return self.runner.timings

    @property
    def timing_totals(self) -> dict[str, float]:
        """Sums of ``timings`` over all calculations so far, and ``calls``."""
        return self.runner.totals

    @property
    def device(self) -> torch.device:
        return self.model.sphere_embedding.weight.device

    def calculate(
        self,
        atoms: Any = None,
        properties: list[str] | tuple[str, ...] = ("energy", "forces"),
        system_changes: list[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        energy, forces = self.runner(self.atoms)
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}
