"""scn_fast.bucketing: padded atom and edge counts give the unpadded outputs, and MD sees few shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import units
from ase.build import fcc111, molecule
from ase.md.verlet import VelocityVerlet

from scn_fast import AtomsBatch, SphericalChannelNetwork
from scn_fast.ase import SCNCalculator
from scn_fast.bucketing import (
    Bucketer,
    BucketPolicy,
    Capacity,
    bucketed_forward,
    fits,
    pad_graph,
    plan_capacity,
    rank_caps,
    resolution_counts,
    round_up,
)
from scn_fast.presets import preset
from scn_fast.systems import cu111_co

F64 = torch.float64


def _model(fused: bool, dtype: torch.dtype = F64, **overrides) -> SphericalChannelNetwork:
    torch.manual_seed(0)
    cfg = {**preset("tiny"), **overrides}
    model = SphericalChannelNetwork(**cfg, use_fused=fused, deterministic_frames=True)
    return model.to(dtype)


def _batch(dtype: torch.dtype = F64) -> AtomsBatch:
    """A slab (periodic in-plane) and a molecule (no cell), so energies are per structure."""
    mol = molecule("CH3OH")
    mol.rattle(0.02, seed=1)
    return AtomsBatch.from_ase([cu111_co(size=(2, 2, 3)), mol], dtype=dtype)


def _loss_and_grads(model, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    w = torch.linspace(-1.0, 1.0, out["forces"].numel(), dtype=out["forces"].dtype)
    loss = (out["energy"] ** 2).sum() + (out["forces"].reshape(-1) * w).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss, [
        torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
    ]


def test_bucket_round_up_grid() -> None:
    assert round_up(0) == 0
    for n in (1, 7, 8, 9, 100, 1000, 4097, 123456):
        r = round_up(n, per_octave=32, min_step=8)
        assert n <= r <= max(n + 8, n * (1 + 1 / 32) + 1)
        assert round_up(r, per_octave=32, min_step=8) == r  # grid points are fixed points
    with pytest.raises(ValueError, match="size must be >= 0"):
        round_up(-1)
    with pytest.raises(ValueError, match="shrink"):
        BucketPolicy(shrink=1.0)


@pytest.mark.parametrize(
    ("fused", "resolutions"),
    [(False, 2), (True, 2), (False, 1)],
    ids=["bucket-reference", "bucket-fused", "bucket-reference-one-resolution"],
)
def test_bucket_outputs_and_gradients_equal_unpadded(fused: bool, resolutions: int) -> None:
    """Energy, forces and every parameter gradient of the padded input equal the unpadded ones
    (float64), through the reference and the fused (C++ extension) paths."""
    overrides = {"cutoff": 6.0}  # still more than 12 neighbours per slab atom: both resolutions
    if resolutions == 1:
        overrides |= {"num_resolutions": 1, "lmax": 2, "num_bands": 1}
    model = _model(fused, **overrides)
    data = _batch()
    st = model.read_input(data)
    graph = model.generate_graph(data, st)
    caps = rank_caps(model)
    n = st.pos.shape[0]
    counts = resolution_counts(graph.edge_index[1], n, caps)
    bucketer = Bucketer(caps, BucketPolicy(per_octave=4, headroom=0.2))
    capacity = bucketer.choose(n, counts)
    pads = [c - e for c, e in zip(capacity.edges, counts, strict=True)]
    # the padding covers every case: both resolutions padded, the hub and further inert targets
    assert all(p > 0 for p in pads) and capacity.atoms > n
    if resolutions == 2:
        assert pads[0] > 2 * caps[0]

    ref = model.forward_graph(st, graph)
    out, used = bucketed_forward(model, st, graph, bucketer)
    assert used == capacity
    if fused:
        assert model.explain()["edge_rotation"]["ran"] == "extension"
        assert model.explain()["grid_projection"]["ran"] == "extension"
    assert out["energy"].shape == ref["energy"].shape and out["forces"].shape == ref["forces"].shape
    torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["forces"], ref["forces"], rtol=1e-12, atol=1e-12)
    loss_ref, g_ref = _loss_and_grads(model, ref)
    loss_pad, g_pad = _loss_and_grads(model, out)
    torch.testing.assert_close(loss_pad, loss_ref, rtol=1e-12, atol=1e-12)
    for (name, _), a, b in zip(model.named_parameters(), g_pad, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, k=name: f"{k}: {m}")


def test_bucket_padding_is_inert_and_beyond_the_cutoff() -> None:
    model = _model(False, cutoff=6.0)
    data = _batch()
    st = model.read_input(data)
    graph = model.generate_graph(data, st)
    caps = rank_caps(model)
    n, e = st.pos.shape[0], graph.edge_index.shape[1]
    counts = resolution_counts(graph.edge_index[1], n, caps)
    capacity = plan_capacity(n, counts, caps, BucketPolicy(per_octave=4, headroom=0.2))
    padded = pad_graph(st, graph, capacity, caps, model.cutoff)
    pst, pg = padded.structure, padded.graph
    assert (pst.pos.shape[0], pg.edge_index.shape[1]) == capacity.shape
    # the real part is untouched
    assert torch.equal(pst.pos[:n], st.pos) and torch.equal(pg.edge_index[:, :e], graph.edge_index)
    # padded edges: between distinct inert atoms of the extra structure, beyond the cutoff
    src, tgt = pg.edge_index[:, e:]
    assert bool((src >= n).all() and (tgt >= n).all() and (src != tgt).all())
    assert bool((pg.edge_distance[e:] > model.cutoff).all())
    assert (
        bool((pst.batch[n:] == len(st.natoms)).all()) and int(pst.natoms[-1]) == capacity.atoms - n
    )
    assert int(pg.neighbors[-1]) == capacity.shape[1] - e
    assert bool((pg.edge_index[1].diff() >= 0).all())  # still grouped by target
    # per-resolution counts hit the capacity exactly
    assert resolution_counts(pg.edge_index[1], capacity.atoms, caps) == list(capacity.edges)
    with pytest.raises(ValueError, match="do not fit capacity"):
        pad_graph(st, graph, Capacity(n + 2, tuple(c - 1 for c in counts)), caps, model.cutoff)


def test_bucket_md_64_atom_slab_at_most_3_shapes() -> None:
    """50 VelocityVerlet steps of a 64-atom slab through the ASE calculator with bucketing: the
    model sees at most 3 distinct (atoms, edges) shapes, while the unpadded edge count changes
    (cutoff between the second and third neighbour shells, hot start). The first step's energy
    and forces equal the unbucketed calculator's."""
    model = _model(True, torch.float32, cutoff=3.7, num_interactions=1)
    slab = fcc111("Cu", size=(4, 4, 4), vacuum=6.0)
    slab.pbc = (True, True, False)
    slab.rattle(0.05, seed=0)
    assert len(slab) == 64
    plain = slab.copy()
    plain.calc = SCNCalculator(model)
    calc = SCNCalculator(model, bucketing=True)
    slab.calc = calc
    assert slab.get_potential_energy() == pytest.approx(plain.get_potential_energy(), abs=1e-5)
    np.testing.assert_allclose(slab.get_forces(), plain.get_forces(), atol=1e-5)

    rng = np.random.default_rng(0)  # Maxwell-Boltzmann momenta at 1200 K
    slab.set_momenta(
        rng.normal(size=(64, 3)) * np.sqrt(units.kB * 1200 * slab.get_masses()[:, None])
    )
    real, seen = set(), set()

    def record() -> None:
        seen.add(calc.runner.last_shape)
        real.add(calc.runner.last_real_shape)

    dyn = VelocityVerlet(slab, timestep=1.0 * units.fs)
    dyn.attach(record, interval=1)
    dyn.run(50)
    assert calc.timing_totals["calls"] >= 50
    assert len(real) > 3, f"the unpadded shapes did not change enough to test anything: {real}"
    assert len(seen) <= 3, f"bucketed shapes {sorted(seen)} (unpadded: {len(real)} distinct)"
    assert sum(calc.runner.bucketer.shapes.values()) == calc.timing_totals["calls"]


def test_bucket_capacity_is_sticky_and_replans() -> None:
    """A capacity is kept while the system fits and has not shrunk below policy.shrink; outgrowing
    it, shrinking, or running short of inert atoms for the padding plans a new one."""
    caps = [12, None]
    b = Bucketer(caps, BucketPolicy())
    first = b.choose(64, [768, 300])
    pads = [c - e for c, e in zip(first.edges, [768, 300], strict=True)]
    assert pads[0] >= 12 and pads[1] >= 0 and first.atoms > 64
    assert b.choose(64, [768, 310]) == first  # fluctuation inside the headroom
    assert b.choose(64, [760, 290]) == first
    grown = b.choose(64, [768, 500])
    assert grown != first and grown.edges[1] >= 500
    assert b.choose(20, [240, 100]) != grown  # shrank below 80%: replanned
    assert b.shapes[first.shape] == 3 and sum(b.shapes.values()) == 5
    # resolution-0 edges dropping far below the plan need more inert targets than the capacity has
    c = plan_capacity(64, [768, 300], caps, BucketPolicy())
    assert fits(c, 64, [768, 300], caps) and not fits(c, 64, [500, 300], caps)
    # the hub needs 12 padded resolution-0 edges whenever the last resolution is padded
    assert not fits(Capacity(80, (770, 400)), 64, [768, 300], caps)
