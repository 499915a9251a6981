"""Triton backend of the spherical grid MLP and of the sphere-sample output heads.

The math and the tile algorithm are those of ``scn_fast/ops/grid_projection.py`` (and
``csrc/grid_ops.cpp``, the C++ twin): per tile of ``n`` atoms, with the tile's grid rows ordered
(grid point, atom) so that every projection is one 2-D GEMM,

    Q_k  = [x_down | x_new]^T-tile  W1_k^T                 (S*n, H1)  per band k, coefficient space
    H1   = silu(to_grid @ [Q_0; ...; Q_{b-1}] + b1)         (G, n*H1) = (G*n, H1)
    H2   = silu(H1 w2^T + b2)                               (G*n, H2)
    U    = from_grid @ H2                                   (S, n*H2) = (S*n, H2)
    out[z, i] = U[(i, z)] w3^T + fsum[i] b3                 fsum = from_grid @ 1

One Triton kernel, :func:`_mm_kernel`, does every GEMM that produces an activation, with what
Triton does well fused around ``tl.dot``:

* prologue addressing: operand A is any strided 3-D view (O, I, K) read as a matrix with rows
  (o, i), so the tile's transposed inputs ``x[z0:z0+n].transpose(0, 1)`` are read in place, and a
  second (A2, B2) pair is accumulated into the same tile: the projection of *both* inputs into
  the concatenated ``[x_down | x_new]`` layout, without building it;
* epilogue: a column bias (with a period, for the (G, n*H1) layout), an outer-product bias
  ``rowv[row] * bias[col]`` (fc3's bias through the back-projection), SiLU (optionally also storing
  the pre-activation), or the SiLU derivative ``* silu'(Z)`` of a saved pre-activation (backward),
  accumulation into the output, and a strided output (rows (o, i) of a 3-D view): the
  back-projection writes ``out[z, i, :]`` directly, fused with the last bias.

The weight-gradient GEMMs (large K = rows of the tile) stay ``torch.addmm`` (cuBLAS, split-K), and
bias gradients are ``torch.sum``. Accumulation in float32 (float64 for float64 inputs); float32
``tl.dot`` uses IEEE precision unless ``torch.backends.cuda.matmul.allow_tf32`` is set.

CPU tensors are accepted only when the kernels are interpreted (``TRITON_INTERPRET=1`` set before
triton is first imported): :func:`is_interpreted`. :func:`launch_configs` records the exact
specialisations the launchers use (for ahead-of-time ``triton.compile`` checks without a GPU) and
:func:`compile_main` compiles them for sm_80 / sm_90.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

__all__ = [
    "LaunchConfig",
    "compile_main",
    "grid_mlp_backward",
    "grid_mlp_forward",
    "is_interpreted",
    "launch_configs",
    "sphere_heads_backward",
    "sphere_heads_forward",
]

# Epilogue activations.
EPI_NONE, EPI_SILU, EPI_DSILU = 0, 1, 2
# Bias modes: none, column bias (index col % bias_period), outer product rowv[row // c_split] * bias[col].
BIAS_NONE, BIAS_COL, BIAS_OUTER = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mm_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, c_ptr, bias_ptr, rowv_ptr, z_ptr, pre_ptr,
    M, N, K,
    a_split, a_s_outer, a_s_inner, a_s_k,
    b_s_k, b_s_n,
    c_split, c_s_outer, c_s_inner, c_s_n,
    z_s_m, bias_period,
    HAS_A2: tl.constexpr, BIAS: tl.constexpr, EPI: tl.constexpr, STORE_PRE: tl.constexpr,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """C = epilogue(A @ B [+ A2 @ B2]) for one (BLOCK_M, BLOCK_N) tile.

    A[m, k] = a[(m // a_split) * a_s_outer + (m % a_split) * a_s_inner + k * a_s_k] (A2 the same
    strides), B[k, n] = b[k * b_s_k + n * b_s_n] (B2 the same), C[m, n] likewise with c_*; Z and PRE
    are (M, N) with row stride z_s_m and unit column stride. Epilogue in order: bias (BIAS), store
    the pre-activation (STORE_PRE), SiLU (EPI=1) or multiply by silu'(Z) (EPI=2), add the old C
    (ACCUMULATE), store.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    a_row = (rm64 // a_split) * a_s_outer + (rm64 % a_split) * a_s_inner
    b_col = rn64 * b_s_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_k = rk < K
        a_off = a_row[:, None] + rk[None, :] * a_s_k
        b_off = rk[:, None] * b_s_k + b_col[None, :]
        a_mask = mask_m[:, None] & mask_k[None, :]
        b_mask = mask_k[:, None] & mask_n[None, :]
        a = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)
        b = tl.load(b_ptr + b_off, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_A2:
            a2 = tl.load(a2_ptr + a_off, mask=a_mask, other=0.0)
            b2 = tl.load(b2_ptr + b_off, mask=b_mask, other=0.0)
            acc = tl.dot(a2, b2, acc, input_precision=PRECISION)

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
    c_off = ((rm64 // c_split) * c_s_outer + (rm64 % c_split) * c_s_inner)[:, None] + (
        rn64 * c_s_n
    )[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptr + c_off, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}
_PTR_SIG = {torch.float32: "*fp32", torch.float64: "*fp64"}
# Launch options besides num_warps (FMA contraction pinned on, as the edge kernels do).
_OPTIONS = {"enable_fp_fusion": True}


def _meta(dtype: torch.dtype) -> dict:
    """Tile shape of :func:`_mm_kernel`: 64 x 64 x 32, 4 warps (float64 too: 32 KB of shared
    memory per pipeline stage)."""
    stages = 2 if dtype == torch.float64 else 3
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": stages}


def is_interpreted() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_mm_kernel, triton.runtime.JITFunction)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@dataclass(frozen=True)
class _Mat:
    """A strided matrix view: element (m, k) at t.data_ptr + (m // split) * s_outer +
    (m % split) * s_inner + k * s_col (in elements)."""

    t: torch.Tensor
    rows: int
    cols: int
    split: int
    s_outer: int
    s_inner: int
    s_col: int


def _mat(t: torch.Tensor) -> _Mat:
    """A 2-D tensor, or a 3-D (O, I, K) view read as a matrix with rows (o, i)."""
    if t.dim() == 2:
        m, k = t.shape
        return _Mat(t, m, k, max(m, 1), 0, t.stride(0), t.stride(1))
    o, i, k = t.shape
    return _Mat(t, o * i, k, max(i, 1), t.stride(0), t.stride(1), t.stride(2))


# Set by launch_configs: launches are recorded (argument values) instead of run.
_recorder: list | None = None


def _on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


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
) -> torch.Tensor:
    """out = epilogue(a @ b [+ a2 @ b2]).

    a, a2: (M, K) or (O, I, K) views (rows (o, i)); b, b2: (K, N); out: (M, N) or (O, I, N) view.
    bias (N,) as a column bias (index col % bias_period), or with rowv as rowv[row // I_out] * bias[col]
    (I_out: out's middle size); epi: EPI_SILU (pre, an (M, N) tensor with unit column stride, gets
    the pre-activation if given) or EPI_DSILU (multiply by silu'(z), z (M, N) with unit column stride).
    """
    A, C = _mat(a), _mat(out)
    M, K = A.rows, A.cols
    N = b.shape[1]
    if b.shape[0] != K or C.rows != M or C.cols != N:
        raise ValueError(f"mm: shapes {tuple(a.shape)} @ {tuple(b.shape)} -> {tuple(out.shape)}")
    if a2 is not None and (a2.shape != a.shape or a2.stride() != a.stride()):
        raise ValueError("mm: a2 must have a's shape and strides")
    if b2 is not None and (b2.shape != b.shape or b2.stride() != b.stride()):
        raise ValueError("mm: b2 must have b's shape and strides")
    if M == 0 or N == 0:
        return out
    zz = z if z is not None else pre
    z_s_m = zz.stride(0) if zz is not None else 0
    if zz is not None and (zz.dim() != 2 or zz.shape != (M, N) or zz.stride(1) != 1):
        raise ValueError("mm: z / pre must be (M, N) with unit column stride")
    mode = BIAS_NONE if bias is None else (BIAS_OUTER if rowv is not None else BIAS_COL)
    meta = _meta(out.dtype)
    args = (
        a,
        b,
        a2 if a2 is not None else a,
        b2 if b2 is not None else b,
        out,
        bias if bias is not None else out,
        rowv if rowv is not None else out,
        z if z is not None else out,
        pre if pre is not None else out,
        M,
        N,
        K,
        A.split,
        A.s_outer,
        A.s_inner,
        A.s_col,
        b.stride(0),
        b.stride(1),
        C.split,
        C.s_outer,
        C.s_inner,
        C.s_col,
        z_s_m,
        bias_period if bias_period is not None else max(N, 1),
    )
    constexprs = {
        "HAS_A2": a2 is not None,
        "BIAS": mode,
        "EPI": epi,
        "STORE_PRE": pre is not None,
        "ACCUMULATE": accumulate,
        "BLOCK_M": meta["BLOCK_M"],
        "BLOCK_N": meta["BLOCK_N"],
        "BLOCK_K": meta["BLOCK_K"],
        "ACC_DTYPE": _TL_DTYPE[out.dtype],
        "PRECISION": _precision(out.dtype),
    }
    if _recorder is not None:
        _recorder.append((args, constexprs, meta))
        return out
    grid = (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))
    with _on(out.device):
        _mm_kernel[grid](
            *args,
            **constexprs,
            num_warps=meta["num_warps"],
            num_stages=meta["num_stages"],
            **_OPTIONS,
        )
    return out


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check(tensors: dict[str, torch.Tensor]) -> torch.device:
    first = next(iter(tensors.values()))
    for name, t in tensors.items():
        if t.dtype not in _TL_DTYPE:
            raise TypeError(
                f"{name}: the Triton grid kernels support float32 and float64, not {t.dtype}"
            )
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{name}: all tensors must share one dtype and device")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    device = first.device
    if _recorder is not None:
        return device
    if device.type == "cpu" and not is_interpreted():
        raise ValueError(
            "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before triton is imported); "
            "the compiled kernels run on CUDA"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"no Triton code for device type {device.type!r}")
    return device


class _Buffers:
    """Flat scratch buffers reused across tiles; ``get(name, *shape)`` views a prefix."""

    def __init__(self, like: torch.Tensor, sizes: dict[str, int]) -> None:
        self._flat = {k: like.new_empty(v) for k, v in sizes.items()}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        return self._flat[name][:numel].view(*shape)


# ----------------------------------------------------------------------------------------------
# Grid MLP
# ----------------------------------------------------------------------------------------------


def _grid_sizes(x_down, to_grid, w2, w3):
    n_atoms, s, c = x_down.shape
    g = to_grid.shape[0]
    b = to_grid.shape[1] // s
    return n_atoms, s, c, g, b, 2 * b * c, w2.shape[0], w3.shape[0]


def _grid_first_layer(xd, xn, w1_kt, to_grid, b1, buf, n, s, c, g, b, h1w, pre=None):
    """H1 = silu(to_grid @ Q + b1) of one tile (G, n*H1); Q_k = [xd | xn] W1_k^T read in place."""
    q = buf.get("q", b, s * n, h1w)
    for k in range(b):
        mm(xd, w1_kt[k, 0], q[k], a2=xn, b2=w1_kt[k, 1])
    h1 = buf.get("h1", g, n * h1w)
    mm(to_grid, q.view(b * s, n * h1w), h1, bias=b1, bias_period=h1w, epi=EPI_SILU, pre=pre)
    return q, h1


def grid_mlp_forward(
    x_down: torch.Tensor,
    x_new: torch.Tensor,
    to_grid: torch.Tensor,
    from_grid: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
    tile_atoms: int,
) -> torch.Tensor:
    """out (N, S, C3) = F fc3(silu(fc2(silu(fc1([T x_down | T x_new]))))) (module doc)."""
    _check(
        dict(
            x_down=x_down,
            x_new=x_new,
            to_grid=to_grid,
            from_grid=from_grid,
            w1=w1,
            b1=b1,
            w2=w2,
            b2=b2,
            w3=w3,
            b3=b3,
        )
    )
    n_atoms, s, c, g, b, h1w, h2w, c3 = _grid_sizes(x_down, to_grid, w2, w3)
    out = x_down.new_empty((n_atoms, s, c3))
    if n_atoms == 0:
        return out
    nt = max(1, min(tile_atoms, n_atoms))
    w1_kt = w1.view(h1w, 2, b, c).permute(2, 1, 3, 0).contiguous()  # (b, 2, C, H1)
    w2t, w3t = w2.t().contiguous(), w3.t().contiguous()
    fsum = from_grid.sum(1)
    buf = _Buffers(
        x_down, {"q": b * s * nt * h1w, "h1": g * nt * h1w, "h2": g * nt * h2w, "u": s * nt * h2w}
    )
    for z0 in range(0, n_atoms, nt):
        n = min(nt, n_atoms - z0)
        xd = x_down[z0 : z0 + n].transpose(0, 1)  # (S, n, C): rows (i, z)
        xn = x_new[z0 : z0 + n].transpose(0, 1)
        _, h1 = _grid_first_layer(xd, xn, w1_kt, to_grid, b1, buf, n, s, c, g, b, h1w)
        h2 = buf.get("h2", g * n, h2w)
        mm(h1.view(g * n, h1w), w2t, h2, bias=b2, epi=EPI_SILU)
        u = buf.get("u", s, n * h2w)
        mm(from_grid, h2.view(g, n * h2w), u)
        mm(u.view(s * n, h2w), w3t, out[z0 : z0 + n].transpose(0, 1), bias=b3, rowv=fsum)
    return out


def grid_mlp_backward(
    grad_out: torch.Tensor,
    x_down: torch.Tensor,
    x_new: torch.Tensor,
    to_grid: torch.Tensor,
    from_grid: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
    tile_atoms: int,
) -> list[torch.Tensor]:
    """[dx_down, dx_new, dw1, db1, dw2, db2, dw3, db3], each tile's forward recomputed."""
    grad_out = grad_out.contiguous()
    _check(
        dict(
            grad_out=grad_out,
            x_down=x_down,
            x_new=x_new,
            to_grid=to_grid,
            from_grid=from_grid,
            w1=w1,
            b1=b1,
            w2=w2,
            b2=b2,
            w3=w3,
            b3=b3,
        )
    )
    n_atoms, s, c, g, b, h1w, h2w, c3 = _grid_sizes(x_down, to_grid, w2, w3)
    dx_down, dx_new = torch.empty_like(x_down), torch.empty_like(x_new)
    dw1_kt = x_down.new_zeros((b, 2, c, h1w))
    db1, dw2, db2 = torch.zeros_like(b1), torch.zeros_like(w2), torch.zeros_like(b2)
    dw3, db3 = torch.zeros_like(w3), torch.zeros_like(b3)

    def finish() -> list[torch.Tensor]:
        dw1 = dw1_kt.permute(3, 1, 0, 2).reshape(h1w, h1w)
        return [dx_down, dx_new, dw1, db1, dw2, db2, dw3, db3]

    if n_atoms == 0:
        return finish()
    nt = max(1, min(tile_atoms, n_atoms))
    w1_kt = w1.view(h1w, 2, b, c).permute(2, 1, 3, 0).contiguous()  # (b, 2, C, H1)
    w1_k = w1.view(h1w, 2, b, c).permute(2, 1, 0, 3).contiguous()  # (b, 2, H1, C)
    w2t = w2.t().contiguous()
    fsum = from_grid.sum(1)
    to_grid_t, from_grid_t = to_grid.t(), from_grid.t()
    buf = _Buffers(
        x_down,
        {
            "q": b * s * nt * h1w,
            "h1": g * nt * h1w,
            "a1": g * nt * h1w,
            "h2": g * nt * h2w,
            "a2": g * nt * h2w,
            "u": s * nt * h2w,
            "du": s * nt * h2w,
        },
    )
    for z0 in range(0, n_atoms, nt):
        n = min(nt, n_atoms - z0)
        rows = g * n
        xd = x_down[z0 : z0 + n].transpose(0, 1)
        xn = x_new[z0 : z0 + n].transpose(0, 1)
        # recompute the tile's forward, keeping the pre-activations
        a1 = buf.get("a1", g, n * h1w)
        q, h1 = _grid_first_layer(xd, xn, w1_kt, to_grid, b1, buf, n, s, c, g, b, h1w, pre=a1)
        a2, h2 = buf.get("a2", rows, h2w), buf.get("h2", rows, h2w)
        mm(h1.view(rows, h1w), w2t, h2, bias=b2, epi=EPI_SILU, pre=a2)
        u = buf.get("u", s, n * h2w)
        mm(from_grid, h2.view(g, n * h2w), u)
        # fc3 through the back-projection: out[z, i] = U[(i, z)] w3^T + fsum[i] b3
        go = grad_out[z0 : z0 + n].transpose(0, 1)  # (S, n, C3)
        db3 += fsum @ go.sum(1)
        dw3.addmm_(go.reshape(s * n, c3).t(), u.view(s * n, h2w))
        du = buf.get("du", s * n, h2w)
        mm(go, w3, du)
        # dA2 = (F^T dU) * silu'(A2), into H2's buffer
        da2 = h2
        mm(
            from_grid_t,
            du.view(s, n * h2w),
            da2.view(g, n * h2w),
            epi=EPI_DSILU,
            z=a2.view(g, n * h2w),
        )
        db2 += da2.sum(0)
        dw2.addmm_(da2.t(), h1.view(rows, h1w))
        # dA1 = (dA2 w2) * silu'(A1), into H1's buffer
        da1 = h1.view(rows, h1w)
        mm(da2, w2, da1, epi=EPI_DSILU, z=a1.view(rows, h1w))
        db1 += da1.sum(0)
        dq = q  # dQ = to_grid^T dA1 (b*S, n*H1), into Q's buffer
        mm(to_grid_t, da1.view(g, n * h1w), dq.view(b * s, n * h1w))
        xs = (xd.reshape(s * n, c), xn.reshape(s * n, c))
        for k in range(b):
            for side, (x_t, dx) in enumerate(zip(xs, (dx_down, dx_new), strict=True)):
                dw1_kt[k, side].addmm_(x_t.t(), dq[k])
                mm(dq[k], w1_k[k, side], dx[z0 : z0 + n].transpose(0, 1), accumulate=k > 0)
    return finish()


# ----------------------------------------------------------------------------------------------
# Output heads
# ----------------------------------------------------------------------------------------------


def _heads_sizes(x, sh, weights, point_weights):
    n_atoms, s, c = x.shape
    p = sh.shape[0]
    heads = len(point_weights)
    d1 = [weights[6 * k].shape[0] for k in range(heads)]
    d2 = [weights[6 * k + 2].shape[0] for k in range(heads)]
    dout = [v.shape[1] for v in point_weights]
    off = [sum(d1[:k]) for k in range(heads)]
    return n_atoms, s, c, p, heads, d1, d2, dout, off, sum(d1)


def _check_heads(x, sh, weights, point_weights):
    if len(weights) != 6 * len(point_weights) or not point_weights:
        raise ValueError("weights must hold (w1, b1, w2, b2, w3, b3) per head")
    named = {"x": x, "sh": sh}
    named.update({f"weights[{i}]": w for i, w in enumerate(weights)})
    named.update({f"point_weights[{i}]": v for i, v in enumerate(point_weights)})
    _check(named)


def sphere_heads_forward(
    x: torch.Tensor,
    sh: torch.Tensor,
    weights: list[torch.Tensor],
    point_weights: list[torch.Tensor],
    tile_atoms: int,
) -> list[torch.Tensor]:
    """[out_k (N, d_k)]: out_k[z, j] = (1/P) sum_p V_k[p, j] mlp_k((sh x_z)[p]) (module doc of
    ``scn_fast/ops/output_heads.py``)."""
    _check_heads(x, sh, weights, point_weights)
    n_atoms, s, _, p, heads, d1, d2, dout, off, d1_all = _heads_sizes(x, sh, weights, point_weights)
    outs = [x.new_empty((n_atoms, d)) for d in dout]
    if n_atoms == 0:
        return outs
    nt = max(1, min(tile_atoms, n_atoms))
    w1cat_t = torch.cat([weights[6 * k] for k in range(heads)]).t().contiguous()  # (C, D1)
    b1cat = torch.cat([weights[6 * k + 1] for k in range(heads)])
    vs = [v / p for v in point_weights]
    vs_t = [v.t() for v in vs]
    vsum = [v.sum(0) for v in vs]
    w2t = [weights[6 * k + 2].t().contiguous() for k in range(heads)]
    w3t = [weights[6 * k + 4].t() for k in range(heads)]  # (D2, 1)
    buf = _Buffers(
        x,
        {
            "q": s * nt * d1_all,
            "h1": p * nt * d1_all,
            "h2": p * nt * max(d2),
            "r": max(dout) * nt * max(d2),
        },
    )
    for z0 in range(0, n_atoms, nt):
        n = min(nt, n_atoms - z0)
        q = buf.get("q", s * n, d1_all)
        mm(x[z0 : z0 + n].transpose(0, 1), w1cat_t, q)
        h1 = buf.get("h1", p, n * d1_all)
        mm(sh, q.view(s, n * d1_all), h1, bias=b1cat, bias_period=d1_all, epi=EPI_SILU)
        h1r = h1.view(p * n, d1_all)
        for k in range(heads):
            h2 = buf.get("h2", p * n, d2[k])
            mm(h1r[:, off[k] : off[k] + d1[k]], w2t[k], h2, bias=weights[6 * k + 3], epi=EPI_SILU)
            r = buf.get("r", dout[k], n * d2[k])
            mm(vs_t[k], h2.view(p, n * d2[k]), r)
            dst = outs[k][z0 : z0 + n].t().unsqueeze(2)  # (d_k, n, 1)
            mm(r.view(dout[k] * n, d2[k]), w3t[k], dst, bias=weights[6 * k + 5], rowv=vsum[k])
    return outs


def sphere_heads_backward(
    grads: list[torch.Tensor],
    x: torch.Tensor,
    sh: torch.Tensor,
    weights: list[torch.Tensor],
    point_weights: list[torch.Tensor],
    tile_atoms: int,
) -> list[torch.Tensor]:
    """[dx, then dw1, db1, dw2, db2, dw3, db3 per head], each tile's forward recomputed."""
    _check_heads(x, sh, weights, point_weights)
    grads = [gr.contiguous() for gr in grads]
    n_atoms, s, c, p, heads, d1, d2, dout, off, d1_all = _heads_sizes(x, sh, weights, point_weights)
    dx = torch.empty_like(x)
    dws = [torch.zeros_like(w) for w in weights]
    if n_atoms == 0:
        return [dx, *dws]
    nt = max(1, min(tile_atoms, n_atoms))
    w1cat = torch.cat([weights[6 * k] for k in range(heads)])  # (D1, C)
    w1cat_t = w1cat.t().contiguous()
    b1cat = torch.cat([weights[6 * k + 1] for k in range(heads)])
    dw1cat, db1cat = torch.zeros_like(w1cat), torch.zeros_like(b1cat)
    vs = [v / p for v in point_weights]
    vs_t = [v.t() for v in vs]
    vsum = [v.sum(0) for v in vs]
    w2t = [weights[6 * k + 2].t().contiguous() for k in range(heads)]
    buf = _Buffers(
        x,
        {
            "q": s * nt * d1_all,
            "h1": p * nt * d1_all,
            "a1": p * nt * d1_all,
            "dh1": p * nt * d1_all,
            "h2": p * nt * max(d2),
            "a2": p * nt * max(d2),
            "r": max(dout) * nt * max(d2),
        },
    )
    sh_t = sh.t()
    for z0 in range(0, n_atoms, nt):
        n = min(nt, n_atoms - z0)
        rows = p * n
        xt = x[z0 : z0 + n].transpose(0, 1)
        q = buf.get("q", s * n, d1_all)
        mm(xt, w1cat_t, q)
        h1, a1 = buf.get("h1", p, n * d1_all), buf.get("a1", p, n * d1_all)
        mm(sh, q.view(s, n * d1_all), h1, bias=b1cat, bias_period=d1_all, epi=EPI_SILU, pre=a1)
        h1r, a1r = h1.view(rows, d1_all), a1.view(rows, d1_all)
        da1 = buf.get("dh1", rows, d1_all)
        for k in range(heads):
            cols = slice(off[k], off[k] + d1[k])
            w2, w3 = weights[6 * k + 2], weights[6 * k + 4]
            h2, a2 = buf.get("h2", rows, d2[k]), buf.get("a2", rows, d2[k])
            mm(h1r[:, cols], w2t[k], h2, bias=weights[6 * k + 3], epi=EPI_SILU, pre=a2)
            r = buf.get("r", dout[k], n * d2[k])
            mm(vs_t[k], h2.view(p, n * d2[k]), r)
            gk = grads[k][z0 : z0 + n].t()  # (d_k, n)
            dws[6 * k + 4].view(-1).addmv_(r.view(dout[k] * n, d2[k]).t(), gk.reshape(-1))
            dws[6 * k + 5] += (gk.sum(1) * vsum[k]).sum()
            dr = (gk.unsqueeze(2) * w3.view(1, 1, d2[k])).reshape(dout[k], n * d2[k])
            da2 = h2  # dA2 = (V dR) * silu'(A2), into H2's buffer
            mm(vs[k], dr, da2.view(p, n * d2[k]), epi=EPI_DSILU, z=a2.view(p, n * d2[k]))
            dws[6 * k + 3] += da2.sum(0)
            dws[6 * k + 2].addmm_(da2.t(), h1r[:, cols])
            mm(da2, w2, da1[:, cols], epi=EPI_DSILU, z=a1r[:, cols])
        db1cat += da1.sum(0)
        dq = q  # dQ = sh^T dA1 (S, n*D1), into Q's buffer
        mm(sh_t, da1.view(p, n * d1_all), dq.view(s, n * d1_all))
        dw1cat.addmm_(dq.t(), xt.reshape(s * n, c))
        mm(dq, w1cat, dx[z0 : z0 + n].transpose(0, 1))
    for k in range(heads):
        dws[6 * k].copy_(dw1cat[off[k] : off[k] + d1[k]])
        dws[6 * k + 1].copy_(db1cat[off[k] : off[k] + d1[k]])
    return [dx, *dws]


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile descriptions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """One specialisation of :func:`_mm_kernel` as a launcher launches it, for
    ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32), options=cfg.options)``."""

    name: str
    signature: dict
    constexprs: dict
    attrs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3

    @property
    def options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, **_OPTIONS}

    def ast_source(self):
        if not isinstance(_mm_kernel, triton.runtime.JITFunction):
            raise RuntimeError(
                "the kernels were decorated under TRITON_INTERPRET=1; compile in a process without it"
            )
        return triton.compiler.ASTSource(
            fn=_mm_kernel, signature=self.signature, constexprs=self.constexprs, attrs=self.attrs
        )


def _specialize(args: tuple, constexprs: dict) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attrs as the JIT derives them from runtime arguments: 16-byte
    aligned pointers and integers divisible by 16 get the "D" attribute, the integer 1 becomes a
    constexpr."""
    from triton.backends.compiler import BaseBackend

    names = [n for n in _mm_kernel.arg_names if n not in constexprs]
    constexprs = dict(constexprs)
    signature, attrs = {}, {}
    values = dict(zip(names, args, strict=True))
    for i, name in enumerate(_mm_kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = values[name]
        if isinstance(value, torch.Tensor):
            signature[name] = _PTR_SIG[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = BaseBackend.parse_attr("D")
        elif value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            attrs[(i,)] = BaseBackend.parse_attr("D" if value % 16 == 0 else "")
    return signature, constexprs, attrs


def launch_configs(
    lmax: int = 6,
    num_bands: int = 2,
    channels: int = 128,
    dtype: torch.dtype = torch.float32,
    num_atoms: int = 40,
    tile_atoms: int = 16,
    num_points: int = 128,
) -> list[LaunchConfig]:
    """The distinct kernel specialisations the grid and heads launchers use (forward and backward)
    for one problem, recorded by running the launchers on CPU tensors with the kernel launches
    replaced by recording (sizes matter only through the JIT's specialisation)."""
    global _recorder
    gen = torch.Generator().manual_seed(0)
    s = (lmax + 1) ** 2
    g = 2 * (lmax + 1) * (2 * lmax + 3)
    h1w, h2w = 2 * num_bands * channels, 2 * channels

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    grid_args = [
        rnd(num_atoms, s, channels),
        rnd(num_atoms, s, channels),
        rnd(g, num_bands * s),
        rnd(s, g),
        rnd(h1w, h1w),
        rnd(h1w),
        rnd(h2w, h1w),
        rnd(h2w),
        rnd(channels, h2w),
        rnd(channels),
    ]
    heads_w = [
        rnd(channels, channels),
        rnd(channels),
        rnd(channels, channels),
        rnd(channels),
        rnd(1, channels),
        rnd(1),
    ] * 2
    heads_v = [rnd(num_points, 1), rnd(num_points, 3)]
    x, sh = rnd(num_atoms, s, channels), rnd(num_points, s)
    _recorder = []
    try:
        grid_mlp_forward(*grid_args, tile_atoms)
        grid_mlp_backward(rnd(num_atoms, s, channels), *grid_args, tile_atoms)
        sphere_heads_forward(x, sh, heads_w, heads_v, tile_atoms)
        sphere_heads_backward(
            [rnd(num_atoms, 1), rnd(num_atoms, 3)], x, sh, heads_w, heads_v, tile_atoms
        )
        recorded = _recorder
    finally:
        _recorder = None
    configs: dict[str, LaunchConfig] = {}
    for args, constexprs, meta in recorded:
        sig, const, attrs = _specialize(args, constexprs)
        key = json.dumps([sig, {k: str(v) for k, v in const.items()}, repr(sorted(attrs.items()))])
        if key not in configs:
            name = (
                "mm["
                + ",".join(
                    f"{k}={v}"
                    for k, v in constexprs.items()
                    if k in ("HAS_A2", "BIAS", "EPI", "STORE_PRE", "ACCUMULATE")
                )
                + "]"
            )
            configs[key] = LaunchConfig(
                name, sig, const, attrs, meta["num_warps"], meta["num_stages"]
            )
    return list(configs.values())


# The problems compiled by compile_main: scn-t4-b2 (L=6, C=128, 2 bands) in float32 and float64, and
# a small odd case (L=2, C=17, 1 band) for the unaligned / non-multiple-of-16 specialisations.
COMPILE_CASES = [
    (6, 2, 128, torch.float32),
    (2, 1, 17, torch.float32),
    (6, 2, 128, torch.float64),
]


def _compile_one(cfg: LaunchConfig, arch: int) -> dict:
    from triton.backends.compiler import GPUTarget

    res = {"kernel": cfg.name, "arch": f"sm_{arch}"}
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            cfg.ast_source(), target=GPUTarget("cuda", arch, 32), options=cfg.options
        )
        cubin = compiled.asm.get("cubin", b"")
        res.update(ok=bool(cubin), cubin_bytes=len(cubin), shared=int(compiled.metadata.shared))
    except Exception:
        res.update(ok=False, error=traceback.format_exc(limit=4))
    res["seconds"] = round(time.perf_counter() - start, 2)
    return res


def compile_main(
    archs: tuple[int, ...] = (80, 90), json_path: str | None = None, jobs: int | None = None
) -> int:
    """Compile every distinct launch config of :data:`COMPILE_CASES` for each arch down to a cubin
    (in ``jobs`` forked processes). Run in a process without TRITON_INTERPRET. Prints one line per
    compile; returns 1 if any failed."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import os

    if is_interpreted():
        print("compile_main: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
        return 2
    configs: dict[str, tuple[str, LaunchConfig]] = {}
    for lmax, bands, channels, dtype in COMPILE_CASES:
        for cfg in launch_configs(lmax, bands, channels, dtype):
            key = json.dumps(
                [
                    cfg.signature,
                    {k: str(v) for k, v in cfg.constexprs.items()},
                    repr(sorted(cfg.attrs.items())),
                ]
            )
            configs.setdefault(key, (f"L={lmax} b={bands} C={channels} {dtype}", cfg))
    work = [(case, cfg, arch) for case, cfg in configs.values() for arch in archs]
    start = time.perf_counter()
    jobs = jobs or os.cpu_count() or 1
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
        results = list(pool.map(_compile_one, [w[1] for w in work], [w[2] for w in work]))
    for (case, cfg, _), res in zip(work, results, strict=True):
        res["case"] = case
        res["signature"] = {k: v for k, v in cfg.signature.items() if v != "constexpr"}
        status = (
            f"ok shared={res['shared']}B cubin={res['cubin_bytes']}B"
            if res["ok"]
            else f"FAILED\n{res.get('error', 'no cubin')}"
        )
        print(f"{case:<28} {res['kernel']} {res['arch']} {res['seconds']}s {status}")
    failed = [r for r in results if not r["ok"]]
    print(
        f"grid_projection compile: {len(results) - len(failed)}/{len(results)} compiled in "
        f"{time.perf_counter() - start:.1f}s"
    )
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(compile_main())
