"""Triton backend of the message MLP's fused elementwise steps (the C++ twin is ``csrc/message_ops.cpp``;
the math is documented there and in ``scn_fast/ops/tap_projection.py`` / ``scn_fast/ops/tap_combine.py``).

* ``tap_gate_forward(a (E, H), b (E, Tb, H), gate (E, H)) -> m (E, T, H)``: Tb = 2 (T = 4):
  ``m[:, t] = silu([a + b0, a + b1, a - b0, a - b1][t]) * gate``; Tb = 0 (T = 1): ``silu(a) * gate``.
* ``tap_gate_backward(dm, a, b, gate) -> (da, db, dgate)``.
* ``tap_combine_forward(z (E, Q, C), bias (R, C), src (R, J), coef (R, J)) -> m (E, R, C)``:
  ``m[e, r] = sum_j coef[r, j] silu(z[e, src[r, j]] + bias[src[r, j] % R])``.
* ``tap_combine_backward(dm, z, bias, src, coef) -> (dz, dbias)``.
* ``tap_split(y3 (E, 2R, C), y0_rows (n0,), pair_rows (2 n1,), pair_signs (2 n1,)) -> (y0 (E, n0, C),
  pair (E, 2 n1, C))``: the 4-tap projection's two GEMM operands in one pass,
  ``y0[e, k] = y3[e, y0_rows[k]]``, ``pair[e, k] = pair_signs[k] * y3[e, pair_rows[k]]``
  (``scn_fast/ops/tap_rows.py``; the extension's ``tap_split``).
* ``tap_assemble(dy0, dpair, a, b, sign) -> dy (E, 2R, C)``: its adjoint, ``dy[e, r] = dy0[e, a[r]]``
  where ``b[r] < 0`` (an m = 0 row), else ``dpair[e, a[r]] + sign[r] * dpair[e, b[r]]``.

One program per BLOCK flat output elements, float32 or float64 (accumulated in the input's type).
CPU tensors only under ``TRITON_INTERPRET=1`` (:func:`is_interpreted`); :func:`launch_configs` finds
the launched specialisations by running the launchers on meta tensors (``kernels/aot.py``) and
:func:`compile_main` compiles them for sm_80 / sm_90 without a GPU.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from . import aot
from .aot import LaunchConfig

__all__ = [
    "compile_main",
    "is_interpreted",
    "launch_configs",
    "tap_assemble",
    "tap_combine_backward",
    "tap_combine_forward",
    "tap_gate_backward",
    "tap_gate_forward",
    "tap_split",
]

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gate_lanes(a_ptr, g_ptr, n, H, BLOCK: tl.constexpr):
    """A program's BLOCK flat (edge, channel) lanes of the (E, H) operands: (offs, mask, edge e,
    channel h, a[e, h], gate[e, h]) (masked lanes read 0)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    return offs, mask, offs // H, offs % H, a, g


@triton.jit
def _load_pair(b_ptr, e, h, H, mask):
    """(b[e, 0, h], b[e, 1, h]) of the (E, 2, H) pair operand."""
    return (
        tl.load(b_ptr + e * 2 * H + h, mask=mask, other=0.0),
        tl.load(b_ptr + e * 2 * H + H + h, mask=mask, other=0.0),
    )


@triton.jit
def _tap_gate_fwd_kernel(a_ptr, b_ptr, g_ptr, m_ptr, n, H, TAPS: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask, e, h, a, g = _gate_lanes(a_ptr, g_ptr, n, H, BLOCK)
    if TAPS == 1:
        tl.store(m_ptr + offs, a * _sigmoid(a) * g, mask=mask)
    else:
        b0, b1 = _load_pair(b_ptr, e, h, H, mask)
        base = m_ptr + e * 4 * H + h
        p = a + b0
        tl.store(base, p * _sigmoid(p) * g, mask=mask)
        p = a + b1
        tl.store(base + H, p * _sigmoid(p) * g, mask=mask)
        p = a - b0
        tl.store(base + 2 * H, p * _sigmoid(p) * g, mask=mask)
        p = a - b1
        tl.store(base + 3 * H, p * _sigmoid(p) * g, mask=mask)


@triton.jit
def _dsilu_terms(d, p, g):
    """(d * silu(p), d * g * silu'(p))."""
    s = _sigmoid(p)
    return d * p * s, d * g * s * (1.0 + p * (1.0 - s))


@triton.jit
def _tap_gate_bwd_kernel(
    dm_ptr, a_ptr, b_ptr, g_ptr, da_ptr, db_ptr, dg_ptr, n, H,
    TAPS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs, mask, e, h, a, g = _gate_lanes(a_ptr, g_ptr, n, H, BLOCK)
    if TAPS == 1:
        d = tl.load(dm_ptr + offs, mask=mask, other=0.0)
        dg, dp = _dsilu_terms(d, a, g)
        tl.store(dg_ptr + offs, dg, mask=mask)
        tl.store(da_ptr + offs, dp, mask=mask)
    else:
        b0, b1 = _load_pair(b_ptr, e, h, H, mask)
        dmb = dm_ptr + e * 4 * H + h
        dg0, dp0 = _dsilu_terms(tl.load(dmb, mask=mask, other=0.0), a + b0, g)
        dg1, dp1 = _dsilu_terms(tl.load(dmb + H, mask=mask, other=0.0), a + b1, g)
        dg2, dp2 = _dsilu_terms(tl.load(dmb + 2 * H, mask=mask, other=0.0), a - b0, g)
        dg3, dp3 = _dsilu_terms(tl.load(dmb + 3 * H, mask=mask, other=0.0), a - b1, g)
        tl.store(dg_ptr + offs, ((dg0 + dg1) + dg2) + dg3, mask=mask)
        tl.store(da_ptr + offs, (dp0 + dp1) + (dp2 + dp3), mask=mask)
        tl.store(db_ptr + e * 2 * H + h, dp0 - dp2, mask=mask)
        tl.store(db_ptr + e * 2 * H + H + h, dp1 - dp3, mask=mask)


@triton.jit
def _combine_lanes(n, R, C, BLOCK: tl.constexpr):
    """A program's BLOCK flat lanes of the (E, R, C) messages: (offs, mask, edge e, row r,
    channel c)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n, offs // (C * R), (offs // C) % R, offs % C


@triton.jit
def _combine_term(z_ptr, bias_ptr, src_ptr, coef_ptr, e, r, c, j, R, C, J: tl.constexpr, mask):
    """Term j of row r: (coef[r, j], z[e, s, c] + bias[s % R, c] with s = src[r, j], the flat
    offset of z[e, s, c])."""
    s = tl.load(src_ptr + r * J + j, mask=mask, other=0)
    k = tl.load(coef_ptr + r * J + j, mask=mask, other=0.0)
    at = (e * R * J + s) * C + c
    x = tl.load(z_ptr + at, mask=mask, other=0.0)
    x += tl.load(bias_ptr + (s % R) * C + c, mask=mask, other=0.0)
    return k, x, at


@triton.jit
def _tap_combine_fwd_kernel(
    z_ptr, bias_ptr, src_ptr, coef_ptr, m_ptr, n, R, C,
    J: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs, mask, e, r, c = _combine_lanes(n, R, C, BLOCK)
    acc = tl.zeros([BLOCK], dtype=m_ptr.dtype.element_ty)
    for j in tl.static_range(J):
        k, x, _ = _combine_term(z_ptr, bias_ptr, src_ptr, coef_ptr, e, r, c, j, R, C, J, mask)
        acc += k * (x * _sigmoid(x))
    tl.store(m_ptr + offs, acc, mask=mask)


@triton.jit
def _tap_combine_bwd_kernel(
    dm_ptr, z_ptr, bias_ptr, src_ptr, coef_ptr, dz_ptr, n, R, C,
    J: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs, mask, e, r, c = _combine_lanes(n, R, C, BLOCK)
    d = tl.load(dm_ptr + offs, mask=mask, other=0.0)
    for j in tl.static_range(J):
        k, x, at = _combine_term(z_ptr, bias_ptr, src_ptr, coef_ptr, e, r, c, j, R, C, J, mask)
        sg = _sigmoid(x)
        tl.store(dz_ptr + at, k * d * (sg * (1.0 + x * (1.0 - sg))), mask=mask)


@triton.jit
def _tap_split_kernel(
    y_ptr, rows0_ptr, rows1_ptr, sign1_ptr, y0_ptr, pair_ptr, n, R2, K0, K1, C,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Lanes over (edge, k, channel) of [y0 | pair] (K0 + K1 rows per edge): one gather (and tap
    1's sign) per lane, written to y0 or pair."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    k_all = K0 + K1
    e, k, c = offs // (k_all * C), (offs // C) % k_all, offs % C
    first = k < K0
    k1 = k - K0
    row0 = tl.load(rows0_ptr + k, mask=mask & first, other=0)
    row1 = tl.load(rows1_ptr + k1, mask=mask & (k >= K0), other=0)
    sign = tl.load(sign1_ptr + k1, mask=mask & (k >= K0), other=1.0)
    row = tl.where(first, row0, row1)
    v = tl.load(y_ptr + (e * R2 + row) * C + c, mask=mask, other=0.0)
    v = tl.where(first, v, v * sign.to(v.dtype)).to(y0_ptr.dtype.element_ty)
    tl.store(y0_ptr + (e * K0 + k) * C + c, v, mask=mask & first)
    tl.store(pair_ptr + (e * K1 + k1) * C + c, v, mask=mask & (k >= K0))


@triton.jit
def _tap_assemble_kernel(
    dy0_ptr, dpair_ptr, a_ptr, b_ptr, sign_ptr, dy_ptr, n, R2, K0, K1, C,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Lanes over (edge, row, channel) of dy: an m = 0 row from dy0, an m = +-1 row from its two
    places in dpair."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    e, r, c = offs // (R2 * C), (offs // C) % R2, offs % C
    ia = tl.load(a_ptr + r, mask=mask, other=0)
    ib = tl.load(b_ptr + r, mask=mask, other=-1)
    sign = tl.load(sign_ptr + r, mask=mask, other=0.0)
    m0 = ib < 0
    v0 = tl.load(dy0_ptr + (e * K0 + ia) * C + c, mask=mask & m0, other=0.0)
    va = tl.load(dpair_ptr + (e * K1 + ia) * C + c, mask=mask & (ib >= 0), other=0.0)
    vb = tl.load(dpair_ptr + (e * K1 + ib) * C + c, mask=mask & (ib >= 0), other=0.0)
    tl.store(dy_ptr + offs, tl.where(m0, v0, va + sign.to(va.dtype) * vb), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def is_interpreted() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return aot.is_interpreted(_tap_gate_fwd_kernel)


def _check(name: str, t: torch.Tensor, shape: tuple, like: torch.Tensor) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 or float64 like the first input, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the first input is on {like.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.device.type == "cpu" and not is_interpreted():
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)")
    if t.device.type not in ("cpu", "cuda", "meta"):  # meta: the launch is described (aot.py)
        raise ValueError(f"no Triton code for device type {t.device.type!r}")


def _gate_sizes(a, b, gate) -> tuple[int, int, int]:
    if a.dim() != 2:
        raise ValueError(f"a must be (E, H), got {tuple(a.shape)}")
    e, h = a.shape
    if b.dim() != 3 or b.shape[1] not in (0, 2):
        raise ValueError(f"b must be (E, 2, H) or (E, 0, H), got {tuple(b.shape)}")
    _check("a", a, (e, h), a)
    _check("b", b, (e, b.shape[1], h), a)
    _check("gate", gate, (e, h), a)
    return e, h, 1 if b.shape[1] == 0 else 4


def tap_gate_forward(a: torch.Tensor, b: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    e, h, taps = _gate_sizes(a, b, gate)
    m = a.new_empty((e, taps, h))
    n = e * h
    if n:
        aot.launch(
            f"tap_gate_fwd[T={taps}]", _tap_gate_fwd_kernel, (triton.cdiv(n, BLOCK),),
            {"a_ptr": a, "b_ptr": b, "g_ptr": gate, "m_ptr": m, "n": n, "H": h},
            {"TAPS": taps, "BLOCK": BLOCK}, device=a.device, num_warps=NUM_WARPS,
        )  # fmt: skip
    return m


def tap_gate_backward(dm, a, b, gate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    e, h, taps = _gate_sizes(a, b, gate)
    _check("dm", dm, (e, taps, h), a)
    da, db, dg = torch.empty_like(a), torch.empty_like(b), torch.empty_like(gate)
    n = e * h
    if n:
        aot.launch(
            f"tap_gate_bwd[T={taps}]", _tap_gate_bwd_kernel, (triton.cdiv(n, BLOCK),),
            {"dm_ptr": dm, "a_ptr": a, "b_ptr": b, "g_ptr": gate, "da_ptr": da, "db_ptr": db,
             "dg_ptr": dg, "n": n, "H": h},
            {"TAPS": taps, "BLOCK": BLOCK}, device=a.device, num_warps=NUM_WARPS,
        )  # fmt: skip
    return da, db, dg


def _combine_sizes(z, bias, src, coef) -> tuple[int, int, int, int]:
    if z.dim() != 3 or bias.dim() != 2:
        raise ValueError(
            f"z must be (E, Q, C) and bias (R, C), got {tuple(z.shape)}, {tuple(bias.shape)}"
        )
    e, q, c = z.shape
    r = bias.shape[0]
    if src.dim() != 2 or src.shape[0] != r or src.shape[0] * src.shape[1] != q:
        raise ValueError(f"src must be (R, J) with R * J = Q = {q}, got {tuple(src.shape)}")
    if src.dtype != torch.int64 or src.device != z.device or not src.is_contiguous():
        raise ValueError("src must be a contiguous int64 tensor on z's device")
    _check("z", z, (e, q, c), z)
    _check("bias", bias, (r, c), z)
    _check("coef", coef, tuple(src.shape), z)
    return e, r, c, src.shape[1]


def tap_combine_forward(z, bias, src, coef) -> torch.Tensor:
    e, r, c, j = _combine_sizes(z, bias, src, coef)
    m = z.new_empty((e, r, c))
    n = m.numel()
    if n:
        aot.launch(
            f"tap_combine_fwd[J={j}]", _tap_combine_fwd_kernel, (triton.cdiv(n, BLOCK),),
            {"z_ptr": z, "bias_ptr": bias, "src_ptr": src, "coef_ptr": coef, "m_ptr": m, "n": n,
             "R": r, "C": c},
            {"J": j, "BLOCK": BLOCK}, device=z.device, num_warps=NUM_WARPS,
        )  # fmt: skip
    return m


def tap_combine_backward(dm, z, bias, src, coef) -> tuple[torch.Tensor, torch.Tensor]:
    e, r, c, j = _combine_sizes(z, bias, src, coef)
    _check("dm", dm, (e, r, c), z)
    dz = torch.empty_like(z)
    n = dm.numel()
    if n:
        aot.launch(
            f"tap_combine_bwd[J={j}]", _tap_combine_bwd_kernel, (triton.cdiv(n, BLOCK),),
            {"dm_ptr": dm, "z_ptr": z, "bias_ptr": bias, "src_ptr": src, "coef_ptr": coef,
             "dz_ptr": dz, "n": n, "R": r, "C": c},
            {"J": j, "BLOCK": BLOCK}, device=z.device, num_warps=NUM_WARPS,
        )  # fmt: skip
    return dz, dz.view(e, j, r, c).sum((0, 1))


def _check_index(name: str, t: torch.Tensor, size: int, like: torch.Tensor, dtype) -> None:
    if t.dim() != 1 or t.numel() != size:
        raise ValueError(f"{name} must be ({size},), got {tuple(t.shape)}")
    if t.dtype != dtype or t.device != like.device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor on {like.device}")


def tap_split(
    y3: torch.Tensor,
    y0_rows: torch.Tensor,
    pair_rows: torch.Tensor,
    pair_signs: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y0 (E, n0, C), pair (E, 2 n1, C)) of y3 (E, 2R, C) (module doc); the row tables are
    ``TapRows.y0_rows``, ``pair_rows`` (int64) and ``pair_signs`` (float64). ``out_dtype``: y3's
    (default), or bfloat16 for a float32 y3 (native bf16 GEMM operands: gathered and rounded to
    nearest even in the same pass)."""
    if y3.dim() != 3:
        raise ValueError(f"y3 must be (E, 2R, C), got {tuple(y3.shape)}")
    e, r2, c = y3.shape
    _check("y3", y3, (e, r2, c), y3)
    out_dtype = y3.dtype if out_dtype is None else out_dtype
    if out_dtype not in (y3.dtype, torch.bfloat16) or (
        out_dtype == torch.bfloat16 and y3.dtype != torch.float32
    ):
        raise ValueError(f"out_dtype must be y3's dtype or bfloat16 (float32 y3), got {out_dtype}")
    k0, k1 = y0_rows.numel(), pair_rows.numel()
    _check_index("y0_rows", y0_rows, k0, y3, torch.int64)
    _check_index("pair_rows", pair_rows, k1, y3, torch.int64)
    _check_index("pair_signs", pair_signs, k1, y3, torch.float64)
    y0 = y3.new_empty((e, k0, c), dtype=out_dtype)
    pair = y3.new_empty((e, k1, c), dtype=out_dtype)
    n = e * (k0 + k1) * c
    if n:
        aot.launch(
            "tap_split", _tap_split_kernel, (triton.cdiv(n, BLOCK),),
            {"y_ptr": y3, "rows0_ptr": y0_rows, "rows1_ptr": pair_rows, "sign1_ptr": pair_signs,
             "y0_ptr": y0, "pair_ptr": pair, "n": n, "R2": r2, "K0": k0, "K1": k1, "C": c},
            {"BLOCK": BLOCK}, device=y3.device, num_warps=NUM_WARPS,
        )  # fmt: skip
    return y0, pair


def tap_assemble(
    dy0: torch.Tensor, dpair: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sign: torch.Tensor
) -> torch.Tensor:
    """dy (E, 2R, C) from dy0 (E, n0, C) and dpair (E, 2 n1, C), the adjoint of :func:`tap_split`
    (module doc); a, b (2R,) int64 and sign (2R,) float64 are ``TapRows.assemble_a`` / ``_b`` /
    ``_sign``."""
    if dy0.dim() != 3 or dpair.dim() != 3:
        raise ValueError(
            f"dy0 and dpair must be (E, n0, C) and (E, 2 n1, C), got {tuple(dy0.shape)}, "
            f"{tuple(dpair.shape)}"
        )
    e, k0, c = dy0.shape
    k1, r2 = dpair.shape[1], a.numel()
    _check("dy0", dy0, (e, k0, c), dy0)
    _check("dpair", dpair, (e, k1, c), dy0)
    _check_index("a", a, r2, dy0, torch.int64)
    _check_index("b", b, r2, dy0, torch.int64)
    _check_index("sign", sign, r2, dy0, torch.float64)
    dy = dy0.new_empty((e, r2, c))
    n = dy.numel()
    if n:
        aot.launch(
            "tap_assemble", _tap_assemble_kernel, (triton.cdiv(n, BLOCK),),
            {"dy0_ptr": dy0, "dpair_ptr": dpair, "a_ptr": a, "b_ptr": b, "sign_ptr": sign,
             "dy_ptr": dy, "n": n, "R2": r2, "K0": k0, "K1": k1, "C": c},
            {"BLOCK": BLOCK}, device=dy0.device, num_warps=NUM_WARPS,
        )  # fmt: skip
    return dy


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile descriptions
# ----------------------------------------------------------------------------------------------


def launch_configs(
    hidden: int,
    rows: int,
    channels: int,
    dtype: torch.dtype = torch.float32,
    num_edges: int = 50_000,
) -> list[LaunchConfig]:
    """The kernel specialisations the launchers use for a message block with ``hidden`` channels in
    fc1_edge_proj, ``rows`` = R rotated rows and ``channels`` = C (4 taps and 1 tap), found by
    running them on meta tensors (``kernels/aot.py``)."""

    def empty(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device="meta")

    with aot.trace() as launches:
        for taps in (1, 4):
            a, g = empty(num_edges, hidden), empty(num_edges, hidden)
            b = empty(num_edges, 0 if taps == 1 else 2, hidden)
            tap_gate_forward(a, b, g)
            tap_gate_backward(empty(num_edges, taps, hidden), a, b, g)
            src = empty(rows, taps, dt=torch.int64)
            z, bias, coef = (
                empty(num_edges, rows * taps, channels),
                empty(rows, channels),
                empty(rows, taps),
            )
            tap_combine_forward(z, bias, src, coef)
            tap_combine_backward(empty(num_edges, rows, channels), z, bias, src, coef)
        # the 4-tap projection's split and its adjoint (m = 0 rows: about half of the rows)
        n0 = rows // 2 + 1
        n1 = rows - n0
        y3 = empty(num_edges, 2 * rows, channels)
        idx0, idx1 = empty(2 * n0, dt=torch.int64), empty(4 * n1, dt=torch.int64)
        y0, pair = tap_split(y3, idx0, idx1, empty(4 * n1, dt=torch.float64))
        if dtype == torch.float32:
            tap_split(y3, idx0, idx1, empty(4 * n1, dt=torch.float64), torch.bfloat16)
        ab = empty(2 * rows, dt=torch.int64)
        tap_assemble(y0, pair, ab, ab, empty(2 * rows, dt=torch.float64))
    return aot.configs_of(launches)


# scn-t4-b2's two resolutions (H, R, C) in float32, float64, and an odd small case.
COMPILE_CASES = [
    (1024, 19, 128, torch.float32),
    (256, 13, 128, torch.float64),
    (7, 5, 17, torch.float32),
]


def compile_cases() -> list[tuple[dict, list[LaunchConfig]]]:
    """(problem, configs) of every :data:`COMPILE_CASES` entry, for :func:`aot.compile_main`."""
    return [
        (
            {"case": f"H={h} R={r} C={c} {str(dt).replace('torch.', '')}"},
            launch_configs(h, r, c, dt),
        )
        for h, r, c, dt in COMPILE_CASES
    ]


def compile_main(
    archs: tuple[int, ...] = (80, 90), json_path: str | None = None, jobs: int | None = None
) -> int:
    """Compile every launch config of :data:`COMPILE_CASES` for each arch down to a cubin (run in a
    process without TRITON_INTERPRET). Prints one line per compile; returns 1 if any failed."""
    return aot.compile_main(compile_cases(), archs, json_path, jobs, "tap_elementwise compile")


if __name__ == "__main__":
    sys.exit(compile_main())
