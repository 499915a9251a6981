"""``scn_fast::silu_mm`` (fc2_edge(SiLU(h)) keeping only h): the same values and gradients as ATen's
silu + linear, gradcheck in float64, and one saved tensor instead of two."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from scn_fast.ops.silu_linear import silu_mm


def test_matches_silu_then_linear_and_passes_gradcheck():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 7, generator=g, dtype=torch.float64)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        silu_mm, [h.clone().requires_grad_(), w.clone().requires_grad_()]
    )
    dz = torch.randn(9, 5, generator=g, dtype=torch.float64)
    results = []
    for fn in (silu_mm, lambda a, b: F.linear(F.silu(a), b)):
        a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(a, b)
        out.backward(dz)
        results.append((out.detach(), a.grad, b.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_keeps_only_its_input_for_the_backward():
    h = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        silu_mm(h * 1.0, w)
    assert sum(tuple(t.shape) == (64, 32) for t in saved) == 1  # h, not silu(h) too
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.linear(F.silu(h * 1.0), w)
    assert sum(tuple(t.shape) == (64, 32) for t in saved) == 2  # ATen keeps both


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="h \\(M, K\\) and weight \\(N, K\\)"):
        silu_mm(torch.zeros(3, 4), torch.zeros(5, 6))
