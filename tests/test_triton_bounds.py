"""Out-of-range indices in the Triton edge kernels (kernels/edge_rotation.py), in the interpreter.

Like their CUDA twin (csrc/cuda/edge_ops_kernels.cu) the launchers do not read index values on the
host (that would synchronise with the device); the kernels never read out of bounds instead:

* gather_rotate: a row whose node index lies outside [0, N) is NaN (every rotated row, every
  channel), the other rows are unchanged;
* rotate_scatter: a ``perm`` value outside [0, E) is skipped (its message is not summed), and a
  ``ptr`` segment is clamped to [0, E).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from scn_fast.kernels import aot
from scn_fast.kernels import edge_rotation as er

pytestmark = pytest.mark.skipif(
    not er.is_interpreted(), reason="CPU tensors need Triton's interpreter"
)


def _problem(lmax=2, mmax=1, channels=5, nodes=6, edges=9, sides=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, entries = er.compact_sizes(lmax, mmax)
    x = torch.randn(nodes, (lmax + 1) ** 2, channels, generator=g)
    wig = torch.randn(edges, entries, generator=g)
    idx = torch.randint(0, nodes, (edges, sides), generator=g)
    m = torch.randn(edges, sides, rows, channels, generator=g)
    return x, wig, idx, m


@pytest.mark.parametrize("mmax", [0, 1])
def test_gather_rotate_nan_rows_for_out_of_range_indices(mmax):
    x, wig, idx, _ = _problem(mmax=mmax)
    bad = idx.clone()
    bad[1, 0], bad[4, 1], bad[7, 0] = -1, x.shape[0], 10**12
    y = er.gather_rotate(x, wig, bad, 2, mmax)
    ok = er.gather_rotate(x, wig, idx, 2, mmax)
    invalid = (bad < 0) | (bad >= x.shape[0])
    assert torch.isnan(y[invalid]).all()
    assert torch.equal(y[~invalid], ok[~invalid])


def _csr(idx: torch.Tensor, nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per side, the edges sorted by node (perm) and the CSR offsets (ptr)."""
    perm = torch.stack([torch.sort(idx[:, p], stable=True).indices for p in range(idx.shape[1])])
    counts = torch.stack([torch.bincount(idx[:, p], minlength=nodes) for p in range(idx.shape[1])])
    ptr = torch.cat([torch.zeros(idx.shape[1], 1, dtype=torch.int64), counts.cumsum(1)], 1)
    return perm.contiguous(), ptr.contiguous()


@pytest.mark.parametrize("mmax", [0, 1])
def test_rotate_scatter_skips_out_of_range_perm_values(mmax):
    x, wig, idx, m = _problem(mmax=mmax, seed=1)
    nodes = x.shape[0]
    perm, ptr = _csr(idx, nodes)
    bad = perm.clone()
    dropped = [(0, 2), (1, 5), (1, 8)]  # (side, position in perm)
    for p, k in dropped:
        bad[p, k] = [-1, m.shape[0], 2**40][dropped.index((p, k))]
    out = er.rotate_scatter(m, wig, bad, ptr, 2, mmax, nodes)
    m_kept = m.clone()
    for p, k in dropped:
        m_kept[perm[p, k], p] = 0.0
    expected = er.rotate_scatter(m_kept, wig, perm, ptr, 2, mmax, nodes)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_rotate_scatter_clamps_segments():
    x, wig, idx, m = _problem(seed=2)
    nodes = x.shape[0]
    perm, ptr = _csr(idx, nodes)
    ok = er.rotate_scatter(m, wig, perm, ptr, 2, 1, nodes)
    bad = ptr.clone()
    bad[:, 0] = -7  # the first node's segment starts before perm
    bad[:, -1] = m.shape[0] + 100  # the last one ends after it
    out = er.rotate_scatter(m, wig, perm, bad, 2, 1, nodes)
    torch.testing.assert_close(out, ok, rtol=0, atol=0)


def test_meta_launch_needs_a_trace():
    """Meta tensors describe a launch (kernels/aot.py); outside a trace that is an error."""
    x, wig, idx, _ = (t.to("meta") for t in _problem())
    with pytest.raises(ValueError, match="only inside"):
        er.gather_rotate(x, wig, idx, 2, 1)
    with aot.trace() as launches:
        er.gather_rotate(x, wig, idx, 2, 1)
    assert [rec.label for rec in launches] == ["gather_rotate"]
    assert launches[0].args["num_nodes"] == x.shape[0]
