"""S2EF metrics: hand-computed values, free atoms only, EFwT thresholds, batch-split invariance."""

from __future__ import annotations

import math

import pytest
import torch

from scn_fast.metrics import MetricSums


def _case():
    # two structures: 2 atoms (atom 1 fixed) and 1 atom
    energy = torch.tensor([1.01, 5.0])
    energy_ref = torch.tensor([1.0, 4.0])
    forces = torch.tensor([[1.0, 0.0, 0.0], [9.0, 9.0, 9.0], [0.0, 2.0, 0.0]])
    forces_ref = torch.tensor([[1.02, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    free = torch.tensor([True, False, True])
    return energy, energy_ref, forces, forces_ref, torch.tensor([2, 1]), free


def test_hand_computed():
    sums = MetricSums()
    sums.add(*_case())
    m = sums.result()
    assert m["energy_mae"] == pytest.approx((0.01 + 1.0) / 2)
    assert m["energy_per_atom_mae"] == pytest.approx((0.01 / 2 + 1.0 / 1) / 2)
    # free atoms 0 and 2 only: component errors 0.02, 0, 0, 0, 1, 0 (the fixed atom's 9s excluded)
    assert m["forces_mae"] == pytest.approx(1.02 / 6)
    assert m["forces_l2mae"] == pytest.approx((0.02 + 1.0) / 2)
    assert m["forces_cosine"] == pytest.approx(1.0)
    # structure 0: |dE| 0.01 < 0.02 and max |dF| 0.02 < 0.03 -> within; structure 1 is not
    assert m["efwt"] == pytest.approx(0.5)
    assert (m["num_structures"], m["num_atoms"], m["num_free_atoms"]) == (2, 3, 2)


def test_efwt_force_threshold_and_cosine_sign():
    sums = MetricSums()
    sums.add(
        torch.tensor([0.0]),
        torch.tensor([0.0]),
        torch.tensor([[0.0, 0.0, -1.0]]),
        torch.tensor([[0.0, 0.0, -1.04]]),
        torch.tensor([1]),
        torch.tensor([True]),
    )
    m = sums.result()
    assert m["efwt"] == 0.0  # a force component off by 0.04 > 0.03
    assert m["forces_cosine"] == pytest.approx(1.0)
    flipped = MetricSums()
    flipped.add(
        torch.tensor([0.0]),
        torch.tensor([0.0]),
        torch.tensor([[1.0, 0.0, 0.0]]),
        torch.tensor([[-2.0, 0.0, 0.0]]),
        torch.tensor([1]),
        torch.tensor([True]),
    )
    assert flipped.result()["forces_cosine"] == pytest.approx(-1.0)


def test_batches_combine_exactly():
    e, er, f, fr, n, free = _case()
    whole = MetricSums()
    whole.add(e, er, f, fr, n, free)
    parts = MetricSums()
    parts.add(e[:1], er[:1], f[:2], fr[:2], n[:1], free[:2])
    other = MetricSums()
    other.add(e[1:], er[1:], f[2:], fr[2:], n[1:], free[2:])
    parts.merge(other)
    a, b = whole.result(), parts.result()
    assert all(math.isclose(a[k], b[k], rel_tol=1e-12) for k in a)


def test_errors():
    with pytest.raises(ValueError, match="no structures"):
        MetricSums().result()
    e, er, f, fr, n, free = _case()
    with pytest.raises(ValueError, match="free mask"):
        MetricSums().add(e, er, f, fr, n, free[:2])
