"""Evaluating a model on a labelled dataset: S2EF metrics (scn_fast/metrics.py), batched, with
throughput. Used by ``scn-fast evaluate`` and by validation during ``scn-fast train``."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from .batching import iter_batches
from .datasets import labeled_batch
from .metrics import MetricSums
from .readers import StructureDataset


@torch.no_grad()
def evaluate_model(
    model: Any,
    dataset: StructureDataset,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int | None = 8,
    max_atoms: int | None = None,
    progress: bool = False,
    desc: str = "evaluate",
) -> tuple[MetricSums, dict[str, float]]:
    """Predict every structure of ``dataset`` (or ``indices`` of it) with ``model.predict`` (energies
    and forces in eV, eV/Å: the model's ``normalizers`` are applied) and accumulate the metrics.
    Batches: consecutive structures, at most ``batch_size`` and ``max_atoms`` atoms. The model is
    put in eval mode for the call and returned to its previous mode. Returns (sums, timing) with
    timing = {"seconds", "structures_per_s", "atoms_per_s"}. ValueError for unlabelled structures."""
    idx = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = MetricSums()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(idx), desc=desc, unit="structure", file=sys.stderr)
    start = time.perf_counter()
    try:
        for batch_idx in iter_batches(idx, dataset.natoms, batch_size, max_atoms):
            samples = []
            for i in batch_idx:
                sample = dataset[i]
                sample.check_labels(i, dataset.source)
                samples.append(sample)
            batch = labeled_batch(samples, dtype=model.dtype, device=device)
            out = model.predict(batch.data)
            sums.add(
                out["energy"],
                batch.energy,
                out.get("forces"),
                batch.forces,
                batch.data.natoms,
                batch.free,
            )
            if bar is not None:
                bar.update(len(batch_idx))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    timing = {
        "seconds": seconds,
        "structures_per_s": sums.num_structures / max(seconds, 1e-12),
        "atoms_per_s": sums.num_atoms / max(seconds, 1e-12),
    }
    return sums, timing


def format_metrics(metrics: dict[str, float]) -> str:
    """``energy_mae=... forces_mae=...`` with the metrics of ``MetricSums.result``."""
    keys = ("energy_mae", "energy_per_atom_mae", "forces_mae", "forces_cosine", "efwt")
    return " ".join(f"{k}={metrics[k]:.6g}" for k in keys if k in metrics)
