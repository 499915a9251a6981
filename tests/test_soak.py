"""Soak: long MD and training runs must not grow the process's memory.

A tiny model on a tiny system: ASE molecular dynamics (velocity Verlet, the SCN calculator on the
fused path) and fused training steps (forward, energy + force loss, backward, AdamW). After a
warm-up (caches, the extension's block pool and the allocator reach their steady state) the
resident set size (RSS, /proc/self/statm) may grow by less than 5%.

CI runs a reduced soak (240 MD steps, 80 training steps; about 30 s on 2 cores).
``SCN_FAST_SOAK_FULL=1`` runs the full one: 1,000 MD steps and 300 training steps.
"""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch

from scn_fast import AtomsBatch, SphericalChannelNetwork, preset

FULL = os.environ.get("SCN_FAST_SOAK_FULL", "") not in ("", "0")
MD_STEPS, MD_WARMUP = (1000, 200) if FULL else (240, 80)
TRAIN_STEPS, TRAIN_WARMUP = (300, 60) if FULL else (80, 20)
MAX_GROWTH = 0.05

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads RSS from /proc/self/statm"
)


def rss_bytes() -> int:
    """Current resident set size of this process (after a garbage collection)."""
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tiny_model() -> SphericalChannelNetwork:
    """One interaction, lmax 2, a few channels: the per-step cost is mostly fixed overhead."""
    cfg = {
        **preset("tiny"),
        "num_interactions": 1,
        "lmax": 2,
        "num_resolutions": 1,
        "num_bands": 1,
        "sphere_channels": 4,
        "sphere_channels_reduce": 4,
        "hidden_channels": 8,
        "num_sphere_samples": 4,
        "num_basis_functions": 4,
        "cutoff": 3.5,
        "max_num_neighbors": 8,
    }
    torch.manual_seed(0)
    return SphericalChannelNetwork(
        **cfg, deterministic_frames=True, use_fused=True, backend="extension"
    )


def tiny_system():
    from ase.build import add_adsorbate, fcc111

    slab = fcc111("Cu", size=(2, 2, 1), vacuum=5.0)
    add_adsorbate(slab, "O", 1.3, "fcc")
    slab.rattle(0.05, seed=0)
    return slab


def assert_flat(samples: list[int], what: str) -> None:
    base, last = samples[0], samples[-1]
    growth = (last - base) / base
    mb = [round(s / 2**20, 1) for s in samples]
    print(f"{what}: RSS after warm-up and at each quarter (MB) {mb}, growth {growth:.2%}")
    assert growth < MAX_GROWTH, f"{what}: RSS grew {growth:.1%} after warm-up (MB: {mb})"


def test_md_memory_is_flat():
    import numpy as np
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from scn_fast.ase import SCNCalculator

    atoms = tiny_system()
    atoms.calc = SCNCalculator(tiny_model().eval())
    kt = 300 * units.kB  # Maxwell-Boltzmann momenta at 300 K
    masses = atoms.get_masses()[:, None]
    atoms.set_momenta(np.random.default_rng(0).normal(size=(len(atoms), 3)) * np.sqrt(masses * kt))
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.run(MD_WARMUP)
    samples = [rss_bytes()]
    for _ in range(4):
        dyn.run((MD_STEPS - MD_WARMUP) // 4)
        samples.append(rss_bytes())
    assert_flat(samples, f"{MD_STEPS} MD steps")
    assert torch.isfinite(torch.as_tensor(atoms.get_forces())).all()


def test_fused_training_memory_is_flat():
    model = tiny_model().train()
    data = AtomsBatch.from_ase([tiny_system(), tiny_system().repeat((2, 1, 1))])
    target_e = torch.tensor([0.5, -0.3])  # arbitrary targets: the loss must still fall
    target_f = torch.randn(data.pos.shape[0], 3, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        out = model(data)
        loss = (out["energy"] - target_e).abs().mean() + (out["forces"] - target_f).pow(2).mean()
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(TRAIN_WARMUP):
        step()
    assert model.explain()["edge_rotation"]["ran"] == "extension"
    samples = [rss_bytes()]
    losses = []
    for k in range(TRAIN_STEPS - TRAIN_WARMUP):
        losses.append(step())
        if (k + 1) % ((TRAIN_STEPS - TRAIN_WARMUP) // 4) == 0:
            samples.append(rss_bytes())
    assert_flat(samples, f"{TRAIN_STEPS} training steps")
    assert all(v == v for v in losses) and losses[-1] < losses[0]
