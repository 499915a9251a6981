"""Work per tile of the Triton grid-MLP and output-head tile loops, and tile sizes from a budget.

The launchers run on meta tensors (nothing computes: ``kernels/aot.py`` records the Triton launches
and a torch dispatch mode records the ATen ops), once with one tile and once with three; the
difference is the work of two tiles. Per tile there are only the fused Triton GEMMs and the
weight-gradient GEMMs (``addmm_`` / ``addmv_``): no copy of a non-contiguous reshape, no bias
reduction (those run once per call), no elementwise pass.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from scn_fast.kernels import aot, grid_mlp, sphere_heads, tiling

# ATen ops that only make views (no kernel runs).
_VIEWS = {
    "view", "_unsafe_view", "permute", "transpose", "t", "slice", "select", "unsqueeze",
    "as_strided", "expand", "alias", "detach", "_reshape_alias", "reshape", "split",
}  # fmt: skip


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[1]
        if name not in _VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _run(fn) -> tuple[Counter, Counter]:
    """(ATen ops, Triton launches by label) of fn() on meta tensors."""
    mode = _Ops()
    with aot.trace() as launches, mode:
        fn()
    return mode.ops, Counter(rec.label.split("[")[0] for rec in launches)


def _per_tile(make, nt=4):
    """The ops of two extra tiles: run with 3 tiles minus run with 1 tile."""
    ops1, tri1 = _run(lambda: make(nt, nt))
    ops3, tri3 = _run(lambda: make(3 * nt, nt))
    return ops3 - ops1, tri3 - tri1, ops1


def _meta(*shape):
    return torch.empty(shape, device="meta")


def _grid_args(atoms, lmax=2, bands=2, c=8):
    s, g = (lmax + 1) ** 2, 2 * (lmax + 1) * (2 * lmax + 3)
    h1, h2 = 2 * bands * c, 2 * c
    return [_meta(atoms, s, c), _meta(atoms, s, c), _meta(g, bands * s), _meta(s, g),
            _meta(h1, h1), _meta(h1), _meta(h2, h1), _meta(h2), _meta(c, h2), _meta(c)]  # fmt: skip


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grid_backward_per_tile_work(precision):
    bands = 2

    def make(atoms, nt):
        args = _grid_args(atoms, bands=bands)
        grad = _meta(*args[0].shape)
        return grid_mlp.grid_mlp_backward(grad, *args, nt, precision=precision)

    ops, launches, once = _per_tile(make)
    # per tile: dw3, dw2, and dw1 per band and side
    assert ops == Counter({"addmm_": 2 * (2 + 2 * bands)}), ops
    # per tile: Q per band, H1, H2, U, dU, dA2, dA1, dQ, dx per band and side
    assert launches == Counter({"mm": 2 * (3 * bands + 7)}), launches
    assert once["sum"] <= 4  # fsum, sum_z grad_out, the two bias-gradient reductions


def test_grid_forward_per_tile_work():
    def make(atoms, nt):
        return grid_mlp.grid_mlp_forward(*_grid_args(atoms), nt, precision="tf32")

    ops, launches, _ = _per_tile(make)
    assert ops == Counter() and launches == Counter({"mm": 2 * (2 + 4)})


def _heads_args(atoms, lmax=2, c=8, p=16, heads=2):
    w = []
    for _ in range(heads):
        w += [_meta(c, c), _meta(c), _meta(c, c), _meta(c), _meta(1, c), _meta(1)]
    return (
        _meta(atoms, (lmax + 1) ** 2, c),
        _meta(p, (lmax + 1) ** 2),
        w,
        [_meta(p, 1), _meta(p, 3)],
    )


def test_heads_backward_per_tile_work():
    def make(atoms, nt):
        x, sh, w, v = _heads_args(atoms)
        return sphere_heads.sphere_heads_backward(
            [_meta(atoms, 1), _meta(atoms, 3)], x, sh, w, v, nt
        )

    ops, launches, _ = _per_tile(make)
    # per tile and head: dw3 (addmv_), dw2; per tile: dw1 of all heads
    assert ops == Counter({"addmv_": 2 * 2, "addmm_": 2 * 3}), ops
    # per tile: Q, H1, dQ, dx; per head: H2, R, V g^T, dA2, dA1
    assert launches == Counter({"mm": 2 * (4 + 5 * 2)}), launches


# ----------------------------------------------------------------------------------------------
# Tile sizes
# ----------------------------------------------------------------------------------------------


def test_grid_tile_atoms_from_budget():
    # scn-t4-b2: S = 49, G = 210, H1 = 512, H2 = 256; backward scratch per atom (Triton):
    # 2*49*512 + 2*210*512 + 2*210*256 + 2*49*256 numbers
    per_atom = 2 * 49 * 512 + 2 * 210 * 512 + 2 * 210 * 256 + 2 * 49 * 256
    assert tiling.grid_scratch_per_atom(6, 2, 128) == per_atom
    atoms = tiling.grid_tile_atoms(6, 2, 128)
    # the 2 GiB default: one tile holds a 1,000-atom training step (a fixed 16,384 rows held 78)
    assert atoms == (2 << 30) // (4 * per_atom) and 1000 <= atoms <= 2000
    assert tiling.grid_tile_atoms(6, 2, 128, training=False) > atoms
    assert tiling.grid_tile_atoms(6, 2, 128, backend="extension") < atoms
    assert tiling.grid_tile_atoms(6, 2, 128, itemsize=8) == atoms // 2
    assert tiling.grid_tile_atoms(6, 2, 128, budget_bytes=1 << 32) in (2 * atoms, 2 * atoms + 1)
    assert tiling.grid_tile_atoms(6, 2, 128, num_atoms=100) == 100
    assert tiling.grid_tile_atoms(6, 2, 128, budget_bytes=1) == 1


def test_heads_tile_atoms_from_budget():
    args = (6, 128, 128, [128, 128], [128, 128], [1, 3])
    atoms = tiling.heads_tile_atoms(*args)
    per_atom = 49 * 256 + 3 * 128 * 256 + 2 * 128 * 128 + 3 * 128
    assert tiling.heads_scratch_per_atom(*args) == per_atom
    assert atoms == (2 << 30) // (4 * per_atom)


def test_tile_budget_errors():
    with pytest.raises(ValueError, match="positive"):
        tiling.tile_atoms_for_budget(0, 10)
    with pytest.raises(ValueError, match="backend"):
        tiling.grid_scratch_per_atom(6, 2, 128, backend="reference")
