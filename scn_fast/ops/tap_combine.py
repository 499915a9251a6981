"""``scn_fast::tap_combine``: upstream's ``act(fc2_edge(.))`` and its tap combination in one pass.

Upstream ends a message block with ``m = act(fc2_edge(h))`` of shape (E*T, R*C), viewed (E, T*R, C),
and ``einsum("abc,bd->adc", m, mapping_y_rot)``: a (T*R, R) constant that averages the T taps after
rotating each one's m = +-1 rows back (``so3.tap_set``). Every column of the mapping has exactly T
non-zeros (+-1/T), one per tap, and every row exactly one, so the combination is a gather of T rows
per output row with coefficients: src (R, T) a permutation of the T*R rows, coef (R, T). With the
bias of fc2_edge added here (the GEMM runs without it):

    m[e, r, c] = sum_j coef[r, j] * silu(z[e, src[r, j], c] + bias[src[r, j] % R, c])

z (E, T*R, C), bias (R, C) -> m (E, R, C). Backward: dz[e, src[r, j]] = coef[r, j] * dm[e, r] *
silu'(z + bias) and the bias gradient, one fused pass. Upstream writes the activation, transposes it
for a batched GEMM against the mapping and copies the result back: three passes over (E, T*R, C) and
one more tensor of that size saved for backward.

Backends: "extension" (``csrc/message_combine.cpp``), "triton" (``kernels/tap_elementwise.py``) and
"reference" (ATen ops; also used for dtypes other than float32/float64).
"""

from __future__ import annotations

from functools import cache

import torch
from torch.nn import functional as F

from .. import so3


@cache
def _tables_f64(lmax: int, mmax: int, num_taps: int) -> tuple[torch.Tensor, torch.Tensor]:
    mapping = so3.tap_set(lmax, mmax, num_taps).mapping  # (T*R, R), float64
    r = mapping.shape[1]
    nonzero = mapping.abs() > 1e-12  # cos(pi/2) = 6e-17 in float64 is an exact zero
    counts = nonzero.sum(0)
    t = mapping.shape[0] // r
    if not torch.equal(counts, torch.full_like(counts, t)) or not torch.equal(
        nonzero.sum(1), torch.ones(mapping.shape[0], dtype=counts.dtype)
    ):
        raise AssertionError("the tap mapping is not T signed entries per column, one per row")
    src = torch.stack([torch.nonzero(nonzero[:, k]).flatten() for k in range(r)])  # (R, T) sorted
    coef = torch.gather(mapping.t(), 1, src)
    return src.contiguous(), coef.contiguous()


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def combine_tables(
    lmax: int, mmax: int, num_taps: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(src (R, T) int64, coef (R, T) in dtype) of the tap mapping of resolution (lmax, mmax,
    num_taps), on device (cached)."""
    key = (lmax, mmax, num_taps, dtype, torch.device(device))

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        src, coef = _tables_f64(lmax, mmax, num_taps)
        return src.to(device), coef.to(dtype=dtype, device=device)

    return so3.cached_constant(_TABLES, key, build)


@cache
def _identical_taps_f64(lmax: int, mmax: int, num_taps: int) -> tuple[torch.Tensor, torch.Tensor]:
    mapping = so3.tap_set(lmax, mmax, num_taps).mapping  # (T*R, R), float64
    r = mapping.shape[1]
    summed = mapping.view(-1, r, r).sum(0)  # [r_in, r_out]: the mapping seen by equal taps
    scale = summed.diagonal().clone()
    off = summed - torch.diag(scale)
    if off.abs().max() > 1e-12:
        raise AssertionError("equal taps do not combine row by row (off-diagonal terms)")
    scale[scale.abs() <= 1e-12] = 0.0
    rows = torch.nonzero(scale).flatten()
    return rows, scale[rows].contiguous()


def identical_taps(
    lmax: int, mmax: int, num_taps: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """How the tap combination acts when every tap carries the same z (E, R, C): row by row,
    ``m[:, rows] = scale * silu(z[:, rows] + bias[rows])`` and every other row 0. (rows (K,) int64,
    scale (K,) in dtype), on device. For mmax = 1 with 4 taps the m = 0 rows keep scale 1 and the
    m = +-1 rows cancel (taps 2 and 3 rotate them back with the opposite sign of taps 0 and 1); with
    one tap every row has scale 1. An input of degree 0 alone (the first interaction's atom
    embeddings) gives equal taps: its rotations are the identity in every tap."""
    key = ("identical", lmax, mmax, num_taps, dtype, torch.device(device))

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        rows, scale = _identical_taps_f64(lmax, mmax, num_taps)
        return rows.to(device), scale.to(dtype=dtype, device=device)

    return so3.cached_constant(_TABLES, key, build)


def _forward_reference(z, bias, src, coef):
    q, r = z.shape[1], bias.shape[0]
    act = F.silu(z.to(bias.dtype) + bias.repeat(q // r, 1))
    return (act[:, src] * coef.view(1, r, -1, 1)).sum(2)


def _backward_reference(dm, z, bias, src, coef):
    e, q, c = z.shape
    r = bias.shape[0]
    x = z.to(bias.dtype) + bias.repeat(q // r, 1)
    dz = torch.empty_like(x)
    dz[:, src.flatten()] = (dm.unsqueeze(2) * coef.view(1, r, -1, 1)).reshape(e, q, c)
    dz = torch.ops.aten.silu_backward(dz, x)
    return dz.to(z.dtype), dz.view(e, q // r, r, c).sum((0, 1))


def _impl(backend: str, dtype: torch.dtype):
    """(forward, backward) for z of ``dtype``: the extension takes float32, float64 and bfloat16 z
    (with a float32 bias), Triton float32 and float64; ATen ops otherwise."""
    if backend == "extension" and dtype in (torch.float32, torch.float64, torch.bfloat16):
        from ..extension import load_extension

        ext = load_extension()
        return ext.tap_combine_forward, ext.tap_combine_backward
    if backend == "triton" and dtype in (torch.float32, torch.float64):
        from ..kernels import tap_elementwise

        return tap_elementwise.tap_combine_forward, tap_elementwise.tap_combine_backward
    return _forward_reference, _backward_reference


@torch.library.custom_op("scn_fast::tap_combine", mutates_args=())
def _tap_combine(
    z: torch.Tensor, bias: torch.Tensor, src: torch.Tensor, coef: torch.Tensor, backend: str
) -> torch.Tensor:
    forward, _ = _impl(backend, z.dtype)
    return forward(z.contiguous(), bias.contiguous(), src, coef)


@_tap_combine.register_fake
def _(z, bias, src, coef, backend):
    return bias.new_empty((z.shape[0], bias.shape[0], z.shape[2]))


def _setup_context(ctx, inputs, output):
    z, bias, src, coef, backend = inputs
    ctx.save_for_backward(z, bias, src, coef)
    ctx.backend = backend


@torch.library.custom_op("scn_fast::tap_combine_backward", mutates_args=())
def _tap_combine_backward(
    dm: torch.Tensor,
    z: torch.Tensor,
    bias: torch.Tensor,
    src: torch.Tensor,
    coef: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _, backward = _impl(backend, z.dtype)
    dz, dbias = backward(dm.contiguous(), z.contiguous(), bias.contiguous(), src, coef)
    return dz, dbias


@_tap_combine_backward.register_fake
def _(dm, z, bias, src, coef, backend):
    return torch.empty_like(z), torch.empty_like(bias)


def _backward(ctx, dm):
    z, bias, src, coef = ctx.saved_tensors
    dz, dbias = _tap_combine_backward(dm, z, bias, src, coef, ctx.backend)
    return dz, dbias, None, None, None


_tap_combine.register_autograd(_backward, setup_context=_setup_context)


def tap_combine(
    z: torch.Tensor, bias: torch.Tensor, lmax: int, mmax: int, num_taps: int, backend: str
) -> torch.Tensor:
    """Combined messages (E, R, C) = mapping_y_rot^T silu(z + bias) per edge, for z (E, T*R, C) (the
    bias-free fc2_edge output; bfloat16 allowed with a float32 bias: native bf16 GEMM outputs, read
    as they are) and bias (R, C); output in bias's dtype; differentiable w.r.t. z and bias."""
    if z.dtype != bias.dtype and not (z.dtype == torch.bfloat16 and bias.dtype == torch.float32):
        raise ValueError(f"z ({z.dtype}) must have bias's dtype ({bias.dtype}), or be bfloat16")
    src, coef = combine_tables(lmax, mmax, num_taps, bias.dtype, z.device)
    return _tap_combine(z, bias, src, coef, backend)
