"""Bad input is rejected with a ValueError naming the problem: precomputed graphs whose edges
are geometrically wrong, and model configurations that cannot work."""

from __future__ import annotations

import pytest
import torch

from scn_fast import AtomsBatch, SphericalChannelNetwork, preset
from scn_fast.graph import radius_graph_pbc


def _slab_data(dtype: torch.dtype = torch.float64) -> AtomsBatch:
    from ase import Atoms

    atoms = Atoms(
        "Cu3",
        positions=[[0.1, 0.2, 5.0], [1.4, 1.2, 5.3], [2.2, 0.3, 7.1]],
        cell=[[3.0, 0.0, 0.0], [0.5, 3.2, 0.0], [0.0, 0.0, 12.0]],
        pbc=[True, True, False],
    )
    data = AtomsBatch.from_ase([atoms], dtype=dtype)
    g = radius_graph_pbc(data.pos, data.cell, data.pbc, data.natoms, 4.0, 40)
    data.edge_index, data.cell_offsets, data.neighbors = g.edge_index, g.cell_offsets, g.neighbors
    return data


def _model() -> SphericalChannelNetwork:
    cfg = {**preset("tiny"), "otf_graph": False, "cutoff": 4.0, "num_interactions": 1}
    torch.manual_seed(0)
    return SphericalChannelNetwork(**cfg, deterministic_frames=True).double()


def _edit(data: AtomsBatch, edge_index=None, offsets=None) -> AtomsBatch:
    data.edge_index = data.edge_index if edge_index is None else edge_index
    data.cell_offsets = data.cell_offsets if offsets is None else offsets
    data.neighbors = None
    return data


def test_precomputed_graph_unchanged_is_accepted():
    out = _model()(_slab_data())
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()


def _zero_length(d: AtomsBatch) -> AtomsBatch:
    ei = d.edge_index.clone()
    ei[0, 0] = ei[1, 0]  # source = target
    off = d.cell_offsets.clone()
    off[0] = 0  # and no image shift: a self-edge of length zero
    return _edit(d, ei, off)


def _beyond_cutoff(d: AtomsBatch) -> AtomsBatch:
    off = d.cell_offsets.clone()
    off[0, 0] += 3  # three cells further along a: > 8 Angstrom
    return _edit(d, offsets=off)


def _duplicate(d: AtomsBatch) -> AtomsBatch:
    ei = torch.cat([d.edge_index, d.edge_index[:, :1]], dim=1)
    off = torch.cat([d.cell_offsets, d.cell_offsets[:1]])
    return _edit(d, ei, off)


def _fractional(d: AtomsBatch) -> AtomsBatch:
    off = d.cell_offsets.double().clone()
    off[0, 1] += 0.5
    return _edit(d, offsets=off)


def _non_periodic(d: AtomsBatch) -> AtomsBatch:
    off = d.cell_offsets.clone()
    far = torch.nonzero(off[:, 2] == 0)[0, 0]
    off[far, 2] = 1  # along z, which is not periodic
    return _edit(d, offsets=off)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_zero_length, "zero-length"),
        (_beyond_cutoff, "beyond the cutoff"),
        (_duplicate, "duplicate"),
        (_fractional, "whole lattice translations"),
        (_non_periodic, "not periodic"),
    ],
    ids=["zero-length", "beyond-cutoff", "duplicate", "non-integer-offset", "non-periodic-axis"],
)
def test_bad_precomputed_edges_are_rejected(edit, message):
    """Each of these used to pass: a zero-length edge gave NaN energy, forces and gradients on
    both paths; the others were used silently."""
    with pytest.raises(ValueError, match=message):
        _model()(edit(_slab_data()))


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ({"hidden_channels": 3, "num_resolutions": 2}, "hidden_channels"),
        ({"hidden_channels": 0, "num_resolutions": 1}, "hidden_channels"),
        ({"sphere_channels": 0}, "sphere_channels"),
        ({"sphere_channels_reduce": 0}, "sphere_channels_reduce"),
        ({"num_basis_functions": 0}, "num_basis_functions"),
        ({"num_sphere_samples": 0}, "num_sphere_samples"),
        ({"cutoff": float("nan")}, "cutoff"),
        ({"cutoff": float("inf")}, "cutoff"),
        ({"distance_resolution": float("nan")}, "distance_resolution"),
        ({"basis_width_scalar": 0.0}, "basis_width_scalar"),
        ({"max_num_neighbors": 20.5}, "max_num_neighbors"),
        ({"max_num_neighbors": True}, "max_num_neighbors"),
        ({"num_interactions": 0}, "num_interactions"),
        ({"lmax": 4.0}, "lmax"),
    ],
)
def test_constructor_rejects_unworkable_config(override, name):
    """Each of these used to pass the constructor and fail later (an empty tensor, an
    OverflowError) or not at all (num_sphere_samples=0: NaN energies on the fused path)."""
    cfg = {**preset("tiny"), **override}
    with pytest.raises(ValueError, match=name):
        SphericalChannelNetwork(**cfg)


def test_constructor_accepts_the_presets_and_numpy_integers():
    import numpy as np

    SphericalChannelNetwork(**{**preset("tiny"), "max_num_neighbors": np.int64(12)})
    SphericalChannelNetwork(**{**preset("tiny"), "num_resolutions": 1, "hidden_channels": 1})
