"""Constants of SO(3) and the sphere used by SCN, built once in float64.

Conventions are e3nn's (real spherical harmonics, the y axis is the polar axis, coefficient ``l^2 + l + m``
holds degree ``l`` and order ``m``), which is what upstream SCN uses. Everything here is built in float64
and cast to the working dtype by the caller, so a float64 model carries no float32 rounding.

Shapes use ``S_L = (L+1)^2`` coefficients, ``R`` kept rows (|m| <= mmax) and ``T`` taps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, wraps
from typing import Any

import torch
from e3nn import o3
from e3nn.o3 import FromS2Grid, ToS2Grid
from torch._subclasses.fake_tensor import unset_fake_temporarily

F64 = torch.float64


def _on_cpu(fn):
    """Build a cached constant on the CPU whatever the caller's default device, as a real tensor
    even when called under a fake tensor mode (an op's fake impl while torch.compile traces)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        # inference_mode(False): a cached constant outlives the call, and an inference tensor could
        # not take part in autograd later
        with torch.device("cpu"), unset_fake_temporarily(), torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper


def cached_constant(cache: dict, key: Any, build: Callable[[], Any]) -> Any:
    """``cache[key]``, built by ``build()`` on first use. Built outside ``torch.inference_mode()``: a
    cached constant outlives the call that made it, and an inference tensor could not take part in a
    later autograd call."""
    if key not in cache:
        with torch.inference_mode(False):
            cache[key] = build()
    return cache[key]


# The improper 3x3 map whose degree-l representation J_l appears in D = X(a) J X(b) J X(c).
_J_MATRIX = ((0.0, -1.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 0.0, 1.0))


@_on_cpu
@cache
def wigner_j(l: int) -> torch.Tensor:
    """J_l, the (2l+1, 2l+1) float64 matrix with Y_l(P r) = J_l Y_l(r) for P = [[0,-1,0],[-1,0,0],[0,0,1]].

    Solved by least squares from real spherical harmonics (polynomials, exact in float64) at fixed points,
    so the result is exact to ~1e-15. J_l is symmetric and an involution.
    """
    gen = torch.Generator().manual_seed(1234 + l)
    pts = torch.randn(8 * (2 * l + 1) + 16, 3, generator=gen, dtype=F64)
    p = torch.tensor(_J_MATRIX, dtype=F64)
    a = o3.spherical_harmonics(l, pts, normalize=True)
    b = o3.spherical_harmonics(l, pts @ p.T, normalize=True)
    j = torch.linalg.lstsq(a, b).solution.T
    return torch.where(j.abs() < 1e-14, torch.zeros_like(j), j).contiguous()


def z_rotation(angle: torch.Tensor, l: int) -> torch.Tensor:
    """X_l(angle): (..., 2l+1, 2l+1) rotation of degree-l coefficients about the polar axis.

    Row ``k`` (order ``m = l - k`` read from the end) mixes coefficients ``k`` and ``2l - k`` with
    ``cos(f * angle)`` on the diagonal and ``sin(f * angle)`` on the anti-diagonal, f = l, l-1, ..., -l.
    """
    n = 2 * l + 1
    out = angle.new_zeros((*angle.shape, n, n))
    idx = torch.arange(n, device=angle.device)
    freq = torch.arange(l, -l - 1, -1, dtype=angle.dtype, device=angle.device)
    phase = freq * angle[..., None]
    out[..., idx, idx.flip(0)] = torch.sin(phase)
    out[..., idx, idx] = torch.cos(phase)
    return out


def rotation_to_angles(rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Euler angles (alpha, beta, gamma), each (E,), of rotation matrices rot (E, 3, 3) in e3nn's YXY order."""
    y = rot @ rot.new_tensor([0.0, 1.0, 0.0])
    alpha, beta = o3.xyz_to_angles(y)
    r = o3.angles_to_matrix(alpha, beta, torch.zeros_like(alpha)).transpose(-1, -2) @ rot
    gamma = torch.atan2(r[..., 0, 2], r[..., 0, 0])
    return alpha, beta, gamma


def wigner_d_blocks(rot: torch.Tensor, lmax: int) -> list[torch.Tensor]:
    """Per-degree Wigner-D blocks of rotations rot (E, 3, 3): a list of (E, 2l+1, 2l+1), l = 0..lmax.

    D_l = X_l(alpha) J_l X_l(beta) J_l X_l(gamma) with the Euler angles of ``rot``.
    """
    alpha, beta, gamma = rotation_to_angles(rot)
    blocks = []
    for l in range(lmax + 1):
        j = wigner_j(l).to(dtype=rot.dtype, device=rot.device)
        blocks.append(z_rotation(alpha, l) @ j @ z_rotation(beta, l) @ j @ z_rotation(gamma, l))
    return blocks


def y_rotation_matrix(angle: float) -> torch.Tensor:
    """(3, 3) float64 rotation by ``angle`` about y (identity for angle 0, as upstream builds it)."""
    if angle == 0.0:
        return torch.eye(3, dtype=F64)
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]], dtype=F64)


def sphere_basis_reduce(lmax: int, mmax: int) -> int:
    """R: the number of coefficients with |m| <= mmax up to degree lmax."""
    return (lmax + 1) + sum(2 * (lmax + 1 - m) for m in range(1, mmax + 1))


def kept_rows(lmax: int, mmax: int) -> torch.Tensor:
    """(R,) indices into the S_L coefficients of the rows with |m| <= mmax, ordered by l then m."""
    rows = []
    for l in range(lmax + 1):
        mm = min(l, mmax)
        rows.extend(l * l + l + m for m in range(-mm, mm + 1))
    return torch.tensor(rows, dtype=torch.long)


@dataclass(frozen=True)
class TapSet:
    """The y-rotation taps of one resolution.

    angles: the T rotation angles about y. mapping: (T*R, R) float64, combines the per-tap messages.
    """

    angles: tuple[float, ...]
    mapping: torch.Tensor


@_on_cpu
def tap_set(lmax: int, mmax: int, num_taps: int) -> TapSet:
    """Taps of upstream SCN: one (angle 0) unless mmax == 1 and num_taps != 1, then four at k*pi/2.

    The mapping averages the taps after undoing each tap's rotation on the m = +-1 rows:
    m = 0 rows take 1/T of every tap; m = -1 and m = +1 rows are rotated back by the tap angle.
    """
    r = sphere_basis_reduce(lmax, mmax)
    if mmax not in (0, 1):
        raise ValueError(f"mmax must be 0 or 1 (SCN supports no other), got {mmax}")
    if mmax == 0 or num_taps == 1:
        return TapSet((0.0,), torch.eye(r, dtype=F64))
    angles = (0.0, 0.5 * math.pi, math.pi, 1.5 * math.pi)
    t = len(angles)
    mapping = torch.zeros(t * r, r, dtype=F64)
    # Kept rows per degree l >= 1 are (m=-1, m=0, m=+1) at 3(l-1)+1 .. 3(l-1)+3; l = 0 is row 0.
    for k, ang in enumerate(angles):
        base = k * r
        c, s = math.cos(ang) / t, math.sin(ang) / t
        mapping[base, 0] = 1.0 / t
        for l in range(1, lmax + 1):
            m_neg, m_zero, m_pos = 3 * (l - 1) + 1, 3 * (l - 1) + 2, 3 * (l - 1) + 3
            mapping[base + m_zero, m_zero] = 1.0 / t
            mapping[base + m_neg, m_neg] = c
            mapping[base + m_pos, m_neg] = s
            mapping[base + m_pos, m_pos] = c
            mapping[base + m_neg, m_pos] = -s
    return TapSet(angles, mapping)


@dataclass(frozen=True)
class GridMatrices:
    """Band-limited projections between coefficients and the 2(L+1) x (2L+3) grid, float64.

    to_grid_shb: (M, res_beta, S_L), M = sum_b (2(L-b)+1), band b using degrees <= L - b (zero-padded);
    to_grid_sha: (res_alpha * bands, M) block-diagonal over bands, rows interleaved (alpha-major,
    band-minor); from_grid_sha: (res_alpha, 2L+1); from_grid_shb: (2L+1, res_beta, S_L).
    """

    res_beta: int
    res_alpha: int
    to_grid_shb: torch.Tensor
    to_grid_sha: torch.Tensor
    from_grid_sha: torch.Tensor
    from_grid_shb: torch.Tensor


@contextmanager
def _default_float64() -> Iterator[None]:
    """Run e3nn constructors with float64 as the default dtype (with only ``dtype=float64`` passed,
    e3nn 0.6's FromS2Grid still builds its quadrature weights in float32: 1e-8 errors) and on the
    CPU whatever the caller's default device (``with torch.device("meta")`` model construction)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(old)


@_on_cpu
@cache
def grid_matrices(lmax: int, num_bands: int) -> GridMatrices:
    """The ToGrid / FromGrid matrices of upstream SCN (e3nn ``integral`` normalisation), in float64."""
    if not 1 <= num_bands <= lmax + 1:
        raise ValueError(f"num_bands must be in [1, lmax + 1] = [1, {lmax + 1}], got {num_bands}")
    res_beta, res_alpha = 2 * (lmax + 1), 2 * (lmax + 1) + 1
    s = (lmax + 1) ** 2
    shbs, shas = [], []
    with _default_float64():
        fg = FromS2Grid((res_beta, res_alpha), lmax, normalization="integral", dtype=F64)
        for b in range(num_bands):
            tg = ToS2Grid(lmax - b, (res_beta, res_alpha), normalization="integral", dtype=F64)
            shb = tg.shb
            shbs.append(torch.cat([shb, shb.new_zeros(*shb.shape[:2], s - shb.shape[2])], dim=2))
            shas.append(tg.sha)
    to_shb = torch.cat(shbs, dim=0)
    to_sha = torch.block_diag(*shas).view(num_bands, res_alpha, -1).transpose(0, 1)
    to_sha = to_sha.reshape(res_alpha * num_bands, -1)
    return GridMatrices(
        res_beta,
        res_alpha,
        to_shb.contiguous(),
        to_sha.contiguous(),
        fg.sha.clone(),
        fg.shb.clone(),
    )


@_on_cpu
@cache
def sphere_points(num_points: int) -> torch.Tensor:
    """(P, 3) float64 golden-spiral points on the unit sphere scaled by a density weight (mean 1).

    Point i: azimuth 2*pi*i/phi, polar angle acos(1 - 2(i + 1/2)/P); each point is scaled by
    P * w_i / sum(w), w_i = 1 / sum_k exp(-|p_i - p_k|^2 / 0.15), so crowded points count less.
    """
    phi_golden = (1 + 5**0.5) / 2
    i = torch.arange(num_points, dtype=F64).view(-1, 1)
    theta = 2 * math.pi * i / phi_golden
    polar = torch.arccos(1 - 2 * (i + 0.5) / num_points)
    pts = torch.cat(
        [
            torch.cos(theta) * torch.sin(polar),
            torch.sin(theta) * torch.sin(polar),
            torch.cos(polar),
        ],
        dim=1,
    )
    d2 = ((pts.view(1, -1, 3) - pts.view(-1, 1, 3)) ** 2).sum(dim=2)
    w = 1.0 / torch.exp(-d2 / (0.5 * 0.3)).sum(dim=1)
    w = num_points * w / w.sum()
    return pts * w.view(-1, 1)


@_on_cpu
@cache
def sphere_harmonics_at_points(num_points: int, lmax: int) -> torch.Tensor:
    """(P, S) float64 unnormalised real spherical harmonics (degrees 0..lmax) at ``sphere_points``."""
    return o3.spherical_harmonics(list(range(lmax + 1)), sphere_points(num_points), normalize=False)
