"""Row tables of the tap projection: which of the 2R rows [side 0 | side 1] of the rotated features
y (E, 2, R, C) each GEMM operand gathers (``tap_projection``), for one resolution.

With 4 taps (mmax = 1) the m = 0 rows are equal in every tap and the m = +-1 rows of tap 1 are those
of tap 0 swapped per degree, with fixed signs (docs/algebra.md). :class:`TapRows` holds, per
resolution, the m = 0 rows of both sides, the m = +-1 rows and their tap-1 arrangement, the
weight's [W0 | W1] column order and its inverse, the runs of consecutive rows the row-blocked GEMMs
use, and the tables of the split's adjoint (``tap_assemble``). Built once in float64 / int64 on the
CPU and cached per device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from .. import so3
from .layout import tap_symmetry


def _runs(rows: list[int]) -> tuple[tuple[int, int, int], ...]:
    """Maximal runs of consecutive values in ``rows``: (position in rows, first value, length)."""
    runs: list[list[int]] = []
    for pos, k in enumerate(rows):
        if runs and runs[-1][1] + runs[-1][2] == k:
            runs[-1][2] += 1
        else:
            runs.append([pos, k, 1])
    return tuple(tuple(run) for run in runs)


@dataclass(frozen=True)
class TapRows:
    """Row gathers of one resolution (indices into the 2R rows [side 0 rows | side 1 rows]).

    y0_rows (2 R0,): the m = 0 rows of both sides. pair_rows (4 R1,): the m = +-1 rows of both sides
    (R1 per side, (m=-1, m=+1) per degree), then the same rows in tap 1's arrangement (each pair
    swapped; ``neg_slots``: the positions, 0 or 1, within a pair whose value tap 1 negates).
    w_rows (2R,): y0_rows then the first half of pair_rows (the weight's [W0 | W1] order); w_inv its
    inverse permutation. runs0 / runs1: the row-blocked GEMMs' K blocks, maximal runs of consecutive
    rows among y0_rows / the m = +-1 rows, as (position, first row, length): at L = 6 the m = +-1
    rows of one side are 1, 3-4, 6-7, 9-10, 12-13, 15-16, 18 (7 blocks of 1 or 2 rows, not 12).
    pair_signs (2 n1,) float64: the sign of each pair row (tap 1's signs on the second half).
    assemble_a / assemble_b / assemble_sign (2R,): the adjoint of the split for each row r of y
    (the extension's ``tap_assemble``): dy[r] = dy0[a[r]] for an m = 0 row (b[r] = -1), else
    dpair[a[r]] + sign[r] * dpair[b[r]].
    """

    y0_rows: torch.Tensor
    pair_rows: torch.Tensor
    neg_slots: tuple[int, ...]
    w_rows: torch.Tensor
    w_inv: torch.Tensor
    runs0: tuple[tuple[int, int, int], ...]
    runs1: tuple[tuple[int, int, int], ...]
    pair_signs: torch.Tensor
    assemble_a: torch.Tensor
    assemble_b: torch.Tensor
    assemble_sign: torch.Tensor

    @property
    def n0(self) -> int:
        return self.y0_rows.numel()

    @property
    def n1(self) -> int:
        return self.pair_rows.numel() // 2

    @property
    def flat0(self) -> list[int]:
        """runs0 as a flat [j, k, n, ...] list (the extension's argument)."""
        return [v for run in self.runs0 for v in run]

    @property
    def flat1(self) -> list[int]:
        return [v for run in self.runs1 for v in run]


@so3._on_cpu
@cache
def _tap_rows_cpu(lmax: int, mmax: int, num_taps: int) -> TapRows:
    sym = tap_symmetry(lmax, mmax, num_taps)
    r = sym.q.shape[1]
    y0_rows = torch.cat([sym.rows0 + side * r for side in (0, 1)])
    m1 = torch.cat([sym.rows1 + side * r for side in (0, 1)])
    swapped = m1.view(-1, 2).flip(1).reshape(-1)
    pair_rows = torch.cat([m1, swapped])
    w_rows = torch.cat([y0_rows, m1])
    w_inv = torch.empty_like(w_rows)
    w_inv[w_rows] = torch.arange(len(w_rows))
    neg = tuple(k for k, s in enumerate(sym.pair_signs) if s < 0)
    runs0, runs1 = _runs(y0_rows.tolist()), _runs(m1.tolist())
    n1 = len(m1)
    pair_signs = torch.ones(2 * n1, dtype=torch.float64)
    for j in range(n1):
        if j % 2 in neg:
            pair_signs[n1 + j] = -1.0
    a = torch.full((2 * r,), -1, dtype=torch.long)
    b = torch.full((2 * r,), -1, dtype=torch.long)
    sign = torch.zeros(2 * r, dtype=torch.float64)
    for j, row in enumerate(y0_rows.tolist()):
        a[row] = j
    for i, row in enumerate(m1.tolist()):  # y1's part, then y1''s (pair partner i ^ 1, its sign)
        a[row], b[row], sign[row] = i, n1 + (i ^ 1), pair_signs[n1 + (i ^ 1)]
    assert bool((a >= 0).all()), "every row is an m = 0 or an m = +-1 row"
    return TapRows(y0_rows, pair_rows, neg, w_rows, w_inv, runs0, runs1, pair_signs, a, b, sign)


_DEVICE_ROWS: dict[tuple, TapRows] = {}


def tap_rows(lmax: int, mmax: int, num_taps: int, device: torch.device) -> TapRows:
    """The row gathers of resolution (lmax, mmax, num_taps) with index tensors on ``device``."""
    key = (lmax, mmax, num_taps, device)

    def build() -> TapRows:
        rows = _tap_rows_cpu(lmax, mmax, num_taps)
        return TapRows(
            rows.y0_rows.to(device),
            rows.pair_rows.to(device),
            rows.neg_slots,
            rows.w_rows.to(device),
            rows.w_inv.to(device),
            rows.runs0,
            rows.runs1,
            rows.pair_signs.to(device),
            rows.assemble_a.to(device),
            rows.assemble_b.to(device),
            rows.assemble_sign.to(device),
        )

    return so3.cached_constant(_DEVICE_ROWS, key, build)


def has_tap_order(lmax: int, mmax: int, num_taps: int) -> bool:
    """Whether the resolution's fc1_edge_proj weight has a tap order: 4 taps, which upstream uses
    when mmax = 1 and num_taps != 1 (``so3.tap_set``; plain arithmetic, so torch.compile traces it)."""
    return mmax == 1 and num_taps != 1
