"""The one Triton GEMM of scn_fast (grid MLP and output heads), with its fused prologue/epilogue.

:func:`mm` computes ``out = epilogue(A @ B [+ A2 @ B2])`` where

* A (and A2) is a 2-D (M, K) matrix or a strided 3-D view (O, I, K) read as a matrix with rows
  (o, i): a tile's transposed inputs ``x[z0:z0+n].transpose(0, 1)`` are read in place;
* B (and B2) is a strided 2-D (K, N) matrix;
* out is a 2-D (M, N) matrix, a 3-D (O, I, N) view with rows (o, i), or a 4-D (O, I, J, H) view
  with rows (o, i) and columns (j, h): a result can be written in another row order than it is
  computed in (e.g. ``dQ`` in (band, atom, coefficient) order), so no launcher copies a
  non-contiguous reshape;
* the epilogue adds, in order: a column bias ``bias[col % period]``, or an outer-product bias
  ``rowv[row // I] * bias[col]`` (I: out's second size); stores the
  pre-activation (``pre``); applies SiLU or multiplies by ``silu'(z)`` of a saved pre-activation;
  writes one row of per-program column sums (``colsum``: bias gradients, reduced once per call by
  :class:`ColumnSums`); adds the old ``out`` (``accumulate``); stores.

Precision (a constexpr, never a global flag): ``"fp32"`` is ``tl.dot(input_precision="ieee")``
(FMA units, exact float32 products), ``"tf32"`` runs float32 operands on tensor cores
(``input_precision="tf32"``: 10-bit mantissas, float32 accumulation), ``"bf16"`` converts both
operands to bfloat16 in registers (B may already be bfloat16: weights are converted once per call)
and accumulates in float32 on tensor cores. float64 inputs take only ``"fp32"``.

Tiles (:func:`gemm_tiles`): 128 x 128 output tiles with 8 warps (two Hopper warpgroups, each a
64 x 128 ``wgmma``), K steps of 32, 3 pipeline stages for float32/tf32 (32 KB of shared memory per
stage) and 4 for bf16 (24 KB: float32 A, bf16 B); smaller power-of-two tiles (>= 16, 4 warps) when M
or N is small; float64 64 x 64 x 32, 4 warps, 2 stages. Programs are ordered in groups of 8 tile
rows so that neighbouring programs share B tiles in L2. See docs/gpu.md for why.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import aot

__all__ = [
    "BIAS_COL",
    "BIAS_NONE",
    "BIAS_OUTER",
    "EPI_DSILU",
    "EPI_NONE",
    "EPI_SILU",
    "PRECISIONS",
    "PRO_DSILU",
    "PRO_NONE",
    "PRO_SILU",
    "ColumnSums",
    "check_precision",
    "gemm_tiles",
    "is_interpreted",
    "mm",
    "row_blocks",
]

# Epilogue activations.
EPI_NONE, EPI_SILU, EPI_DSILU = 0, 1, 2
# A prologues: none, silu(A), A * silu'(ZA).
PRO_NONE, PRO_SILU, PRO_DSILU = 0, 1, 2
# Bias modes: none, column bias (col % bias_period), outer product rowv[row // I] * bias[col].
BIAS_NONE, BIAS_COL, BIAS_OUTER = 0, 1, 2
PRECISIONS = ("fp32", "tf32", "bf16")


@triton.jit
def _mm_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, c_ptr, bias_ptr, rowv_ptr, z_ptr, pre_ptr, colsum_ptr,
    za_ptr, rowsum_ptr,
    M, N, K,
    a_split, a_s_outer, a_s_inner, a_s_k,
    b_s_k, b_s_n,
    c_split, c_s_outer, c_s_inner, c_nsplit, c_s_nouter, c_s_n,
    z_s_m, bias_period, colsum_s_m,
    HAS_A2: tl.constexpr, BIAS: tl.constexpr, EPI: tl.constexpr, STORE_PRE: tl.constexpr,
    ACCUMULATE: tl.constexpr, COLSUM: tl.constexpr, PRO: tl.constexpr, ROWSUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):  # fmt: skip
    """C = epilogue(A @ B [+ A2 @ B2]) for one (BLOCK_M, BLOCK_N) tile.

    A[m, k] = a[(m // a_split) * a_s_outer + (m % a_split) * a_s_inner + k * a_s_k] (A2 the same
    strides), B[k, n] = b[k * b_s_k + n * b_s_n] (B2 the same), C[m, n] at
    (m // c_split) * c_s_outer + (m % c_split) * c_s_inner + (n // c_nsplit) * c_s_nouter +
    (n % c_nsplit) * c_s_n; Z and PRE are (M, N) with row stride z_s_m and unit column stride;
    COLSUM writes sum_m C[m, n] of this tile's rows to colsum[pid_m * colsum_s_m + n].
    PRO (the A prologue): 1 reads silu(A), 2 reads A * silu'(ZA) (ZA: A's shape and strides);
    ROWSUM (programs of the first column block) writes sum_k of the A so read to rowsum[m].
    """
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * grid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    a_row = (rm64 // a_split) * a_s_outer + (rm64 % a_split) * a_s_inner
    b_col = rn64 * b_s_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    rs = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_k = rk < K
        a_off = a_row[:, None] + rk[None, :] * a_s_k
        b_off = rk[:, None] * b_s_k + b_col[None, :]
        a_mask = mask_m[:, None] & mask_k[None, :]
        b_mask = mask_k[:, None] & mask_n[None, :]
        a = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)
        b = tl.load(b_ptr + b_off, mask=b_mask, other=0.0)
        if PRO == 1:  # silu(A); masked zeros stay zeros
            af = a.to(ACC_DTYPE)
            a = (af / (1.0 + tl.exp(-tl.maximum(af, -80.0)))).to(a.dtype)
        if PRO == 2:  # A * silu'(ZA)
            zv = tl.load(za_ptr + a_off, mask=a_mask, other=0.0).to(ACC_DTYPE)
            sig = 1.0 / (1.0 + tl.exp(-tl.maximum(zv, -80.0)))
            a = (a.to(ACC_DTYPE) * (sig * (1.0 + zv * (1.0 - sig)))).to(a.dtype)
        if ROWSUM:
            rs += tl.sum(a.to(ACC_DTYPE), axis=1)
        acc = _dot(a, b, acc, PRECISION, EMULATE_BF16)
        if HAS_A2:
            a2 = tl.load(a2_ptr + a_off, mask=a_mask, other=0.0)
            b2 = tl.load(b2_ptr + b_off, mask=b_mask, other=0.0)
            acc = _dot(a2, b2, acc, PRECISION, EMULATE_BF16)

    if ROWSUM:  # noqa: SIM102 (a constexpr branch, then a runtime one)
        if pid_n == 0:
            tl.store(rowsum_ptr + rm64, rs, mask=mask_m)
    mask = mask_m[:, None] & mask_n[None, :]
    if BIAS == 1:
        bias = tl.load(bias_ptr + rn % bias_period, mask=mask_n, other=0.0).to(ACC_DTYPE)
        acc += bias[None, :]
    if BIAS == 2:
        rowv = tl.load(rowv_ptr + rm // c_split, mask=mask_m, other=0.0).to(ACC_DTYPE)
        bias = tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(ACC_DTYPE)
        acc += rowv[:, None] * bias[None, :]
    z_off = rm64[:, None] * z_s_m + rn64[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + z_off, acc.to(pre_ptr.dtype.element_ty), mask=mask)
    # e^-a with a clamped at -80 (no overflow; changes silu and silu' by less than 1e-32)
    if EPI == 1:
        acc = acc / (1.0 + tl.exp(-tl.maximum(acc, -80.0)))
    if EPI == 2:
        zv = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(ACC_DTYPE)
        sig = 1.0 / (1.0 + tl.exp(-tl.maximum(zv, -80.0)))
        acc = acc * (sig * (1.0 + zv * (1.0 - sig)))
    if COLSUM:
        part = tl.sum(tl.where(mask, acc, 0.0), axis=0)
        tl.store(colsum_ptr + pid_m.to(tl.int64) * colsum_s_m + rn64, part, mask=mask_n)
    c_row = (rm64 // c_split) * c_s_outer + (rm64 % c_split) * c_s_inner
    c_col = (rn64 // c_nsplit) * c_s_nouter + (rn64 % c_nsplit) * c_s_n
    c_off = c_row[:, None] + c_col[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptr + c_off, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_bf16(x):
    """x rounded to the nearest bfloat16 (ties to even), as float32 bits (finite x)."""
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """acc + a @ b in the requested precision (module doc)."""
    if PRECISION == "bf16":
        if EMULATE_BF16:
            # Triton's interpreter truncates float32 -> bf16 and mis-multiplies bf16 dots: the
            # same numbers (bf16-rounded operands; their products are exact in float32; float32
            # accumulation) through a float32 dot.
            return tl.dot(_round_bf16(a), _round_bf16(b), acc, input_precision="ieee")
        return tl.dot(
            a.to(tl.bfloat16, fp_downcast_rounding="rtne"),
            b.to(tl.bfloat16, fp_downcast_rounding="rtne"),
            acc,
        )
    elif PRECISION == "tf32":
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


# ----------------------------------------------------------------------------------------------
# Tiles
# ----------------------------------------------------------------------------------------------

# The constexprs a launch label names (scn_fast.launches counts launches per label).
_LABEL_KEYS = (
    "HAS_A2", "BIAS", "EPI", "STORE_PRE", "ACCUMULATE", "COLSUM", "PRO", "ROWSUM", "PRECISION",
)  # fmt: skip
_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}
_GROUP_M = 8


def is_interpreted() -> bool:
    """True when the GEMM kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return aot.is_interpreted(_mm_kernel)


def check_precision(precision: str, dtype: torch.dtype) -> str:
    """``precision`` if it is valid for ``dtype`` tensors, else a ValueError naming the problem."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if dtype == torch.float64 and precision != "fp32":
        raise ValueError(f"float64 GEMMs are exact (precision 'fp32'), not {precision!r}")
    return precision


def _pow2_clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(v, 1))))


def gemm_tiles(m: int, n: int, dtype: torch.dtype, precision: str) -> dict:
    """Tile shape and launch options of :func:`mm` for an (m, n) output (module doc)."""
    if dtype == torch.float64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    bm, bn = _pow2_clamp(m, 16, 128), _pow2_clamp(n, 16, 128)
    return {
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_K": 32,
        "num_warps": 8 if bm * bn >= 128 * 128 else 4,
        "num_stages": 4 if precision == "bf16" else 3,
    }


def row_blocks(m: int, n: int, dtype: torch.dtype, precision: str) -> int:
    """Programs along M of an (m, n) :func:`mm`: the rows of ``colsum`` it writes."""
    return triton.cdiv(m, gemm_tiles(m, n, dtype, precision)["BLOCK_M"])


class ColumnSums:
    """Per-program partial column sums written by several :func:`mm` calls of one launcher call
    (``take`` hands out consecutive row ranges of one zero-initialised (rows, width) buffer) and
    reduced once at the end (``total``): one reduction per call instead of one per tile, in a fixed
    order (deterministic)."""

    def __init__(self, like: torch.Tensor, rows: int, width: int) -> None:
        self.buf = like.new_zeros((rows, width))
        self.width = width
        self._next = 0

    def take(self, rows: int) -> torch.Tensor:
        if self._next + rows > self.buf.shape[0]:
            raise RuntimeError("ColumnSums: more partial rows taken than reserved")
        view = self.buf[self._next : self._next + rows]
        self._next += rows
        return view

    def total(self, period: int | None = None) -> torch.Tensor:
        """sum over rows, folded to ``period`` columns (column c adds into c % period)."""
        if period is None:
            return self.buf.sum(0)
        return self.buf.view(-1, period).sum(0)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def _rows_view(t: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(rows, cols, split, s_outer, s_inner) of a 2-D matrix or a 3-D (O, I, K) view with rows (o, i)."""
    if t.dim() == 2:
        m, k = t.shape
        return m, k, max(m, 1), 0, t.stride(0)
    o, i, k = t.shape
    return o * i, k, max(i, 1), t.stride(0), t.stride(1)


def _as_matrix(a: torch.Tensor, prologue: int, za: torch.Tensor | None) -> torch.Tensor:
    """A as the kernel reads it (prologue applied), as an (M, K) tensor (ATen; empty-N calls)."""
    a = a.reshape(-1, a.shape[-1])
    if prologue == PRO_SILU:
        return torch.nn.functional.silu(a)
    if prologue == PRO_DSILU:
        return torch.ops.aten.silu_backward(a, za.reshape(-1, za.shape[-1]))
    return a


def mm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    *,
    a2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    bias_period: int | None = None,
    rowv: torch.Tensor | None = None,
    epi: int = EPI_NONE,
    z: torch.Tensor | None = None,
    pre: torch.Tensor | None = None,
    accumulate: bool = False,
    colsum: torch.Tensor | None = None,
    prologue: int = PRO_NONE,
    za: torch.Tensor | None = None,
    rowsum: torch.Tensor | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """out = epilogue(a @ b [+ a2 @ b2]) (module doc).

    a, a2: (M, K) or (O, I, K) views (rows (o, i)); b, b2: (K, N); out: (M, N), (O, I, N) or
    (O, I, J, H) views. bias (N,) as a column bias (index col % bias_period), or with rowv as
    rowv[row // I] * bias[col] (I: out's second size); epi: EPI_SILU
    (pre, an (M, N) tensor with unit column stride, gets the pre-activation if given) or EPI_DSILU
    (multiply by silu'(z), z (M, N) with unit column stride); colsum: a 2-D view with
    :func:`row_blocks` rows and >= N unit-stride columns, gets each program's column sums;
    prologue: PRO_SILU (A read as silu(A)) or PRO_DSILU (A read as A * silu'(za), za with a's shape
    and strides), not with a2; rowsum: a contiguous (M,) tensor, gets the row sums of A as read.
    """
    m, k, a_split, a_s_outer, a_s_inner = _rows_view(a)
    if out.dim() == 4:
        o, i, j, h = out.shape
        c_rows, n_out, c_split, c_s_outer, c_s_inner = o * i, j * h, max(i, 1), *out.stride()[:2]
        c_nsplit, c_s_nouter, c_s_n = max(h, 1), out.stride(2), out.stride(3)
    else:
        c_rows, n_out, c_split, c_s_outer, c_s_inner = _rows_view(out)
        c_nsplit, c_s_nouter, c_s_n = max(n_out, 1), 0, out.stride(-1)
    n = b.shape[1]
    if b.dim() != 2 or b.shape[0] != k or c_rows != m or n_out != n:
        raise ValueError(f"mm: shapes {tuple(a.shape)} @ {tuple(b.shape)} -> {tuple(out.shape)}")
    if a2 is not None and (a2.shape != a.shape or a2.stride() != a.stride()):
        raise ValueError("mm: a2 must have a's shape and strides")
    if b2 is not None and (b2.shape != b.shape or b2.stride() != b.stride()):
        raise ValueError("mm: b2 must have b's shape and strides")
    check_precision(precision, out.dtype)
    if prologue not in (PRO_NONE, PRO_SILU, PRO_DSILU) or (prologue != PRO_NONE and a2 is not None):
        raise ValueError(f"mm: prologue {prologue} (one of 0, 1, 2, and not with a2)")
    if (prologue == PRO_DSILU) != (za is not None) or (
        za is not None and (za.shape != a.shape or za.stride() != a.stride())
    ):
        raise ValueError("mm: za (with prologue PRO_DSILU only) must have a's shape and strides")
    if rowsum is not None and (rowsum.shape != (m,) or rowsum.stride(0) != 1):
        raise ValueError(f"mm: rowsum must be a contiguous ({m},) tensor")
    if m == 0:
        return out
    if n == 0:
        if rowsum is not None:  # no column block to write it: the sums of an empty B's A
            torch.sum(_as_matrix(a, prologue, za), 1, out=rowsum)
        return out
    zz = z if z is not None else pre
    if zz is not None and (zz.dim() != 2 or zz.shape != (m, n) or zz.stride(1) != 1):
        raise ValueError("mm: z / pre must be (M, N) with unit column stride")
    tiles = gemm_tiles(m, n, out.dtype, precision)
    if colsum is not None and (
        colsum.dim() != 2
        or colsum.shape[0] != triton.cdiv(m, tiles["BLOCK_M"])
        or colsum.shape[1] < n
        or colsum.stride(1) != 1
    ):
        raise ValueError("mm: colsum must be (row_blocks(M, N), >= N) with unit column stride")
    mode = BIAS_NONE if bias is None else (BIAS_OUTER if rowv is not None else BIAS_COL)
    args = {
        "a_ptr": a,
        "b_ptr": b,
        "a2_ptr": a2 if a2 is not None else a,
        "b2_ptr": b2 if b2 is not None else b,
        "c_ptr": out,
        "bias_ptr": bias if bias is not None else out,
        "rowv_ptr": rowv if rowv is not None else out,
        "z_ptr": z if z is not None else out,
        "pre_ptr": pre if pre is not None else out,
        "colsum_ptr": colsum if colsum is not None else out,
        "za_ptr": za if za is not None else out,
        "rowsum_ptr": rowsum if rowsum is not None else out,
        "M": m,
        "N": n,
        "K": k,
        "a_split": a_split,
        "a_s_outer": a_s_outer,
        "a_s_inner": a_s_inner,
        "a_s_k": a.stride(-1),
        "b_s_k": b.stride(0),
        "b_s_n": b.stride(1),
        "c_split": c_split,
        "c_s_outer": c_s_outer,
        "c_s_inner": c_s_inner,
        "c_nsplit": c_nsplit,
        "c_s_nouter": c_s_nouter,
        "c_s_n": c_s_n,
        "z_s_m": zz.stride(0) if zz is not None else 0,
        "bias_period": bias_period if bias_period is not None else max(n, 1),
        "colsum_s_m": colsum.stride(0) if colsum is not None else 0,
    }
    constexprs = {
        "HAS_A2": a2 is not None,
        "BIAS": mode,
        "EPI": epi,
        "STORE_PRE": pre is not None,
        "ACCUMULATE": accumulate,
        "COLSUM": colsum is not None,
        "PRO": prologue,
        "ROWSUM": rowsum is not None,
        "BLOCK_M": tiles["BLOCK_M"],
        "BLOCK_N": tiles["BLOCK_N"],
        "BLOCK_K": tiles["BLOCK_K"],
        "GROUP_M": _GROUP_M,
        "ACC_DTYPE": _TL_ACC[out.dtype],
        "PRECISION": precision,
        "EMULATE_BF16": precision == "bf16" and is_interpreted(),
    }
    label = "mm[" + ",".join(f"{key}={constexprs[key]}" for key in _LABEL_KEYS) + "]"
    grid = (triton.cdiv(m, tiles["BLOCK_M"]) * triton.cdiv(n, tiles["BLOCK_N"]),)
    aot.launch(
        label,
        _mm_kernel,
        grid,
        args,
        constexprs,
        device=out.device,
        num_warps=tiles["num_warps"],
        num_stages=tiles["num_stages"],
    )
    return out
