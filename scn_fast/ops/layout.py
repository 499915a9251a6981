"""The compact Wigner layout of the fused edge path (``ops/SPEC.md``) and the tap symmetries.

For one resolution (degree L, order M), edge e's rotation keeps, for each degree l, the rows of
orders |m| <= min(l, M) of its Wigner-D block D_l(e): ``wig`` (E, K) stores those rows back to back,
so a (19 x 49) dense matrix with 145 non-zeros (L=6, M=1) becomes 145 numbers.

Taps: upstream rotates every edge frame by T angles about the frame's y axis. Their Wigner rows are
signed row permutations of tap 0's: W_t(e) = Q_t W_0(e) with Q_t = D(Y_t) restricted to the kept rows,
a constant (R, R) signed permutation, so one rotation per edge serves all taps.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from .. import so3


@dataclass(frozen=True)
class EdgeLayout:
    """Offsets of the compact layout for degree ``lmax`` and order ``mmax``.

    rows[l] = n_l kept rows of degree l; row_off[l] = first rotated row of degree l (R rows in all);
    entry_off[l] = first entry of degree l in a wig row (K entries in all).
    """

    lmax: int
    mmax: int
    rows: tuple[int, ...]
    row_off: tuple[int, ...]
    entry_off: tuple[int, ...]
    R: int
    K: int

    @property
    def sphere_basis(self) -> int:
        return (self.lmax + 1) ** 2


@cache
def edge_layout(lmax: int, mmax: int) -> EdgeLayout:
    """The compact layout of resolution (lmax, mmax)."""
    if mmax not in (0, 1) or not 0 <= lmax <= 10:
        raise ValueError(
            f"edge layout needs lmax in 0..10 and mmax in {{0, 1}}, got {lmax}, {mmax}"
        )
    rows, row_off, entry_off = [], [], []
    r = k = 0
    for l in range(lmax + 1):
        n = 2 * min(l, mmax) + 1
        rows.append(n)
        row_off.append(r)
        entry_off.append(k)
        r += n
        k += n * (2 * l + 1)
    return EdgeLayout(lmax, mmax, tuple(rows), tuple(row_off), tuple(entry_off), r, k)


_J: dict[tuple, torch.Tensor] = {}


def wigner_j(l: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``so3.wigner_j(l)`` (2l+1, 2l+1) in ``dtype`` on ``device``, moved there once and cached
    (not copied from host memory at every call)."""
    key = (l, dtype, torch.device(device))
    return so3.cached_constant(_J, key, lambda: so3.wigner_j(l).to(dtype=dtype, device=device))


def compact_wigner(frames: torch.Tensor, lmax: int, mmax: int) -> torch.Tensor:
    """wig (E, K): the kept rows of each degree's Wigner-D block of the frames (E, 3, 3), detached.

    Computed per degree from the Euler angles as D_l = X(alpha) J X(beta) J X(gamma), keeping only
    the kept rows of X(alpha) (two non-zeros each), so no dense (S, S) matrix is formed.
    """
    lay = edge_layout(lmax, mmax)
    frames = frames.detach()
    e = frames.shape[0]
    if e == 0:
        return frames.new_zeros((0, lay.K))
    alpha, beta, gamma = so3.rotation_to_angles(frames)
    parts = []
    for l in range(lmax + 1):
        mm = min(l, mmax)
        rows = slice(l - mm, l + mm + 1)
        j = wigner_j(l, frames.dtype, frames.device)
        left = so3.z_rotation(alpha, l)[:, rows, :] @ j
        block = left @ so3.z_rotation(beta, l) @ j @ so3.z_rotation(gamma, l)
        parts.append(block.reshape(e, -1))
    return torch.cat(parts, dim=1).contiguous()


def dense_from_compact(wig: torch.Tensor, lmax: int, mmax: int) -> torch.Tensor:
    """(E, R, S) dense rotation rows from the compact wig (E, K) (for reference ops and tests)."""
    lay = edge_layout(lmax, mmax)
    e = wig.shape[0]
    out = wig.new_zeros((e, lay.R, lay.sphere_basis))
    for l in range(lmax + 1):
        n, w = lay.rows[l], 2 * l + 1
        block = wig[:, lay.entry_off[l] : lay.entry_off[l] + n * w].view(e, n, w)
        out[:, lay.row_off[l] : lay.row_off[l] + n, l * l : l * l + w] = block
    return out


@dataclass(frozen=True)
class TapSymmetry:
    """How the T taps of one resolution relate (float64 constants, exact).

    q: (T, R, R) signed permutations with W_t = Q_t W_0. For 4 taps (mmax = 1): rows0 are the m = 0
    rows (identical in every tap), rows1 the m = +-1 rows; on rows1, tap 2 = -tap 0 and
    tap 3 = -tap 1, and tap 1 = sign1 * tap0[perm1] (perm1/sign1 index into rows1).
    mapping: (T*R, R) upstream's tap-combination matrix.
    """

    num_taps: int
    q: torch.Tensor
    rows0: torch.Tensor
    rows1: torch.Tensor
    perm1: torch.Tensor
    sign1: torch.Tensor
    mapping: torch.Tensor
    pair_signs: tuple[float, float] = (1.0, 1.0)


@so3._on_cpu
@cache
def tap_symmetry(lmax: int, mmax: int, num_taps: int) -> TapSymmetry:
    """The taps of resolution (lmax, mmax, num_taps) as signed permutations of tap 0 (verified)."""
    lay = edge_layout(lmax, mmax)
    taps = so3.tap_set(lmax, mmax, num_taps)
    rows = so3.kept_rows(lmax, mmax)
    qs = []
    for angle in taps.angles:
        blocks = so3.wigner_d_blocks(so3.y_rotation_matrix(angle).unsqueeze(0), lmax)
        dense = torch.block_diag(*[b[0] for b in blocks])
        q = dense[rows][:, rows]
        q = torch.where(q.abs() < 1e-12, torch.zeros_like(q), q.round())
        if not torch.equal(q.abs().sum(1), torch.ones(lay.R, dtype=q.dtype)):
            raise AssertionError("tap rotation is not a signed permutation")
        qs.append(q)
    q = torch.stack(qs)
    m_of_row = []
    for l in range(lmax + 1):
        mm = min(l, mmax)
        m_of_row.extend(range(-mm, mm + 1))
    m_of_row = torch.tensor(m_of_row)
    rows0 = torch.nonzero(m_of_row == 0).flatten()
    rows1 = torch.nonzero(m_of_row != 0).flatten()
    perm1 = torch.zeros(len(rows1), dtype=torch.long)
    sign1 = torch.ones(len(rows1), dtype=torch.float64)
    if len(taps.angles) == 4:
        q1 = q[1][rows1][:, rows1]  # tap 1 on the m = +-1 rows, in rows1 coordinates
        perm1 = q1.abs().argmax(dim=1)
        sign1 = q1[torch.arange(len(rows1)), perm1]
        assert torch.equal(q[0], torch.eye(lay.R, dtype=q.dtype))
        assert torch.equal(q[2][rows0][:, rows0], torch.eye(len(rows0), dtype=q.dtype))
        assert torch.equal(q[2][rows1][:, rows1], -torch.eye(len(rows1), dtype=q.dtype))
        assert torch.equal(q[3], q[1] @ q[2])
        # Tap 1 swaps the m = -1 and m = +1 rows of each degree with fixed signs.
        pairs = torch.arange(len(rows1)).view(-1, 2)
        assert torch.equal(perm1.view(-1, 2), pairs.flip(1))
        signs = sign1.view(-1, 2)
        assert torch.equal(signs, signs[:1].expand_as(signs))
        pair_signs = (float(signs[0, 0]), float(signs[0, 1]))
        return TapSymmetry(4, q, rows0, rows1, perm1, sign1, taps.mapping, pair_signs)
    return TapSymmetry(len(taps.angles), q, rows0, rows1, perm1, sign1, taps.mapping)
