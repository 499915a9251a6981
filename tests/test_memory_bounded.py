"""Memory-bounded forwards (scn_fast.memory_plan): target-aligned edge chunks and activation
checkpointing give the unchunked results, and the plan states its budget and largest system."""

from __future__ import annotations

import pytest
import torch

import scn_fast
from scn_fast import AtomsBatch, SphericalChannelNetwork
from scn_fast.memory_plan import bytes_per_edge, check_budget, check_checkpoint
from scn_fast.presets import preset
from scn_fast.systems import cu111_co

F64 = torch.float64
BACKENDS = ["extension", "triton"]


def _model(budget, checkpoint="off", backend="extension", dtype=F64, **overrides):
    torch.manual_seed(0)
    cfg = {**preset("tiny"), **overrides}
    model = SphericalChannelNetwork(
        **cfg,
        use_fused=True,
        backend=backend,
        deterministic_frames=True,
        memory_budget=budget,
        activation_checkpointing=checkpoint,
    )
    return model.to(dtype)


def _batch(dtype=F64, size=(2, 2, 3)) -> AtomsBatch:
    from ase.build import molecule

    mol = molecule("CH3OH")
    mol.rattle(0.02, seed=1)
    return AtomsBatch.from_ase([cu111_co(size=size), mol], dtype=dtype)


def _small_budget(model) -> int:
    """A budget that puts about 3 targets' far edges in a chunk."""
    res = model.resolutions[-1]
    b = bytes_per_edge(
        res.lmax, res.mmax, res.num_taps, res.hidden, model.sphere_channels_reduce, 8
    )
    return 60 * b


def _grads(model, out):
    w = torch.linspace(-1.0, 1.0, out["forces"].numel(), dtype=out["forces"].dtype)
    loss = (out["energy"] ** 2).sum() + (out["forces"].reshape(-1) * w).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _chunk_counts(model, data) -> list[int]:
    _, ctx = model.prepare(data)
    return [len(ctx.chunks(r) or [None]) for r in range(len(model.resolutions))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_bounded_chunks_match_unchunked(backend):
    """Inference and (extension) a training step in edge chunks equal the unchunked forward
    (float64): energies, forces and every parameter gradient. Triton runs in its interpreter here,
    so it checks inference on a smaller slab."""
    data = _batch() if backend == "extension" else _batch(size=(2, 2, 2))
    whole = _model(None, backend=backend)
    chunked = _model(_small_budget(whole), backend=backend)
    chunked.load_state_dict(whole.state_dict())
    counts = _chunk_counts(chunked, data)
    assert all(c > 2 for c in counts), counts
    assert _chunk_counts(whole, data) == [1] * len(counts)
    with torch.no_grad():
        a, b = whole(data), chunked(data)
    for key in ("energy", "forces"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-11, atol=1e-11)
    if backend == "extension":
        a, b = whole(data), chunked(data)
        for ga, gb in zip(_grads(whole, a), _grads(chunked, b), strict=True):
            torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-11)
    report = chunked.explain()["memory"]
    assert report["ran"] == "edge chunks"
    assert whole.explain()["memory"]["ran"] == "unchunked"
    assert "memory_budget=None" in whole.explain()["memory"]["refused"]["edge chunks"]


@pytest.mark.parametrize("budget", ["small", None])
def test_memory_bounded_checkpointing_matches(budget):
    """Activation checkpointing of edge chunks (and of a whole resolution, unchunked) gives the
    gradients of the plain training step, and the plan reports it."""
    data = _batch()
    plain = _model(None)
    ckpt = _model(_small_budget(plain) if budget == "small" else None, checkpoint="edges")
    ckpt.load_state_dict(plain.state_dict())
    a, b = plain(data), ckpt(data)
    assert ckpt.explain()["memory"]["variant"]["checkpoint"] == "edges"
    assert plain.explain()["memory"]["variant"]["checkpoint"] == "off"
    for key in ("energy", "forces"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-11, atol=1e-11)
    for ga, gb in zip(_grads(plain, a), _grads(ckpt, b), strict=True):
        torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-11)


def test_memory_bounded_checkpointing_saves_less():
    """Checkpointed, the tensors autograd keeps for the backward are fewer bytes (counted through
    saved-tensor hooks; the unchunked path keeps every chunk's intermediates)."""

    def saved_bytes(model, data):
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(data)
        _grads(model, out)
        return sum(seen.values())

    data = _batch(size=(3, 3, 3))
    plain = _model(None)
    ckpt = _model(_small_budget(plain), checkpoint="edges")
    ckpt.load_state_dict(plain.state_dict())
    assert saved_bytes(ckpt, data) < 0.6 * saved_bytes(plain, data)


def test_memory_bounded_edges_not_grouped_by_target():
    """A graph whose edges are not grouped by target is chunked through an index (the edges of a
    chunk's targets gathered in their order): same results as its unchunked forward."""
    data = _batch()
    whole = _model(None)
    chunked = _model(_small_budget(whole))
    chunked.load_state_dict(whole.state_dict())
    st = whole.read_input(data)
    graph = whole.generate_graph(data, st)
    perm = torch.randperm(graph.edge_index.shape[1], generator=torch.Generator().manual_seed(3))
    shuffled = type(graph)(
        graph.edge_index[:, perm],
        graph.edge_distance[perm],
        graph.edge_distance_vec[perm],
        graph.cell_offsets[perm],
        graph.offset_distances[perm],
        graph.neighbors,
    )
    ctx = chunked.planned_context(st, shuffled, grad=False)
    chunks = ctx.chunks(len(whole.resolutions) - 1)
    assert chunks is not None and isinstance(chunks[0].edges, torch.Tensor)
    with torch.no_grad():
        a = whole.forward_graph(st, shuffled)
        b = chunked.forward_graph(st, shuffled)
    for key in ("energy", "forces"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-10, atol=1e-11)


def test_memory_bounded_target_larger_than_chunk():
    """A budget below one target's edges: each target is a chunk of its own."""
    data = _batch()
    model = _model(1)
    _, ctx = model.prepare(data)
    for r in range(len(model.resolutions)):
        lo, hi = ctx.bounds[r], ctx.bounds[r + 1]
        chunks = ctx.chunks(r)
        targets = ctx.edge_index[1, lo:hi].unique()
        assert len(chunks) == len(targets)
        assert all(ch.t1 - ch.t0 >= 1 for ch in chunks)
        assert sum(ch.wig.shape[0] for ch in chunks) == hi - lo


def test_memory_bounded_options_are_checked():
    with pytest.raises(ValueError, match="memory_budget"):
        _model(-5)
    with pytest.raises(ValueError, match="memory_budget"):
        _model("big")
    with pytest.raises(ValueError, match="activation_checkpointing"):
        _model(None, checkpoint="yes")
    assert check_budget(None) is None and check_budget("auto") == "auto"
    assert check_checkpoint(True) == "edges" and check_checkpoint(False) == "off"


def test_memory_bounded_plan_states_largest_system():
    """The plan's memory report: budgets from the device memory, one chunk for 1,000 atoms on a
    GPU, and a largest system that grows with the memory and shrinks for training."""
    cfg = preset("scn-t4-b2")
    gpu = scn_fast.plan(cfg, device="cuda", natoms=1000, device_memory=80 * 10**9)
    mem = gpu.explain()["memory"]["variant"]
    assert mem["budget_bytes"] == 8 * 10**9  # 10% of 80 GB, under the 8 GiB cap
    assert mem["edge_chunk"][0] >= 12 * 1000 and mem["edge_chunk"][1] >= 28 * 1000
    small = scn_fast.plan(cfg, device="cuda", device_memory=24 * 10**9).memory
    assert small.largest_system(False) < gpu.memory.largest_system(False)
    assert gpu.memory.largest_system(True) < gpu.memory.largest_system(False)
    cpu = scn_fast.plan(cfg, device="cpu", device_memory=24 * 10**9)
    assert cpu.explain()["memory"]["variant"]["budget_bytes"] == 1 << 30
    # training "auto": checkpointed when the unchunked activations would not fit
    assert cpu.memory.checkpoints(1000, (12_000, 28_000), training=True)
    assert not cpu.memory.checkpoints(38, (456, 1064), training=True)
    compiled = scn_fast.plan(cfg, device="cpu", compiled=True).explain()["memory"]
    assert compiled["ran"] == "unchunked" and "compiled" in compiled["refused"]["edge chunks"]
