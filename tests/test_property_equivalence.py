"""Property-based equivalence of the fused paths with the reference (hypothesis, seeded).

Random configurations over every knob (lmax 1-10, mmax 0/1, num_taps, num_bands, one or two
resolutions, grid on/off, the four distance bases, odd channel counts) and random systems (a
periodic slab, a bulk crystal, a molecule whose far resolution is empty, a lone atom, and a
mixed batch of those) are run in float64 on the reference path and on a fused backend (the C++
extension; Triton in its interpreter on the smallest cases). Energies, forces and every
parameter gradient must agree within the float64 rows of the tolerance table.

The examples are derandomized (the same on every run). ``SCN_FAST_PROPERTY_EXAMPLES`` sets the
number of extension examples (default 12; Triton gets a third of it, at least 2), e.g.
``SCN_FAST_PROPERTY_EXAMPLES=200 pytest tests/test_property_equivalence.py``.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from scn_fast import AtomsBatch, SphericalChannelNetwork
from scn_fast.smearing import DISTANCE_FUNCTIONS

from .conftest import TOL, elementwise_backend, energy_forces_grads

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

EXAMPLES = int(os.environ.get("SCN_FAST_PROPERTY_EXAMPLES", "12"))
SETTINGS = {
    "derandomize": True,
    "deadline": None,
    "database": None,
    "print_blob": True,
    "suppress_health_check": list(hypothesis.HealthCheck),
}
SYSTEMS = ("slab", "bulk", "molecule", "atom", "mixed")


@functools.cache
def _atoms(name: str) -> tuple:
    """ase.Atoms of one system kind (rattled: no exact ties needed here), as a tuple."""
    from ase import Atoms
    from ase.build import add_adsorbate, bulk, fcc111, molecule

    if name == "slab":
        slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
        add_adsorbate(slab, "O", 1.3, "fcc")
        slab.rattle(0.05, seed=1)
        return (slab,)
    if name == "bulk":
        crystal = bulk("Pt", "fcc", a=3.92, cubic=True)
        crystal.rattle(0.05, seed=2)
        return (crystal,)
    if name == "molecule":  # 2 neighbours per atom at most: the far resolution is empty
        water = molecule("H2O")
        water.center(vacuum=4.0)
        water.pbc = False
        return (water,)
    if name == "atom":  # no edges at all
        return (Atoms("Cu", positions=[[1.0, 2.0, 3.0]], pbc=False),)
    return _atoms("slab") + _atoms("molecule") + _atoms("atom")


@st.composite
def configurations(draw, small: bool = False) -> dict:
    """SCN constructor kwargs: every knob, tiny channel counts (odd ones included)."""
    resolutions = 1 if small else draw(st.sampled_from([1, 2]))
    lmax = draw(st.integers(4 if resolutions == 2 else 1, 3 if small else 10))
    return {
        "use_pbc": True,
        "otf_graph": True,
        "regress_forces": True,
        "num_interactions": 1 if small else draw(st.integers(1, 2)),
        "lmax": lmax,
        "mmax": draw(st.sampled_from([0, 1])),
        "num_taps": draw(st.sampled_from([-1, 1])),
        "num_bands": draw(st.integers(1, min(lmax + 1, 3))),
        "num_resolutions": resolutions,
        "use_grid": draw(st.booleans()),
        "distance_function": draw(st.sampled_from(sorted(DISTANCE_FUNCTIONS))),
        "sphere_channels": draw(st.integers(1, 7)),
        "sphere_channels_reduce": draw(st.integers(1, 5)),
        "hidden_channels": draw(st.integers(4, 9)),
        "num_sphere_samples": draw(st.integers(2, 9)),
        "num_basis_functions": draw(st.integers(1, 7)),
        "cutoff": draw(st.sampled_from([4.0, 5.5])),
        "distance_resolution": 0.25,
        "basis_width_scalar": draw(st.sampled_from([1.0, 2.0])),
        "max_num_neighbors": draw(st.integers(6, 30)),
        "max_num_elements": 90,
    }


def check_equivalence(config: dict, system: str, seed: int, backend: str) -> None:
    """Reference and fused model with the same weights, float64: outputs and every parameter
    gradient within the fused_fp64 row (relative to the largest reference value)."""
    data = AtomsBatch.from_ase(list(_atoms(system)), dtype=torch.float64)
    torch.manual_seed(seed)
    ref = SphericalChannelNetwork(**config, deterministic_frames=True).double()
    fused = SphericalChannelNetwork(
        **config, deterministic_frames=True, use_fused=True, backend=backend
    )
    fused.load_state_dict(ref.state_dict())
    fused.double()
    e0, f0, g0 = energy_forces_grads(ref, data)
    e1, f1, g1 = energy_forces_grads(fused, data)
    report = fused.explain()
    if "edge_rotation" in report:  # absent when no structure has an edge
        assert report["edge_rotation"]["ran"] == backend, report
    tol = TOL["fused_fp64"]
    assert float((e1 - e0).abs().max()) <= tol["energy"] * max(1.0, float(e0.abs().max()))
    assert float((f1 - f0).abs().max()) <= tol["force"] * max(float(f0.abs().max()), 1e-30)
    assert set(g1) == set(g0)
    for key in g0:
        scale = max(float(g0[key].abs().max()), 1e-30)
        err = float((g1[key] - g0[key]).abs().max())
        assert err <= tol["force"] * scale, f"{key}: {err:.3e} of {scale:.3e}"


@hypothesis.settings(max_examples=EXAMPLES, **SETTINGS)
@hypothesis.given(
    config=configurations(),
    system=st.sampled_from(SYSTEMS),
    seed=st.integers(0, 2**16),
)
def test_extension_equals_reference(config, system, seed):
    check_equivalence(config, system, seed, "extension")


@hypothesis.settings(max_examples=max(2, EXAMPLES // 3), **SETTINGS)
@hypothesis.given(
    config=configurations(small=True),
    system=st.sampled_from(["molecule", "atom"]),
    seed=st.integers(0, 2**16),
)
def test_triton_interpreter_equals_reference(config, system, seed):
    check_equivalence(config, system, seed, elementwise_backend("triton"))
