"""Triton kernels for the fused edge path: ``gather_rotate`` and ``rotate_scatter``.

The contract is ``scn_fast/ops/SPEC.md``. Both ops work on the *compact Wigner layout* of one
resolution (degree ``L = lmax``, order ``M = mmax`` in {0, 1}): for degree ``l`` the kept rows are the
orders ``m = -mm..mm`` with ``mm = min(l, M)``, so ``n_l = 2*mm + 1`` rows of ``2l + 1`` entries each::

    row_off_l = sum_{l' < l} n_l'                 R = row_off_{L+1}   (rotated rows per edge)
    off_l     = sum_{l' < l} n_l' * (2l' + 1)     K = off_{L+1}       (compact entries per edge)
    wig[e, off_l + a*(2l+1) + b] = D_l(e)[kept row a, column b]       (column b = coefficient l*l + b)

With M in {0, 1} these have closed forms: M = 0: ``row_off_l = l``, ``off_l = l*l``; M = 1:
``row_off_l = 3l - 2`` and ``off_l = 3l^2 - 2`` for l >= 1 (both 0 for l = 0).

Ops (shapes; ``S = (L+1)^2``)::

    gather_rotate   x (N, S_x >= S, C), wig (E, K), idx (E, P) int64            -> y (E, P, R, C)
        y[e, p, row_off_l + a, c] = sum_b wig[e, off_l + a*(2l+1) + b] * x[idx[e, p], l*l + b, c]

    rotate_scatter  m (E, P, R, C), wig (E, K), perm (P, E), ptr (P, N+1) int64 -> out (N, S, C)
        out[n, l*l + b, c] = sum_p sum_{k in [ptr[p, n], ptr[p, n+1])} sum_a
                             wig[e, off_l + a*(2l+1) + b] * m[e, p, row_off_l + a, c],  e = perm[p, k]

Design:

* ``gather_rotate``: one program per tile of ``BLOCK_R`` (edge, side) pairs (row ``r = e*P + p`` of
  ``idx`` viewed flat, so a tile holds ``BLOCK_R / P`` edges) and one block of ``BLOCK_C`` channels.
  Degrees are unrolled at compile time (``tl.static_range`` over constexpr ``LMAX``; ``MMAX`` picks
  one or three kept rows), columns ``b`` are a loop: for every (l, b) the gathered coefficient tile
  ``x[idx, l*l + b, :]`` is loaded once (coalesced, 128-bit along C when C % 4 == 0) and feeds the
  ``n_l <= 3`` row accumulators of that degree; every compact Wigner entry is loaded once per pair
  row (the P rows of one edge hit the same cache line). (Unrolling the columns too doubled the
  registers and quintupled the compile time.)
* ``rotate_scatter``: one program per (destination node, channel block) holding the whole
  ``(S, BLOCK_C)`` output tile in registers. It walks the node's CSR segment of every side in order
  (p ascending, then k ascending); per edge it adds ``sum_a w_a[s] * m[e, p, row_off(s) + a, c]``
  where ``w_a[s]`` is the compact entry linking output coefficient ``s`` to kept row ``a`` of its
  degree. Each output element is written once by one program, in a fixed order: deterministic,
  bit-identical run to run, no atomics.
* Accumulation in float32 (float64 for float64 inputs); the result is rounded once to the output
  dtype. All element offsets that can exceed 2^31 are computed in int64.
* Indices are not validated on the host (that would synchronise with the device); the kernels
  never read out of bounds instead, like the CUDA twin: a gather index outside [0, N) gives a row of
  NaN (loud, not silently wrong), a ``perm`` value outside [0, E) is skipped, and a ``ptr`` segment
  is clamped to [0, E).

CPU tensors are accepted only when the kernels are interpreted: ``TRITON_INTERPRET=1`` must be set
before *triton* is first imported (Triton decides at ``@triton.jit`` time, also for its own
``tl.*`` helpers; note that importing ``torch._dynamo`` imports triton). :func:`is_interpreted` says
which way this module was built. :func:`launch_configs` returns the exact specialisations the
launchers use (traced on meta tensors, ``kernels/aot.py``), for ahead-of-time compile checks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import aot
from .aot import LaunchConfig

__all__ = [
    "LaunchConfig",
    "compact_sizes",
    "gather_rotate",
    "is_interpreted",
    "launch_configs",
    "rotate_scatter",
]

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gather_rotate_kernel(
    x_ptr,  # (N, S_x, C) contiguous
    wig_ptr,  # (E, K) contiguous
    idx_ptr,  # (E, P) int64 contiguous, viewed as (E*P,) pair rows r = e*P + p
    y_ptr,  # (E, P, R, C) contiguous, viewed as (E*P, R, C)
    n_rows,  # E * P
    num_nodes,  # N: idx values outside [0, N) give NaN rows
    C,  # channels
    x_node_stride,  # S_x * C
    LMAX: tl.constexpr,
    MMAX: tl.constexpr,  # 0 or 1
    P: tl.constexpr,
    K: tl.constexpr,
    R: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """y[r, row_off_l + a, c] = sum_b wig[r // P, off_l + a*(2l+1) + b] * x[idx[r], l*l + b, c];
    NaN for the rows r whose idx[r] is outside [0, N)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < C)[None, :]
    rows64 = rows.to(tl.int64)

    node = tl.load(idx_ptr + rows64, mask=row_ok, other=0)  # int64 node of each pair row
    node_ok = (node >= 0) & (node < num_nodes)
    node = tl.where(node_ok, node, 0)  # a valid address; the row becomes NaN at the store
    x_tile = x_ptr + (node * x_node_stride)[:, None] + cols[None, :]  # coefficient 0 of x[node]
    w_row = wig_ptr + (rows64 // P) * K  # compact Wigner row of each pair's edge
    y_tile = y_ptr + (rows64 * (R * C))[:, None] + cols[None, :]  # row 0 of y[r]

    for l in tl.static_range(LMAX + 1):
        if l == 0 or MMAX == 0:
            # One kept row (m = 0): row_off_l = l, off_l = l*l for M = 0; both 0 for l = 0.
            _rotate_degree_1row(
                x_tile, w_row, y_tile, C, row_ok, node_ok, mask, l, l * (1 - MMAX), l * l * (1 - MMAX),
                BLOCK_R, BLOCK_C, ACC_DTYPE,
            )  # fmt: skip
        else:
            # M = 1, l >= 1: three kept rows (m = -1, 0, 1); row_off_l = 3l - 2, off_l = 3l^2 - 2.
            _rotate_degree_3rows(
                x_tile, w_row, y_tile, C, row_ok, node_ok, mask, l, 3 * l - 2, 3 * l * l - 2,
                BLOCK_R, BLOCK_C, ACC_DTYPE,
            )  # fmt: skip


@triton.jit
def _rotate_degree_1row(
    x_tile, w_row, y_tile, C, row_ok, node_ok, mask,
    L: tl.constexpr, ROW: tl.constexpr, OFF: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """Degree L with one kept row: y[:, ROW, :] = sum_b wig[:, OFF + b] * x[node, L*L + b, :]."""
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC_DTYPE)
    for b in range(2 * L + 1):
        xv = tl.load(x_tile + (L * L + b) * C, mask=mask, other=0.0).to(ACC_DTYPE)
        w = tl.load(w_row + (OFF + b), mask=row_ok, other=0.0).to(ACC_DTYPE)
        acc += w[:, None] * xv
    acc = tl.where(node_ok[:, None], acc, float("nan"))
    tl.store(y_tile + ROW * C, acc.to(y_tile.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_degree_3rows(
    x_tile, w_row, y_tile, C, row_ok, node_ok, mask,
    L: tl.constexpr, ROW: tl.constexpr, OFF: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """Degree L with three kept rows a = 0, 1, 2: each gathered x tile feeds three accumulators,
    y[:, ROW + a, :] = sum_b wig[:, OFF + a*(2L+1) + b] * x[node, L*L + b, :]."""
    W: tl.constexpr = 2 * L + 1
    acc0 = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC_DTYPE)
    acc1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC_DTYPE)
    acc2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC_DTYPE)
    for b in range(W):
        xv = tl.load(x_tile + (L * L + b) * C, mask=mask, other=0.0).to(ACC_DTYPE)
        w0 = tl.load(w_row + (OFF + b), mask=row_ok, other=0.0).to(ACC_DTYPE)
        w1 = tl.load(w_row + (OFF + W + b), mask=row_ok, other=0.0).to(ACC_DTYPE)
        w2 = tl.load(w_row + (OFF + 2 * W + b), mask=row_ok, other=0.0).to(ACC_DTYPE)
        acc0 += w0[:, None] * xv
        acc1 += w1[:, None] * xv
        acc2 += w2[:, None] * xv
    out_ty = y_tile.dtype.element_ty
    ok = node_ok[:, None]
    acc0 = tl.where(ok, acc0, float("nan"))
    acc1 = tl.where(ok, acc1, float("nan"))
    acc2 = tl.where(ok, acc2, float("nan"))
    tl.store(y_tile + ROW * C, acc0.to(out_ty), mask=mask)
    tl.store(y_tile + (ROW + 1) * C, acc1.to(out_ty), mask=mask)
    tl.store(y_tile + (ROW + 2) * C, acc2.to(out_ty), mask=mask)


@triton.jit
def _rotate_scatter_kernel(
    m_ptr,  # (E, P, R, C) contiguous
    wig_ptr,  # (E, K) contiguous
    perm_ptr,  # (P, E) int64 contiguous
    ptr_ptr,  # (P, N + 1) int64 contiguous
    out_ptr,  # (N, S, C) contiguous, S = (LMAX+1)^2
    num_nodes,  # N
    num_edges,  # E
    C,  # channels
    LMAX: tl.constexpr,
    MMAX: tl.constexpr,  # 0 or 1
    P: tl.constexpr,
    K: tl.constexpr,
    R: tl.constexpr,
    S_PAD: tl.constexpr,  # next power of two >= (LMAX+1)^2
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """out[n, s, c] = sum_p sum_k sum_a wig[e, off_l + a*(2l+1) + b] * m[e, p, row_off_l + a, c];
    perm values outside [0, E) are skipped, segments clamped to [0, E)."""
    n = tl.program_id(0)
    pid_c = tl.program_id(1)
    S: tl.constexpr = (LMAX + 1) * (LMAX + 1)

    # Per output coefficient s = l*l + b: its degree l, column b and the compact offsets of l.
    s = tl.arange(0, S_PAD)
    s_ok = s < S
    deg = tl.zeros([S_PAD], dtype=tl.int32)
    for j in tl.static_range(1, LMAX + 1):
        deg += (s >= j * j).to(tl.int32)
    col = s - deg * deg
    width = 2 * deg + 1
    if MMAX == 0:
        row_off = deg
        off = deg * deg
    else:
        row_off = tl.where(deg == 0, 0, 3 * deg - 2)
        off = tl.where(deg == 0, 0, 3 * deg * deg - 2)

    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    # Loop-invariant offsets (inside one compact Wigner row / one m[e, p]) and masks of kept row
    # a = 0 and, for M = 1, rows a = 1, 2 (which degree 0 lacks).
    w_off0 = off + col
    m_off0 = row_off[:, None] * C + cols[None, :]
    mask0 = s_ok[:, None] & c_ok[None, :]
    if MMAX == 1:
        s_ok12 = s_ok & (deg > 0)
        mask12 = s_ok12[:, None] & c_ok[None, :]
        w_off1 = w_off0 + width
        w_off2 = w_off1 + width
        m_off1 = m_off0 + C
        m_off2 = m_off1 + C

    acc = tl.zeros([S_PAD, BLOCK_C], dtype=ACC_DTYPE)
    for p in tl.static_range(P):
        seg = ptr_ptr + p * (num_nodes + 1) + n
        start = tl.maximum(tl.load(seg), 0)
        end = tl.minimum(tl.load(seg + 1), num_edges)
        for k in range(start, end):
            e = tl.load(perm_ptr + p * num_edges + k)  # int64 edge id
            e_ok = (e >= 0) & (e < num_edges)
            e = tl.where(e_ok, e, 0)  # a valid address; its Wigner entries are zeroed below
            w_e = wig_ptr + e * K  # its compact Wigner row
            m_e = m_ptr + (e * P + p) * (R * C)  # its message m[e, p]
            w = tl.load(w_e + w_off0, mask=s_ok, other=0.0).to(ACC_DTYPE)
            mv = tl.load(m_e + m_off0, mask=mask0, other=0.0).to(ACC_DTYPE)
            acc += tl.where(e_ok, w, 0.0)[:, None] * mv
            if MMAX == 1:
                w = tl.load(w_e + w_off1, mask=s_ok12, other=0.0).to(ACC_DTYPE)
                mv = tl.load(m_e + m_off1, mask=mask12, other=0.0).to(ACC_DTYPE)
                acc += tl.where(e_ok, w, 0.0)[:, None] * mv
                w = tl.load(w_e + w_off2, mask=s_ok12, other=0.0).to(ACC_DTYPE)
                mv = tl.load(m_e + m_off2, mask=mask12, other=0.0).to(ACC_DTYPE)
                acc += tl.where(e_ok, w, 0.0)[:, None] * mv

    out_tile = out_ptr + n.to(tl.int64) * (S * C) + s[:, None] * C + cols[None, :]
    tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=s_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration (shared by the launchers and launch_configs)
# ----------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}
_MAX_BLOCK_C = 128
_GATHER_ROWS_PER_THREAD = 2  # (edge, side) rows of a gather_rotate tile held by one thread
_SCATTER_TILE = 2048  # elements of the (S_PAD, BLOCK_C) accumulator of rotate_scatter (8 warps)
_ELEMS_PER_THREAD = 8  # of the scatter accumulator


def compact_sizes(lmax: int, mmax: int) -> tuple[int, int]:
    """(R, K) of the compact layout: rotated rows per edge, compact Wigner entries per edge."""
    rows = entries = 0
    for l in range(lmax + 1):
        n_l = 2 * min(l, mmax) + 1
        rows += n_l
        entries += n_l * (2 * l + 1)
    return rows, entries


def _warps(elements: int) -> int:
    return max(1, min(8, elements // (32 * _ELEMS_PER_THREAD)))


def _gather_meta(channels: int) -> dict:
    """Tile of gather_rotate: a warp spans the channel block (one row when BLOCK_C >= 32), so the
    rows a thread holds (each with its own gathered node, Wigner entries and 3 accumulators) are
    BLOCK_R / (num_warps * rows per warp); keep that at 2. C = 128: 8 rows x 128 channels, 4 warps,
    8 fp32 elements per thread, 128-bit loads along C."""
    block_c = min(triton.next_power_of_2(max(channels, 1)), _MAX_BLOCK_C)
    num_warps = 4 if block_c >= 64 else (2 if block_c >= 32 else 1)
    rows_per_warp = max(1, 32 // block_c)
    block_r = _GATHER_ROWS_PER_THREAD * num_warps * rows_per_warp
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": num_warps}


def _scatter_meta(lmax: int, channels: int) -> dict:
    """Accumulator of rotate_scatter: (S_PAD, BLOCK_C) <= 2048 elements, 8 per thread. L = 6, C = 128:
    64 x 32, 8 warps, 4 channel blocks per node (each re-reads the node's perm/Wigner entries, which
    are small next to m); 62 registers on sm_90 and sm_80 with the perm bounds masks (48 / 62
    without them), against 80 / 146 at 64 x 64."""
    s_pad = triton.next_power_of_2((lmax + 1) ** 2)
    block_c = min(
        triton.next_power_of_2(max(channels, 1)), _MAX_BLOCK_C, max(1, _SCATTER_TILE // s_pad)
    )
    return {"S_PAD": s_pad, "BLOCK_C": block_c, "num_warps": _warps(s_pad * block_c)}


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def is_interpreted() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return aot.is_interpreted(_gather_rotate_kernel)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _check_resolution(lmax: int, mmax: int) -> None:
    if not isinstance(lmax, int) or isinstance(lmax, bool) or lmax < 0:
        raise ValueError(f"lmax must be a non-negative int, got {lmax!r}")
    if mmax not in (0, 1) or isinstance(mmax, bool):
        raise ValueError(
            f"mmax must be 0 or 1 (the compact layouts the kernels implement), got {mmax!r}"
        )


def _check_tensor(name: str, t, ndim: int, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, stride {t.stride()})")


def _check_device(tensors: dict) -> torch.device:
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        where = ", ".join(f"{k} on {t.device}" for k, t in tensors.items())
        raise ValueError(f"all inputs must be on one device, got {where}")
    device = devices.pop()
    if device.type in ("cuda", "meta"):  # meta: the launch is described (kernels/aot.py)
        return device
    if device.type == "cpu" and is_interpreted():
        return device
    raise ValueError(
        f"inputs are on {device}: the Triton kernels need CUDA tensors (CPU tensors only when "
        "TRITON_INTERPRET=1 is set before scn_fast.kernels.edge_rotation is imported)"
    )


def _check_wig(wig, value_dtype: torch.dtype, num_edges: int, entries: int, lmax, mmax) -> None:
    _check_tensor("wig", wig, 2, (torch.float32, value_dtype))
    if tuple(wig.shape) != (num_edges, entries):
        raise ValueError(
            f"wig must have shape (E, K) = ({num_edges}, {entries}) for lmax={lmax}, mmax={mmax}, "
            f"got {tuple(wig.shape)}"
        )


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _launch(label, kernel, grid, args: dict, meta: dict, lmax, mmax, sides, dtype, device) -> None:
    """``aot.launch`` of a rotation kernel: the resolution's constexprs (LMAX, MMAX, P sides, K
    Wigner entries, R rows), then the tile's from ``meta`` (its block sizes; ``num_warps`` is the
    launch's), then the accumulator dtype (float64 for ``dtype`` float64 values, else float32)."""
    rows, entries = compact_sizes(lmax, mmax)
    consts = {"LMAX": lmax, "MMAX": mmax, "P": sides, "K": entries, "R": rows}
    consts.update({k: v for k, v in meta.items() if k != "num_warps"})
    consts["ACC_DTYPE"] = _acc_dtype(dtype)
    aot.launch(label, kernel, grid, args, consts, device=device, num_warps=meta["num_warps"])


def gather_rotate(x: torch.Tensor, wig: torch.Tensor, idx: torch.Tensor, lmax: int, mmax: int):
    """Gather node features per edge side and rotate them into the edge frame (compact layout).

    Args:
        x: (N, S_x, C) contiguous, S_x >= (lmax+1)^2 (extra coefficients are ignored); float32,
            float64, bfloat16 or float16.
        wig: (E, K) contiguous compact Wigner rows, float32 or x's dtype.
        idx: (E, P) int64 contiguous node index of each edge side (P >= 1); values outside
            [0, N) are not checked on the host (that would synchronise with the device): their
            rows of y are NaN.
        lmax, mmax: the resolution (mmax in {0, 1}).

    Returns:
        y (E, P, R, C) in x's dtype with
        ``y[e, p, row_off_l + a, c] = sum_b wig[e, off_l + a*(2l+1) + b] * x[idx[e, p], l*l + b, c]``.
    """
    _check_resolution(lmax, mmax)
    rows, entries = compact_sizes(lmax, mmax)
    _check_tensor("x", x, 3, _DTYPES)
    _check_tensor("idx", idx, 2, (torch.int64,))
    num_edges, sides = idx.shape
    if sides < 1:
        raise ValueError(f"idx must have shape (E, P) with P >= 1, got {tuple(idx.shape)}")
    _check_wig(wig, x.dtype, num_edges, entries, lmax, mmax)
    _, s_x, channels = x.shape
    if s_x < (lmax + 1) ** 2:
        raise ValueError(
            f"x must have at least (lmax+1)^2 = {(lmax + 1) ** 2} coefficients, got {s_x}"
        )
    device = _check_device({"x": x, "wig": wig, "idx": idx})

    y = torch.empty((num_edges, sides, rows, channels), dtype=x.dtype, device=device)
    if y.numel() == 0:
        return y
    meta = _gather_meta(channels)
    n_rows = num_edges * sides
    grid = (triton.cdiv(n_rows, meta["BLOCK_R"]), triton.cdiv(channels, meta["BLOCK_C"]))
    args = {"x_ptr": x, "wig_ptr": wig, "idx_ptr": idx, "y_ptr": y, "n_rows": n_rows,
            "num_nodes": x.shape[0], "C": channels, "x_node_stride": s_x * channels}  # fmt: skip
    kernel = _gather_rotate_kernel
    _launch("gather_rotate", kernel, grid, args, meta, lmax, mmax, sides, x.dtype, device)
    return y


def rotate_scatter(
    m: torch.Tensor,
    wig: torch.Tensor,
    perm: torch.Tensor,
    ptr: torch.Tensor,
    lmax: int,
    mmax: int,
    num_nodes: int,
):
    """Rotate edge messages back out of the edge frame and sum them into destination nodes.

    Args:
        m: (E, P, R, C) contiguous edge messages in the compact layout; float32, float64, bfloat16
            or float16.
        wig: (E, K) contiguous compact Wigner rows, float32 or m's dtype.
        perm: (P, E) int64 contiguous; per side p, the edges sorted by destination node (a value
            outside [0, E) is skipped, not read).
        ptr: (P, num_nodes + 1) int64 contiguous CSR offsets into perm[p] (ptr[p, 0] = 0,
            ptr[p, num_nodes] = E); not checked on the host; segments are clamped to [0, E).
        lmax, mmax: the resolution (mmax in {0, 1}).
        num_nodes: N.

    Returns:
        out (N, (lmax+1)^2, C) in m's dtype with ``out[n, l*l + b, c] = sum_p sum_{k in segment
        (p, n)} sum_a wig[e, off_l + a*(2l+1) + b] * m[e, p, row_off_l + a, c]``, e = perm[p, k],
        summed in the order p ascending, k ascending (deterministic); nodes without edges get 0.
    """
    _check_resolution(lmax, mmax)
    rows, entries = compact_sizes(lmax, mmax)
    _check_tensor("m", m, 4, _DTYPES)
    num_edges, sides, m_rows, channels = m.shape
    if sides < 1 or m_rows != rows:
        raise ValueError(
            f"m must have shape (E, P, R, C) with P >= 1 and R = {rows} for lmax={lmax}, "
            f"mmax={mmax}, got {tuple(m.shape)}"
        )
    _check_wig(wig, m.dtype, num_edges, entries, lmax, mmax)
    if not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 0:
        raise ValueError(f"num_nodes must be a non-negative int, got {num_nodes!r}")
    _check_tensor("perm", perm, 2, (torch.int64,))
    if tuple(perm.shape) != (sides, num_edges):
        raise ValueError(
            f"perm must have shape (P, E) = ({sides}, {num_edges}), got {tuple(perm.shape)}"
        )
    _check_tensor("ptr", ptr, 2, (torch.int64,))
    if tuple(ptr.shape) != (sides, num_nodes + 1):
        raise ValueError(
            f"ptr must have shape (P, num_nodes + 1) = ({sides}, {num_nodes + 1}), got {tuple(ptr.shape)}"
        )
    device = _check_device({"m": m, "wig": wig, "perm": perm, "ptr": ptr})

    size = (num_nodes, (lmax + 1) ** 2, channels)
    if num_edges == 0 or channels == 0:
        return torch.zeros(size, dtype=m.dtype, device=device)
    out = torch.empty(size, dtype=m.dtype, device=device)
    if out.numel() == 0:
        return out
    meta = _scatter_meta(lmax, channels)
    grid = (num_nodes, triton.cdiv(channels, meta["BLOCK_C"]))
    args = {"m_ptr": m, "wig_ptr": wig, "perm_ptr": perm, "ptr_ptr": ptr, "out_ptr": out,
            "num_nodes": num_nodes, "num_edges": num_edges, "C": channels}  # fmt: skip
    kernel = _rotate_scatter_kernel
    _launch("rotate_scatter", kernel, grid, args, meta, lmax, mmax, sides, m.dtype, device)
    return out


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile descriptions
# ----------------------------------------------------------------------------------------------


def launch_configs(
    lmax: int,
    mmax: int,
    channels: int,
    sides: int = 2,
    dtype: torch.dtype = torch.float32,
    wig_dtype: torch.dtype | None = None,
    num_edges: int = 50_000,
    num_nodes: int = 2_000,
    node_coeffs: int | None = None,
) -> list[LaunchConfig]:
    """The two kernel specialisations the launchers use for one problem, found by running them on
    meta tensors of its shapes (``kernels/aot.py``).

    ``node_coeffs`` is S_x of gather_rotate's x (default (lmax+1)^2). The integer sizes matter only
    through the JIT's specialisation (value 1, multiple of 16), as in a real launch.
    """
    _check_resolution(lmax, mmax)
    wig_dtype = dtype if wig_dtype is None else wig_dtype
    rows, entries = compact_sizes(lmax, mmax)
    s_x = (lmax + 1) ** 2 if node_coeffs is None else node_coeffs
    meta = torch.device("meta")
    wig = torch.empty((num_edges, entries), dtype=wig_dtype, device=meta)
    with aot.trace() as launches:
        gather_rotate(
            torch.empty((num_nodes, s_x, channels), dtype=dtype, device=meta),
            wig,
            torch.empty((num_edges, sides), dtype=torch.int64, device=meta),
            lmax,
            mmax,
        )
        rotate_scatter(
            torch.empty((num_edges, sides, rows, channels), dtype=dtype, device=meta),
            wig,
            torch.empty((sides, num_edges), dtype=torch.int64, device=meta),
            torch.empty((sides, num_nodes + 1), dtype=torch.int64, device=meta),
            lmax,
            mmax,
            num_nodes,
        )
    return aot.configs_of(launches)
