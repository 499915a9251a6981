"""Tests of scn_fast.graph: ASE equivalence, truncation rules, ordering, golden graphs, bad input,
empty systems and the 4,000-atom performance bound."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.neighborlist import neighbor_list

import scn_fast.graph as graph_module
from scn_fast.graph import (
    RadiusGraph,
    check_precomputed_graph,
    edge_vectors,
    radius_graph_pbc,
    validate_structure,
)

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- systems


def _rattled(atoms: Atoms, seed: int, stdev: float = 0.05) -> Atoms:
    atoms = atoms.copy()
    atoms.rattle(stdev=stdev, seed=seed)
    return atoms


def cu_bulk() -> Atoms:
    return _rattled(bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2)), seed=1)


def pt_small() -> Atoms:
    """4-atom cubic Pt cell: with cutoff 8 every neighbour appears through many images."""
    return _rattled(bulk("Pt", "fcc", a=3.92, cubic=True), seed=2)


def cu_slab_co() -> Atoms:
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=8.0)
    add_adsorbate(slab, molecule("CO"), height=1.9, position="ontop")
    slab.center(vacuum=8.0, axis=2)
    return _rattled(slab, seed=3)


def ethanol() -> Atoms:
    mol = molecule("CH3CH2OH")
    mol.cell = np.zeros((3, 3))
    mol.pbc = False
    return _rattled(mol, seed=4, stdev=0.02)


def triclinic() -> Atoms:
    cell = np.array([[3.1, 0.0, 0.0], [2.2, 2.9, 0.0], [1.3, -1.1, 2.7]])
    frac = np.array([[0.1, 0.2, 0.3], [0.6, 0.5, 0.9], [0.35, 0.8, 0.55]])
    return Atoms("Cu3", scaled_positions=frac, cell=cell, pbc=True)


def skewed_fcc() -> Atoms:
    """Primitive (60-degree) fcc cell, repeated and rattled."""
    return _rattled(bulk("Cu", "fcc", a=3.61).repeat((2, 2, 2)), seed=5)


def short_vector() -> Atoms:
    """A lattice vector (1.1 Å) much shorter than the cutoff, with a tilted third vector."""
    cell = np.array([[1.1, 0.0, 0.0], [0.0, 4.6, 0.0], [0.3, 0.2, 5.1]])
    return Atoms("H2", scaled_positions=[[0.1, 0.1, 0.1], [0.6, 0.55, 0.45]], cell=cell, pbc=True)


def wire() -> Atoms:
    """Periodic along x only (pbc T, F, F), short period, atoms outside the cell."""
    cell = np.array([[2.3, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    pos = np.array([[0.2, 0.1, 0.0], [1.4, 0.9, 0.3], [-3.1, -0.8, 1.1]])
    return Atoms("C3", positions=pos, cell=cell, pbc=[True, False, False])


def tilted_slab() -> Atoms:
    """pbc (T, T, F) whose third (non-periodic) vector is tilted, atoms partly outside the cell."""
    atoms = _rattled(fcc111("Pt", size=(2, 2, 2), vacuum=6.0), seed=6)
    cell = np.array(atoms.cell)
    cell[2] = [3.0, -2.0, cell[2, 2]]
    atoms.set_cell(cell, scale_atoms=False)
    atoms.positions += [7.3, -4.1, 0.0]
    return atoms


SYSTEMS = {
    "cu_bulk": cu_bulk,
    "pt_small": pt_small,
    "cu_slab_co": cu_slab_co,
    "ethanol": ethanol,
    "triclinic": triclinic,
    "skewed_fcc": skewed_fcc,
    "short_vector": short_vector,
    "wire": wire,
    "tilted_slab": tilted_slab,
}
CUTOFFS = (3.0, 6.0)


def as_batch(
    systems: list[Atoms], dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pos (N,3), cell (B,3,3), pbc (B,3), natoms (B,)) of a list of ASE systems."""
    pos = torch.tensor(np.concatenate([a.positions for a in systems]), dtype=dtype)
    cell = torch.tensor(np.stack([np.array(a.cell) for a in systems]), dtype=dtype)
    pbc = torch.tensor(np.stack([a.pbc for a in systems]))
    natoms = torch.tensor([len(a) for a in systems])
    return pos, cell, pbc, natoms


def batch_index(natoms: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(natoms)), natoms)


# ----------------------------------------------------------------------------- references


def ase_pairs(systems: list[Atoms], cutoff: float) -> np.ndarray:
    """ASE's pairs of all systems as global rows (i, j, n0, n1, n2), sorted in output order."""
    rows, first = [], 0
    for atoms in systems:
        i, j, shifts = neighbor_list("ijS", atoms, cutoff)
        rows.append(np.column_stack([i + first, j + first, shifts]).astype(np.int64))
        first += len(atoms)
    pairs = np.concatenate(rows) if rows else np.zeros((0, 5), np.int64)
    return pairs[np.lexsort(pairs.T[::-1])]


def reference_d2(pos: np.ndarray, cell: np.ndarray, batch: np.ndarray, pairs: np.ndarray):
    """Squared distances in float64 with the same expression (and operation order) as the
    implementation's canonical formula."""
    return reference_geometry(pos, cell, batch, pairs)[0]


def reference_geometry(
    pos: np.ndarray, cell: np.ndarray, batch: np.ndarray, pairs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(squared distances (P,), pair vectors (P, 3)) in float64, the canonical formula."""
    i, j, n = pairs[:, 0], pairs[:, 1], pairs[:, 2:].astype(np.float64)
    lattice = cell[batch[i]]
    d2 = np.zeros(len(pairs))
    vec = np.zeros((len(pairs), 3))
    for x in range(3):
        shift = n[:, 0] * lattice[:, 0, x] + n[:, 1] * lattice[:, 1, x]
        shift = shift + n[:, 2] * lattice[:, 2, x]
        d = (pos[j, x] - pos[i, x]) + shift
        vec[:, x] = d
        d2 = d2 + d * d
    return d2, vec


def reference_tie_order(dist: np.ndarray, vec: np.ndarray, tol: float = 1e-4) -> list[int]:
    """Independent loop version of the rule of scn_fast.neighbours for one target's edges:
    groups of distances whose sorted gaps are <= tol, split the same way by x, y, then z;
    edges still tied keep their input order."""
    groups = [list(range(len(dist)))]
    for values in (dist, vec[:, 0], vec[:, 1], vec[:, 2]):
        refined = []
        for group in groups:
            ordered = sorted(group, key=lambda e: (values[e], e))
            run = [ordered[0]]
            for a, b in itertools.pairwise(ordered):
                if values[b] - values[a] > tol:
                    refined.append(run)
                    run = []
                run.append(b)
            refined.append(run)
        groups = refined
    return [e for group in groups for e in sorted(group)]


def reference_truncate(
    pairs: np.ndarray, d2: np.ndarray, max_neighbors: int, strict: bool, vec: np.ndarray
) -> np.ndarray:
    """Independent numpy truncation. Strict: rank each target's candidates (in output order) by
    ``reference_tie_order`` (distance, ties by the pair vector vec (P, 3)); non-strict:
    upstream's threshold."""
    keep = np.zeros(len(pairs), dtype=bool)
    for target in np.unique(pairs[:, 0]):
        idx = np.nonzero(pairs[:, 0] == target)[0]
        order = idx[np.argsort(d2[idx], kind="stable")]
        if len(idx) <= max_neighbors:
            keep[idx] = True
        elif strict:
            ranked = idx[reference_tie_order(np.sqrt(d2[idx]), vec[idx])]
            keep[ranked[:max_neighbors]] = True
        else:
            threshold = d2[order[max_neighbors]] + 0.01
            keep[idx[d2[idx] <= threshold]] = True
    return pairs[keep]


def our_pairs(graph: RadiusGraph) -> np.ndarray:
    """Our edges as rows (i, j, n0, n1, n2) in our output order."""
    ei = graph.edge_index.numpy()
    return np.column_stack([ei[1], ei[0], graph.cell_offsets.numpy()]).astype(np.int64)


def f32_exact(atoms: Atoms) -> Atoms:
    """A copy whose positions and cell are exactly float32 values (for float32 input tests)."""
    atoms = atoms.copy()
    atoms.set_cell(np.array(atoms.cell).astype(np.float32).astype(np.float64))
    atoms.positions = atoms.positions.astype(np.float32).astype(np.float64)
    return atoms


# ----------------------------------------------------------------------------- ASE equivalence


@pytest.mark.parametrize("cutoff", CUTOFFS)
@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_edge_set_matches_ase(name: str, cutoff: float) -> None:
    atoms = SYSTEMS[name]()
    g = radius_graph_pbc(*as_batch([atoms]), cutoff, max_num_neighbors=0)
    np.testing.assert_array_equal(our_pairs(g), ase_pairs([atoms], cutoff))
    assert g.edge_index.dtype == torch.int64 and g.cell_offsets.dtype == torch.int64
    assert g.neighbors.tolist() == [g.edge_index.shape[1]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mixed_pbc_batch_matches_ase(dtype: torch.dtype) -> None:
    """All systems in one batch (mixed pbc per system); float32 input selects in float64."""
    systems = [f32_exact(SYSTEMS[name]()) for name in sorted(SYSTEMS)]
    pos, cell, pbc, natoms = as_batch(systems, dtype)
    g = radius_graph_pbc(pos, cell, pbc, natoms, 6.0, max_num_neighbors=0)
    expected = ase_pairs(systems, 6.0)
    np.testing.assert_array_equal(our_pairs(g), expected)
    counts = np.bincount(batch_index(natoms).numpy()[expected[:, 0]], minlength=len(systems))
    assert g.neighbors.tolist() == counts.tolist()


def test_edge_vectors_match_ase() -> None:
    systems = [SYSTEMS[name]() for name in sorted(SYSTEMS)]
    pos, cell, pbc, natoms = as_batch(systems)
    g = radius_graph_pbc(pos, cell, pbc, natoms, 6.0, max_num_neighbors=0)
    vec = edge_vectors(pos, cell, batch_index(natoms), g.edge_index, g.cell_offsets)
    expected, first = [], 0
    for atoms in systems:
        i, j, shifts, d = neighbor_list("ijSD", atoms, 6.0)
        rows = np.column_stack([i + first, j + first, shifts])
        expected.append(d[np.lexsort(rows.T[::-1])])
        first += len(atoms)
    assert vec.dtype == torch.float64
    np.testing.assert_allclose(vec.numpy(), np.concatenate(expected), atol=1e-10)
    vec32 = edge_vectors(
        pos.float(), cell.float(), batch_index(natoms), g.edge_index, g.cell_offsets.float()
    )
    assert vec32.dtype == torch.float32


def test_shared_pbc_is_broadcast() -> None:
    systems = [cu_bulk(), pt_small()]
    pos, cell, pbc, natoms = as_batch(systems)
    a = radius_graph_pbc(pos, cell, torch.tensor([True, True, True]), natoms, 5.0, 0)
    b = radius_graph_pbc(pos, cell, pbc, natoms, 5.0, 0)
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.cell_offsets, b.cell_offsets)


def test_very_extended_molecule_matches_ase() -> None:
    """Atoms spread over thousands of Angstrom (bin grid capped per dimension)."""
    rng = np.random.default_rng(0)
    clusters = [rng.uniform(-1.5, 1.5, size=(6, 3)) + c for c in rng.uniform(0, 4000, (5, 3))]
    atoms = Atoms(f"H{30}", positions=np.concatenate(clusters), pbc=False)
    g = radius_graph_pbc(*as_batch([atoms]), 2.5, max_num_neighbors=0)
    np.testing.assert_array_equal(our_pairs(g), ase_pairs([atoms], 2.5))


def test_skewed_cell_matches_ase() -> None:
    """A cell whose vectors are far from orthogonal (searched in a lattice-reduced basis)."""
    transform = np.array([[1, 0, 0], [2, 1, 0], [1, -2, 1]])
    frac = np.random.default_rng(1).random((4, 3))
    atoms = Atoms("H4", cell=transform @ np.diag([3.0, 3.3, 2.9]), pbc=True)
    atoms.set_scaled_positions(frac)
    g = radius_graph_pbc(*as_batch([atoms]), 6.0, 0)
    np.testing.assert_array_equal(our_pairs(g), ase_pairs([atoms], 6.0))


@pytest.mark.parametrize("pbc", [(True, True, True), (True, True, False)])
def test_very_skewed_cell_equals_its_reduced_cell(pbc: tuple[bool, bool, bool]) -> None:
    """The same lattice written with a very skewed basis (orthogonality defect ~400) gives the
    same graph, offsets mapped by the change of basis: n_reduced = n_skewed @ T."""
    transform = (
        np.array([[1, 0, 0], [9, 1, 0], [4, -7, 1]])
        if all(pbc)
        else np.array([[1, 0, 0], [11, 1, 0], [0, 0, 1]])
    )
    base = np.diag([3.0, 3.3, 2.9])
    pos = np.random.default_rng(2).random((5, 3)) @ base
    graphs = []
    for cell in (base, transform @ base):
        atoms = Atoms("H5", positions=pos, cell=cell, pbc=pbc)
        graphs.append(our_pairs(radius_graph_pbc(*as_batch([atoms]), 6.5, 0)))
    mapped = graphs[1].copy()
    mapped[:, 2:] = graphs[1][:, 2:] @ transform
    assert {tuple(r) for r in mapped} == {tuple(r) for r in graphs[0]}
    assert len(mapped) == len(graphs[0]) > 0


def test_chunked_expansion_gives_same_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    systems = [cu_bulk(), cu_slab_co()]
    args = (*as_batch(systems), 6.0, 12)
    whole = radius_graph_pbc(*args)
    monkeypatch.setattr(graph_module, "_CHUNK_PAIRS", 500)
    chunked = radius_graph_pbc(*args)
    assert torch.equal(whole.edge_index, chunked.edge_index)
    assert torch.equal(whole.cell_offsets, chunked.cell_offsets)


# ----------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("max_neighbors", [1, 12, 40])
@pytest.mark.parametrize("strict", [True, False])
def test_truncation_matches_reference(max_neighbors: int, strict: bool) -> None:
    systems = [SYSTEMS[name]() for name in sorted(SYSTEMS)]
    pos, cell, pbc, natoms = as_batch(systems)
    g = radius_graph_pbc(pos, cell, pbc, natoms, 6.0, max_neighbors, strict)
    pairs = ase_pairs(systems, 6.0)
    d2, vec = reference_geometry(pos.numpy(), cell.numpy(), batch_index(natoms).numpy(), pairs)
    expected = reference_truncate(pairs, d2, max_neighbors, strict, vec)
    np.testing.assert_array_equal(our_pairs(g), expected)
    counts = np.bincount(batch_index(natoms).numpy()[expected[:, 0]], minlength=len(systems))
    assert g.neighbors.tolist() == counts.tolist()
    per_target = np.bincount(expected[:, 0], minlength=len(pos))
    if strict:
        assert per_target.max() <= max_neighbors


def test_non_strict_keeps_degenerate_shell() -> None:
    """Perfect fcc: 12 equidistant nearest neighbours. max 8: strict keeps 8, non-strict keeps
    the whole shell (within 0.01 Å^2) but not the next shell."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    args = as_batch([atoms])
    strict = radius_graph_pbc(*args, 6.0, 8, True)
    loose = radius_graph_pbc(*args, 6.0, 8, False)
    assert torch.bincount(strict.edge_index[1]).tolist() == [8] * len(atoms)
    assert torch.bincount(loose.edge_index[1]).tolist() == [12] * len(atoms)
    # Tolerance is applied to squared distances: a shell 0.004 Å^2 beyond the limit stays in.
    pos = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.002]], dtype=torch.float64)
    cell, pbc, natoms = torch.zeros(1, 3, 3, dtype=torch.float64), torch.zeros(3, dtype=bool), [4]
    loose = radius_graph_pbc(pos, cell, pbc, torch.tensor(natoms), 1.2, 2, False)
    assert (loose.edge_index[1] == 0).sum() == 3
    strict = radius_graph_pbc(pos, cell, pbc, torch.tensor(natoms), 1.2, 2, True)
    assert strict.edge_index[0][strict.edge_index[1] == 0].tolist() == [1, 2]


def test_no_truncation_when_max_is_nonpositive() -> None:
    args = as_batch([pt_small()])
    full = radius_graph_pbc(*args, 8.0, 0)
    assert torch.equal(full.edge_index, radius_graph_pbc(*args, 8.0, -1).edge_index)
    assert full.edge_index.shape[1] > 40 * 4


def test_output_order() -> None:
    systems = [cu_slab_co(), pt_small(), skewed_fcc()]
    g = radius_graph_pbc(*as_batch(systems), 7.0, 30)
    pairs = our_pairs(g)
    order = np.lexsort(pairs.T[::-1])
    np.testing.assert_array_equal(order, np.arange(len(pairs)))
    assert len(np.unique(pairs, axis=0)) == len(pairs)


# ----------------------------------------------------------------------------- ties


def perfect_systems() -> list[Atoms]:
    return [
        bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2)),
        bulk("Pt", "fcc", a=3.92, cubic=True),
        fcc111("Cu", size=(2, 2, 3), vacuum=6.0),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_follow_the_rule_and_are_deterministic(dtype: torch.dtype) -> None:
    """Max 20 cuts through the 24-atom third fcc shell: many exact ties."""
    systems = [f32_exact(a) for a in perfect_systems()]
    pos, cell, pbc, natoms = as_batch(systems, dtype)
    g = radius_graph_pbc(pos, cell, pbc, natoms, 6.0, 20)
    pairs = ase_pairs(systems, 6.0)
    d2, vec = reference_geometry(
        pos.double().numpy(), cell.double().numpy(), batch_index(natoms).numpy(), pairs
    )
    np.testing.assert_array_equal(our_pairs(g), reference_truncate(pairs, d2, 20, True, vec))
    again = radius_graph_pbc(pos, cell, pbc, natoms, 6.0, 20)
    assert torch.equal(g.edge_index, again.edge_index)
    assert torch.equal(g.cell_offsets, again.cell_offsets)


def test_ties_invariant_to_system_order() -> None:
    """Permuting the systems of a batch permutes the graph consistently."""
    systems = [f32_exact(a) for a in perfect_systems()]
    perm = [2, 0, 1]
    g = radius_graph_pbc(*as_batch(systems, torch.float32), 6.0, 20)
    h = radius_graph_pbc(*as_batch([systems[k] for k in perm], torch.float32), 6.0, 20)
    sizes = [len(a) for a in systems]
    first = np.cumsum([0, *sizes])[:-1]
    new_first = np.empty(len(systems), dtype=np.int64)
    new_first[perm] = np.cumsum([0, *[sizes[k] for k in perm]])[:-1]
    old_to_new = np.concatenate([np.arange(n) + new_first[b] for b, n in enumerate(sizes)])
    assert np.all(old_to_new[first] == new_first)
    mapped = our_pairs(g)
    mapped[:, :2] = old_to_new[mapped[:, :2]]
    assert {tuple(r) for r in mapped} == {tuple(r) for r in our_pairs(h)}
    assert h.neighbors.tolist() == [g.neighbors.tolist()[k] for k in perm]


def test_ties_atom_permutation_keeps_distance_shells() -> None:
    """Permuting atoms inside a system may pick other (equidistant) sources, but every target
    keeps the same multiset of distances, and the choice follows the rule on the new order."""
    atoms = f32_exact(bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2)))
    perm = np.random.default_rng(0).permutation(len(atoms))
    shuffled = atoms[perm]
    kept = []
    for system in (atoms, shuffled):
        pos, cell, pbc, natoms = as_batch([system], torch.float32)
        g = radius_graph_pbc(pos, cell, pbc, natoms, 6.0, 20)
        pairs = ase_pairs([system], 6.0)
        d2, vec = reference_geometry(
            pos.double().numpy(), cell.double().numpy(), np.zeros(len(pos), int), pairs
        )
        np.testing.assert_array_equal(our_pairs(g), reference_truncate(pairs, d2, 20, True, vec))
        vec = edge_vectors(
            pos.double(), cell.double(), batch_index(natoms), g.edge_index, g.cell_offsets
        )
        dist = vec.norm(dim=1).numpy()
        kept.append({int(t): np.sort(dist[g.edge_index[1].numpy() == t]) for t in range(len(pos))})
    for new, old in enumerate(perm):
        np.testing.assert_allclose(kept[1][new], kept[0][old], atol=1e-5)


# ----------------------------------------------------------------------------- golden graphs


def golden_files() -> list[str]:
    return [entry["file"] for entry in json.loads((GOLDEN / "index.json").read_text())]


@pytest.mark.parametrize("name", golden_files())
def test_golden_graph(name: str) -> None:
    data = torch.load(GOLDEN / name, weights_only=True)
    inputs, config, expected = data["inputs"], data["config"], data["graph"]
    g = radius_graph_pbc(
        inputs["pos"],
        inputs["cell"],
        inputs["pbc"],
        inputs["natoms"],
        config["cutoff"],
        config["max_num_neighbors"],
        True,
    )
    assert torch.equal(g.edge_index, expected["edge_index"])
    assert torch.equal(g.cell_offsets.to(torch.float32), expected["cell_offsets"])
    assert torch.equal(g.neighbors, expected["neighbors"])
    vec = edge_vectors(inputs["pos"], inputs["cell"], inputs["batch"], g.edge_index, g.cell_offsets)
    assert vec.dtype == torch.float32
    torch.testing.assert_close(vec, expected["edge_distance_vec"], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- empty cases


def test_single_isolated_atom() -> None:
    pos = torch.zeros(1, 3)
    g = radius_graph_pbc(
        pos, torch.zeros(1, 3, 3), torch.zeros(1, 3, dtype=torch.bool), torch.tensor([1]), 6.0, 40
    )
    assert g.edge_index.shape == (2, 0) and g.cell_offsets.shape == (0, 3)
    assert g.neighbors.tolist() == [0]
    assert edge_vectors(
        pos, torch.zeros(1, 3, 3), torch.zeros(1, dtype=torch.long), g.edge_index, g.cell_offsets
    ).shape == (0, 3)


def test_batch_with_edgeless_and_empty_systems() -> None:
    lone = Atoms("H", positions=[[5.0, 5.0, 5.0]], pbc=False)
    gas = Atoms("H2", positions=[[0, 0, 0], [9.0, 0, 0]], cell=np.eye(3) * 20, pbc=True)
    empty = Atoms(cell=np.eye(3) * 4, pbc=True)
    systems = [lone, cu_bulk(), empty, gas]
    pos, cell, pbc, natoms = as_batch(systems)
    g = radius_graph_pbc(pos, cell, pbc, natoms, 5.0, 40)
    assert g.neighbors[[0, 2, 3]].tolist() == [0, 0, 0]
    pairs = ase_pairs(systems, 5.0)
    d2, vec = reference_geometry(pos.numpy(), cell.numpy(), batch_index(natoms).numpy(), pairs)
    np.testing.assert_array_equal(our_pairs(g), reference_truncate(pairs, d2, 40, True, vec))


def test_all_systems_empty() -> None:
    g = radius_graph_pbc(
        torch.zeros(0, 3),
        torch.eye(3)[None].repeat(2, 1, 1),
        torch.ones(3, dtype=torch.bool),
        torch.tensor([0, 0]),
        5.0,
        40,
    )
    assert g.edge_index.shape == (2, 0) and g.neighbors.tolist() == [0, 0]


def test_large_cutoff_self_images() -> None:
    """A one-atom periodic cell: all edges are the atom's own images, none with offset 0."""
    atoms = bulk("Cu", "fcc", a=3.61)
    g = radius_graph_pbc(*as_batch([atoms]), 5.2, 0)
    np.testing.assert_array_equal(our_pairs(g), ase_pairs([atoms], 5.2))
    assert bool(g.cell_offsets.abs().sum(dim=1).gt(0).all())


# ----------------------------------------------------------------------------- bad input


def _good() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return as_batch([cu_bulk(), cu_slab_co()])


def test_validate_accepts_good_input() -> None:
    validate_structure(*_good())
    validate_structure(*as_batch([ethanol(), wire(), tilted_slab(), short_vector()]))


def test_nan_and_inf() -> None:
    pos, cell, pbc, natoms = _good()
    bad = pos.clone()
    bad[5, 1] = float("nan")
    with pytest.raises(ValueError, match=r"pos contains NaN or inf \(first at atom 5\)"):
        validate_structure(bad, cell, pbc, natoms)
    bad = cell.clone()
    bad[1, 2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"cell contains NaN or inf \(system 1\)"):
        radius_graph_pbc(pos, bad, pbc, natoms, 6.0, 40)


def test_natoms_bookkeeping() -> None:
    pos, cell, pbc, natoms = _good()
    with pytest.raises(ValueError, match="natoms sums to"):
        validate_structure(pos, cell, pbc, natoms + 1)
    with pytest.raises(ValueError, match="negative"):
        validate_structure(pos, cell, pbc, torch.tensor([-1, len(pos) + 1]))
    with pytest.raises(ValueError, match="cell holds 1 systems but natoms holds 2"):
        validate_structure(pos, cell[:1], pbc, natoms)
    with pytest.raises(ValueError, match="pbc holds 3 systems but natoms holds 2"):
        validate_structure(pos, cell, torch.ones(3, 3, dtype=torch.bool), natoms)
    with pytest.raises(ValueError, match=r"pos must be a tensor of shape \(N, 3\)"):
        validate_structure(pos[:, :2], cell, pbc, natoms)
    with pytest.raises(ValueError, match="cutoff must be a positive"):
        radius_graph_pbc(pos, cell, pbc, natoms, 0.0, 40)


def test_singular_cells() -> None:
    pos = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    natoms = torch.tensor([1])
    flat = torch.tensor([[[3.0, 0, 0], [0, 3.0, 0], [3.0, 3.0, 0]]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"system 0: singular cell .*\|det\(cell\)\|"):
        validate_structure(pos, flat, torch.tensor([True, True, True]), natoms)
    # The same cell is fine for a slab: only the two periodic vectors matter ...
    validate_structure(pos, flat, torch.tensor([True, True, False]), natoms)
    # ... but they must not be parallel.
    parallel = torch.tensor([[[3.0, 0, 0], [6.0, 0, 0], [0, 0, 0]]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"system 0: singular cell .*\|a0 x a1\|"):
        validate_structure(pos, parallel, torch.tensor([True, True, False]), natoms)
    nearly = flat.clone()
    nearly[0, 2, 2] = 1e-9
    with pytest.raises(ValueError, match="singular cell"):
        validate_structure(pos, nearly, torch.tensor([True, True, True]), natoms)
    zero = torch.tensor([[[3.0, 0, 0], [0, 0, 0], [0, 0, 4.0]]], dtype=torch.float64)
    with pytest.raises(ValueError, match="system 0: periodic lattice vector 1 has length 0"):
        validate_structure(pos, zero, torch.tensor([True, True, True]), natoms)
    validate_structure(pos, zero, torch.tensor([True, False, True]), natoms)
    two = torch.cat([torch.eye(3, dtype=torch.float64)[None] * 4, flat])
    with pytest.raises(ValueError, match="system 1: singular cell"):
        validate_structure(
            pos.repeat(2, 1), two, torch.tensor([True, True, True]), torch.tensor([1, 1])
        )


def test_coincident_atoms() -> None:
    pos, cell, pbc, natoms = _good()
    bad = pos.clone()
    bad[40] = bad[37] + 2e-5  # system 1 starts at global atom 32
    with pytest.raises(ValueError, match=r"system 1: atoms 5 and 8 \(global 37 and 40\)"):
        validate_structure(bad, cell, pbc, natoms)
    image = pos.clone()
    image[3] = image[0] + cell[0, 1] + 3e-5  # atom 3 on the periodic image of atom 0
    with pytest.raises(ValueError, match=r"system 0: atoms \d and \d .*periodic image"):
        radius_graph_pbc(image, cell, pbc, natoms, 6.0, 40)
    # Same position in two different systems is fine.
    two = torch.zeros(2, 3, dtype=torch.float64)
    validate_structure(
        two,
        torch.zeros(2, 3, 3, dtype=torch.float64),
        torch.zeros(3, dtype=torch.bool),
        torch.tensor([1, 1]),
    )


# ----------------------------------------------------------------------------- precomputed


def test_check_precomputed_graph_regroups_stably() -> None:
    g = radius_graph_pbc(*as_batch([cu_bulk(), pt_small()]), 6.0, 12)
    shuffle = torch.randperm(g.edge_index.shape[1], generator=torch.Generator().manual_seed(0))
    ei, off = g.edge_index[:, shuffle], g.cell_offsets[shuffle].float()
    out_ei, out_off, perm = check_precomputed_graph(ei, off, torch.tensor([32, 4]), 12)
    assert bool((out_ei[1][1:] >= out_ei[1][:-1]).all())
    assert torch.equal(out_ei, ei[:, perm]) and torch.equal(out_off, off[perm])
    assert out_off.dtype == torch.float32
    # Stable: within a target the shuffled relative order is kept (perm increasing per target).
    for t in range(36):
        p = perm[out_ei[1] == t]
        assert bool((p[1:] > p[:-1]).all())
    same_ei, _, ident = check_precomputed_graph(
        g.edge_index, g.cell_offsets, torch.tensor([32, 4]), 12
    )
    assert torch.equal(ident, torch.arange(g.edge_index.shape[1]))
    assert torch.equal(same_ei, g.edge_index)


def test_check_precomputed_graph_errors() -> None:
    natoms = torch.tensor([2, 2])
    ei = torch.tensor([[1, 0, 3], [0, 1, 2]])
    off = torch.zeros(3, 3, dtype=torch.long)
    check_precomputed_graph(ei, off, natoms, 1)
    with pytest.raises(ValueError, match=r"edge_index must have shape \(2, E\)"):
        check_precomputed_graph(ei[:1], off, natoms, 1)
    with pytest.raises(ValueError, match="cell_offsets must have shape"):
        check_precomputed_graph(ei, off[:2], natoms, 1)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        check_precomputed_graph(torch.tensor([[4, 0, 3], [0, 1, 2]]), off, natoms, 1)
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        check_precomputed_graph(torch.tensor([[-1, 0, 3], [0, 1, 2]]), off, natoms, 1)
    with pytest.raises(ValueError, match=r"edge 2 connects atom 1 \(system 0\) to atom 2"):
        check_precomputed_graph(torch.tensor([[1, 0, 1], [0, 1, 2]]), off, natoms, 1)
    with pytest.raises(ValueError, match=r"atom 0 \(system 0\) has 2 incoming edges"):
        check_precomputed_graph(torch.tensor([[1, 1, 3], [0, 0, 2]]), off, natoms, 1)
    check_precomputed_graph(torch.tensor([[1, 1, 3], [0, 0, 2]]), off, natoms, 0)
    with pytest.raises(ValueError, match="integer"):
        check_precomputed_graph(ei.float(), off, natoms, 1)


# ----------------------------------------------------------------------------- performance

_PERF_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    sys.path.insert(0, sys.argv[1])
    import numpy as np, torch
    from ase.build import bulk
    from scn_fast.graph import radius_graph_pbc
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((10, 10, 10))
    atoms.rattle(stdev=0.02, seed=0)
    pos = torch.tensor(atoms.positions)
    cell = torch.tensor(np.array(atoms.cell))[None]
    start = time.perf_counter()
    g = radius_graph_pbc(pos, cell, torch.ones(3, dtype=torch.bool), torch.tensor([len(atoms)]),
                         8.0, 40)
    seconds = time.perf_counter() - start
    counts = torch.bincount(g.edge_index[1], minlength=len(atoms))
    print(json.dumps({
        "natoms": len(atoms), "seconds": seconds, "edges": int(g.edge_index.shape[1]),
        "min_neighbors": int(counts.min()), "max_neighbors": int(counts.max()),
        "maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }))
    """
)


@pytest.mark.slow
def test_4000_atom_cell_time_and_memory() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PERF_SCRIPT, str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"\n4000-atom fcc Cu, cutoff 8, max 40: {result['seconds']:.2f} s, "
        f"peak RSS {result['maxrss_gb']:.2f} GB (whole process)"
    )
    assert result["natoms"] == 4000
    assert result["min_neighbors"] == result["max_neighbors"] == 40
    assert result["edges"] == 4000 * 40
    assert result["seconds"] < 30.0
    assert result["maxrss_gb"] < 3.0
