"""Reliability regressions: training configurations that used to crash (a one-tap resolution
without edges) and input conditioning (absolute coordinates far from the origin)."""

from __future__ import annotations

import pytest
import torch

from scn_fast import AtomsBatch, SphericalChannelNetwork, preset
from scn_fast.tap_order import to_upstream_layout

from .conftest import TOL


def _grads(model: SphericalChannelNetwork, data) -> tuple:
    model.zero_grad(set_to_none=True)
    out = model(data)
    (out["energy"].pow(2).sum() + out["forces"].pow(2).sum()).backward()
    grads = {
        n: to_upstream_layout(model, n, p.grad.detach())
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return out["energy"].detach(), out["forces"].detach(), grads


@pytest.mark.parametrize("backend", ["extension", "triton"])
@pytest.mark.parametrize("knobs", [{"num_taps": 1}, {"mmax": 0}], ids=["num_taps=1", "mmax=0"])
def test_one_tap_resolution_without_edges_trains(knobs, backend):
    """CH4 in vacuum: 4 neighbours per atom, so the far resolution (ranks >= 12) has no edges.
    With one tap (num_taps=1, or mmax=0) the fused backward used to index row 0 of an empty
    tensor; it must now give the reference's energy, forces and every parameter gradient."""
    from ase.build import molecule

    atoms = molecule("CH4")
    atoms.center(vacuum=4.0)
    atoms.pbc = False
    data = AtomsBatch.from_ase([atoms], dtype=torch.float64)
    cfg = {**preset("tiny"), **knobs, "deterministic_frames": True}
    torch.manual_seed(0)
    ref = SphericalChannelNetwork(**cfg).double()
    fused = SphericalChannelNetwork(**cfg, use_fused=True, backend=backend)
    fused.load_state_dict(ref.state_dict())
    fused.double()
    e0, f0, g0 = _grads(ref, data)
    e1, f1, g1 = _grads(fused, data)
    assert fused.explain()["edge_rotation"]["ran"] == backend
    tol = TOL["fused_fp64"]
    assert (e1 - e0).abs().max() <= tol["energy"] * max(1.0, float(e0.abs().max()))
    assert (f1 - f0).abs().max() <= tol["force"] * float(f0.abs().max())
    assert set(g1) == set(g0)
    for key in g0:
        scale = max(float(g0[key].abs().max()), 1e-30)
        assert float((g1[key] - g0[key]).abs().max()) <= tol["force"] * scale, key
