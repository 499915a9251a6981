"""Model-level behaviour beyond the golden numbers: construction, state_dict, inputs, bad input,
edge cases, deterministic frames, autograd, and the dispatcher's report."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from scn_fast import AtomsBatch, SphericalChannelNetwork, preset
from scn_fast.dispatch import OPS, BackendUnavailableError
from scn_fast.frames import edge_frames
from scn_fast.systems import cu111_co, pt_bulk

from .conftest import GOLDEN_DIR, golden_inputs, load_golden

TINY = preset("tiny")


def tiny_model(**kw) -> SphericalChannelNetwork:
    torch.manual_seed(0)
    return SphericalChannelNetwork(**{**TINY, **kw}).eval()


# ----------------------------------------------------------------------------- construction
def test_scn_t4_b2_parameter_count_matches_upstream():
    with torch.device("meta"):
        model = SphericalChannelNetwork(**preset("scn-t4-b2"))
    assert model.num_params == 126_710_274


def test_ocpmodels_positional_signature():
    """num_atoms, bond_feat_dim, num_targets first (ignored), then use_pbc, regress_forces, otf_graph..."""
    m = SphericalChannelNetwork(
        None, None, None, True, False, True, 12, 6.0, 30, 1, 4, 1, 1, 8, 8, 16
    )
    assert (m.regress_forces, m.otf_graph, m.max_num_neighbors, m.cutoff) == (False, True, 12, 6.0)
    assert (m.max_num_elements, m.num_interactions, m.lmax, m.hidden_channels) == (30, 1, 4, 16)
    assert not hasattr(m, "force_fc1")
    with pytest.raises(TypeError):
        SphericalChannelNetwork(
            *([None] * 3 + [True] * 22 + [True])
        )  # use_pbc_single is keyword-only


def test_same_seed_same_initial_weights_as_upstream():
    """Upstream's state_dict after torch.manual_seed(7) (fixture made with fairchem-core 1.10.0)."""
    fixture = torch.load(GOLDEN_DIR / "upstream_init_seed7.pt", weights_only=True)
    for name, entry in fixture["models"].items():
        torch.manual_seed(fixture["seed"])
        ours = SphericalChannelNetwork(**entry["config"]).state_dict()
        assert list(ours) == list(entry["state_dict"]), name
        for key, value in entry["state_dict"].items():
            assert torch.equal(ours[key], value), f"{name}: {key}"


def test_every_golden_state_dict_loads_strictly(golden):
    model = SphericalChannelNetwork(**golden["config"])
    assert list(model.state_dict()) == list(golden["state_dict"])
    model.load_state_dict(golden["state_dict"], strict=True)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"lmax": 11}, "lmax"),
        ({"mmax": 2}, "mmax"),
        ({"num_resolutions": 3}, "num_resolutions"),
        ({"lmax": 3, "num_resolutions": 2}, "lmax >= 4"),
        ({"num_bands": 6}, "num_bands"),
        ({"distance_function": "bessel"}, "distance_function"),
        ({"direct_forces": False}, "direct_forces"),
        ({"precision": "fp16"}, "precision"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_bad_config_is_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        SphericalChannelNetwork(**{**TINY, **kw})


# ----------------------------------------------------------------------------- inputs
def test_atomsbatch_namespace_and_dict_inputs_agree():
    atoms = [cu111_co(size=(2, 2, 3)), pt_bulk()]
    model = tiny_model(deterministic_frames=True)
    batch = AtomsBatch.from_ase(atoms)
    ns = types.SimpleNamespace(
        pos=batch.pos,
        cell=batch.cell,
        atomic_numbers=batch.atomic_numbers.float(),
        natoms=batch.natoms,
        batch=batch.batch,
        pbc=batch.pbc,
    )
    with torch.no_grad():
        a, b = model(batch), model(ns)
    assert a["energy"].shape == (2,) and a["forces"].shape == (len(batch.pos), 3)
    assert torch.equal(a["energy"], b["energy"]) and torch.equal(a["forces"], b["forces"])


def test_no_grad_keeps_no_graph_and_grad_mode_trains():
    model = tiny_model()
    data = AtomsBatch.from_ase([cu111_co(size=(2, 2, 3))])
    with torch.no_grad():
        out = model(data)
    assert not out["energy"].requires_grad and out["energy"].grad_fn is None
    out = model(data)
    (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.edge_blocks[0].message_blocks[0].fc1_edge_proj.weight.grad.abs().sum() > 0


def test_float64_model_runs_in_float64():
    model = tiny_model().double()
    with torch.no_grad():
        out = model(AtomsBatch.from_ase([pt_bulk()]))
    assert out["energy"].dtype == torch.float64 and out["forces"].dtype == torch.float64


# ----------------------------------------------------------------------------- bad input
def _ns(atoms_list):
    b = AtomsBatch.from_ase(atoms_list)
    return types.SimpleNamespace(
        pos=b.pos,
        cell=b.cell,
        atomic_numbers=b.atomic_numbers,
        natoms=b.natoms,
        batch=b.batch,
        pbc=b.pbc,
    )


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.atomic_numbers.__setitem__(0, 90), "atomic number 90"),
        (lambda d: d.atomic_numbers.__setitem__(1, -1), "atomic number -1"),
        (lambda d: d.pos.__setitem__((2, 0), float("nan")), "NaN or inf"),
        (lambda d: d.pos.__setitem__((2, 1), float("inf")), "NaN or inf"),
        (lambda d: d.cell.__setitem__((0, 0, 0), float("nan")), "NaN or inf"),
        (lambda d: d.pos.__setitem__(3, d.pos[4]), "same position|closer than|coincide"),
        (lambda d: setattr(d, "natoms", d.natoms + 1), "natoms"),
        (lambda d: d.batch.__setitem__(0, 1), "batch"),
        (lambda d: setattr(d, "pos", d.pos[:-1]), "natoms|atoms"),
        (lambda d: d.cell.__setitem__((0, 1), d.cell[0, 0] * 2), "singular|independent|degenerate"),
    ],
)
def test_bad_input_raises_value_error(mutate, match):
    data = _ns([cu111_co(size=(2, 2, 3))])
    mutate(data)
    with pytest.raises(ValueError, match=match):
        tiny_model()(data)


# ----------------------------------------------------------------------------- edge cases
def test_isolated_atom_last_and_empty_batch_are_finite():
    slab = cu111_co(size=(2, 2, 3))
    far = Atoms("H", positions=[[0.0, 0.0, 0.0]], cell=[30.0, 30.0, 30.0], pbc=False)
    lonely = slab + Atoms("H", positions=[slab.positions.mean(0) + np.array([0.0, 0.0, 25.0])])
    lonely.center(vacuum=20.0, axis=2)
    model = tiny_model()
    with torch.no_grad():
        out = model(AtomsBatch.from_ase([lonely, far]))
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    with torch.no_grad():
        empty = model(AtomsBatch.from_ase([far, far.copy()]))
        graph = model.generate_graph(AtomsBatch.from_ase([far]))
    assert graph.edge_index.shape == (2, 0)
    assert torch.isfinite(empty["energy"]).all() and torch.isfinite(empty["forces"]).all()
    assert torch.equal(empty["energy"][0], empty["energy"][1])


def test_non_periodic_molecule_uses_nearest_neighbours():
    mol = molecule("C6H6")
    mol.pbc = False
    model = tiny_model(use_pbc=False, max_num_neighbors=5)
    graph = model.generate_graph(AtomsBatch.from_ase([mol]))
    d = np.linalg.norm(mol.positions[:, None] - mol.positions[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    tgt = graph.edge_index[1].numpy()
    for i in range(len(mol)):
        kept = np.sort(graph.edge_distance.numpy()[tgt == i])
        np.testing.assert_allclose(kept, np.sort(d[i])[:5], rtol=1e-5)


def test_precomputed_graph_is_regrouped_or_rejected():
    g = load_golden("tiny__cu111_co.pt")
    model = SphericalChannelNetwork(**{**g["config"], "otf_graph": False})
    model.load_state_dict(g["state_dict"])
    data = golden_inputs(g, precomputed=True)
    torch.manual_seed(0)
    with torch.no_grad():
        ref = model(data)
    perm = torch.randperm(data.edge_index.shape[1], generator=torch.Generator().manual_seed(1))
    shuffled = golden_inputs(g, precomputed=True)
    shuffled.edge_index, shuffled.cell_offsets = data.edge_index[:, perm], data.cell_offsets[perm]
    # Regrouping by target keeps each target's edges in their shuffled relative order, so frames
    # drawn at random would differ: compare with deterministic frames, in float64 (only the
    # summation order differs, and float32 forces cancel strongly).
    model.deterministic_frames = True
    model.double()
    with torch.no_grad():
        a, b = model(data), model(shuffled)
    torch.testing.assert_close(a["energy"], b["energy"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        a["forces"], b["forces"], rtol=0, atol=1e-10 * ref["forces"].abs().max().item()
    )
    model.max_num_neighbors = 30
    with pytest.raises(ValueError, match="more than max_num_neighbors=30"):
        model(data)
    bad = golden_inputs(g, precomputed=True)
    bad.neighbors = bad.neighbors + 1
    model.max_num_neighbors = 40
    with pytest.raises(ValueError, match="neighbors"):
        model(bad)


def test_non_strict_truncation_keeps_degenerate_neighbours():
    """enforce_max_neighbors_strictly=False keeps equidistant shells whole (perfect fcc: 12 + 6 + 24)."""
    atoms = bulk("Cu", "fcc", a=3.61)
    data = AtomsBatch.from_ase([atoms])
    strict = tiny_model(max_num_neighbors=14)
    loose = tiny_model(max_num_neighbors=14, enforce_max_neighbors_strictly=False)
    assert strict.generate_graph(data).edge_index.shape[1] == 14
    assert loose.generate_graph(data).edge_index.shape[1] == 18
    with torch.no_grad():
        out = loose(data)
    assert torch.isfinite(out["forces"]).all()


# ----------------------------------------------------------------------------- frames
def test_deterministic_frames_are_a_pure_function_of_the_edge_vector():
    vec = torch.randn(200, 3, dtype=torch.float64)
    frames = edge_frames(vec, deterministic=True)
    perm = torch.randperm(200)
    assert torch.equal(edge_frames(vec[perm], deterministic=True), frames[perm])
    assert torch.equal(edge_frames(vec.float(), deterministic=True), edge_frames(vec.float(), True))
    eye = torch.eye(3, dtype=torch.float64).expand(200, 3, 3)
    torch.testing.assert_close(frames @ frames.transpose(1, 2), eye)
    torch.testing.assert_close(frames[:, 1], vec / vec.norm(dim=1, keepdim=True))
    assert torch.allclose(torch.linalg.det(frames), torch.ones(200, dtype=torch.float64))


def test_deterministic_frames_ignore_rng_and_batch_order():
    a, b = cu111_co(size=(2, 2, 3)), pt_bulk()
    model = tiny_model(deterministic_frames=True)
    with torch.no_grad():
        torch.manual_seed(1)
        ab = model(AtomsBatch.from_ase([a, b]))
        torch.manual_seed(2)
        ba = model(AtomsBatch.from_ase([b, a]))
    n_a = len(a)
    torch.testing.assert_close(ab["energy"], ba["energy"].flip(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ab["forces"][:n_a], ba["forces"][len(b) :], rtol=0, atol=1e-7)


def test_random_frames_follow_the_global_rng():
    model = tiny_model(num_taps=1)
    data = AtomsBatch.from_ase([cu111_co(size=(2, 2, 3))])
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs.append(model(data)["forces"])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


# ----------------------------------------------------------------------------- dispatcher
def test_explain_reports_what_ran_and_why_not(monkeypatch):
    data = AtomsBatch.from_ase([pt_bulk()])
    model = tiny_model()
    with torch.no_grad():
        model(data)
    report = model.explain()
    assert set(report) == {*OPS, "memory"}  # the six fused ops and the memory plan
    assert report["memory"]["ran"] == "unchunked"
    for rec in (report[op] for op in OPS):
        assert rec["ran"] == "reference"
        assert set(rec) == {"ran", "variant", "refused"}
        assert rec["refused"] == {"triton": "use_fused=False", "extension": "use_fused=False"}

    fused = tiny_model(use_fused=True)
    with torch.no_grad():
        fused(data)
    report = fused.explain()
    for op in ("edge_rotation", "scatter_aggregation"):
        assert report[op]["ran"] == "extension"
        assert "never picks" in report[op]["refused"]["triton"]
    for op in ("grid_projection", "output_heads"):
        assert report[op]["ran"] == "extension", (op, report[op])
        assert "never picks" in report[op]["refused"]["triton"]
        assert report[op]["variant"]["tile_atoms"] >= 1
    for op in ("gated_tap_projection", "tap_combine"):
        assert report[op]["ran"] == "extension", (op, report[op])
    assert report["edge_rotation"]["variant"] == {"split_rotation": True, "degree0_input": True}
    assert report["tap_combine"]["variant"]["fc2"] == "scratch"  # no autograd

    monkeypatch.setenv("SCN_FAST_BACKEND", "reference")
    with torch.no_grad():
        fused(data)
    for rec in (fused.explain()[op] for op in OPS):
        assert rec["ran"] == "reference"
        assert set(rec["refused"]) == {"triton", "extension"}

    monkeypatch.setenv("SCN_FAST_BACKEND", "gpu")
    with pytest.raises(ValueError, match="SCN_FAST_BACKEND"):
        fused(data)


def test_explicit_backend_that_cannot_run_raises_with_reasons():
    model = tiny_model(use_fused=True, backend="extension").to(torch.bfloat16)
    with (
        pytest.raises(BackendUnavailableError, match=r"extension.*float32 and float64"),
        torch.no_grad(),
    ):
        model(AtomsBatch.from_ase([pt_bulk()]))
