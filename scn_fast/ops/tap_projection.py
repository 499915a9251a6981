"""``scn_fast::tap_projection`` and ``scn_fast::gated_tap_projection``: upstream's ``fc1_edge_proj``
applied to every tap, without the tap-repeated input and with 41% of its FLOPs (DESIGN.md section 3),
optionally followed by upstream's activation and distance gate in the same op.

Upstream feeds fc1_edge_proj the rotated features of every tap, a_t = [Q_t y_src, Q_t y_tgt]
(E*T rows of width 2*R*C, Q_t a signed row permutation). With 4 taps the m = 0 rows are equal in all
taps and, on the m = +-1 rows, tap 2 = -tap 0 and tap 3 = -tap 1. Splitting the weight's columns
into the m = 0 part W0 and the m = +-1 part W1, with y0 / y1 the matching rows of y and y1' tap 1's
arrangement of y1 (within each degree the m = -1 and m = +1 rows swapped, with fixed signs):

    A = W0 y0 + b,  [B0; B1] = W1 [y1; y1']                  (two GEMMs)
    pre[:, 0] = A + B0,  pre[:, 1] = A + B1,  pre[:, 2] = A - B0,  pre[:, 3] = A - B1

(R0 + 2 R1) row blocks of GEMM instead of 4 R, exactly, in forward and backward. With one tap it is
the plain linear map. ``gated_tap_projection`` returns silu(pre) * gate and keeps A and B (3 E H
numbers) for its backward instead of pre and silu(pre) (8 E H).

Data movement: y (E, 2, R, C) and the weight (H, 2, R, C) are viewed as 2R rows of C channels; one
``index_select`` per operand gathers the rows a GEMM needs into a contiguous buffer (for y: y0, and
[y1 | y1'] side by side so that (E, 2 * 2R1 * C) is read as the (2E, 2R1 * C) matrix [y1; y1']
interleaved by edge; for the weight: [W0 | W1] as column blocks of one buffer that the GEMMs read with
a leading dimension). The weight gradient is written by the GEMMs straight into such a buffer and
gathered back to upstream's column order in one pass.
The fused model holds the weight in tap order already (``weight_order="tap"``, ``scn_fast.tap_order``):
W0 and W1 are then its two column blocks, nothing of the weight is gathered, and the weight
gradient is written in place; the extension splits y in one pass (``tap_split``) and assembles dy
in one (``tap_assemble``).

Shapes: y (E, 2, R, C), weight (H, 2*R*C), bias (H,), gate (E, H) -> (E, T, H).
Precision: "fp32" (or float64 inputs) runs the GEMMs as given; "tf32" / "bf16" round every GEMM
operand (forward and backward) as ``scn_fast.precision`` does for a Linear, natively or emulated.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch.nn import functional as F

from .. import so3
from ..precision import gemm_inputs, gemm_mm
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


def _tap_ordered(weight_order: str, lmax: int, mmax: int, num_taps: int) -> bool:
    if weight_order not in ("upstream", "tap"):
        raise ValueError(f"weight_order must be 'upstream' or 'tap', got {weight_order!r}")
    if weight_order == "tap" and not has_tap_order(lmax, mmax, num_taps):
        raise ValueError(
            f"weight_order='tap' needs 4 taps (mmax = 1, num_taps != 1); got lmax={lmax}, "
            f"mmax={mmax}, num_taps={num_taps}"
        )
    return weight_order == "tap"


def _reorder(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """weight (H, 2R * C) with its 2R column blocks in the order ``rows`` (a copy)."""
    h = weight.shape[0]
    return weight.reshape(h, rows.numel(), -1).index_select(1, rows).reshape(h, -1)


def to_tap_order(weight: torch.Tensor, lmax: int, mmax: int, num_taps: int) -> torch.Tensor:
    """fc1_edge_proj's weight (H, 2RC) with its columns in tap order: the m = 0 rows of both sides,
    then the m = +-1 rows (``TapRows.w_rows``), so that W0 and W1 are its two column blocks. The
    fused model holds its weight (and so its gradient and optimizer state) this way; a copy."""
    rows = tap_rows(lmax, mmax, num_taps, weight.device)
    return _reorder(weight, rows.w_rows)


def from_tap_order(weight: torch.Tensor, lmax: int, mmax: int, num_taps: int) -> torch.Tensor:
    """The inverse of :func:`to_tap_order` (upstream's column order); differentiable."""
    rows = tap_rows(lmax, mmax, num_taps, weight.device)
    return _reorder(weight, rows.w_inv)


def _signs_of_tap1(t: torch.Tensor, rows: TapRows) -> torch.Tensor:
    """Apply tap 1's signs, in place, to the second half of a (B, 2 n1, C) pair-row tensor."""
    b, _, c = t.shape
    half = t[:, rows.n1 :].view(b, rows.n1 // 2, 2, c)
    for k in rows.neg_slots:
        half[:, :, k].neg_()
    return t


def _pair_rows(y3: torch.Tensor, rows: TapRows, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """[y1 | y1'] (E, 2 n1, C) of y3 (E, 2R, C) in dtype, in a workspace (scratch for this call)."""
    e, _, c = y3.shape
    pair = scratch((e, 2 * rows.n1, c), dtype, y3.device, backend)
    _gather_rows(y3, rows.pair_rows, pair, backend)
    return _signs_of_tap1(pair, rows)


def _split_input(
    y: torch.Tensor, rows: TapRows, dtype: torch.dtype, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (E, 2, R, C) -> y0 (E, 2 R0 C) and [y1; y1'] (2E, 2 R1 C) (rows interleaved by edge), in
    dtype, in workspaces (scratch for this call): the extension's one-pass ``tap_split`` (gather
    and tap 1's signs together) where it applies, else gathers and a sign pass."""
    e, _, r, c = y.shape
    y3 = y.reshape(e, 2 * r, c)
    y0 = scratch((e, rows.n0, c), dtype, y.device, backend)
    if backend == "extension" and dtype == y.dtype and dtype in (torch.float32, torch.float64):
        pair = scratch((e, 2 * rows.n1, c), dtype, y.device, backend)
        _ext().tap_split(y3.contiguous(), rows.y0_rows, rows.pair_rows, rows.pair_signs, y0, pair)
        return y0.view(e, rows.n0 * c), pair.view(2 * e, rows.n1 * c)
    _gather_rows(y3, rows.y0_rows, y0, backend)
    return y0.view(e, rows.n0 * c), _pair_rows(y3, rows, dtype, backend).view(2 * e, rows.n1 * c)


def _native_bf16(t: torch.Tensor, precision: str, native: bool) -> bool:
    """Whether t's GEMMs run as native bf16 GEMMs (precision "bf16" on bf16 units, float32 t)."""
    return precision == "bf16" and native and t.dtype == torch.float32


def _gathered_dtype(y: torch.Tensor, precision: str, native: bool) -> torch.dtype:
    """The dtype the gathered form gathers y's rows into: bf16 for native bf16 GEMMs (gather and
    cast in one pass), else y's own."""
    return torch.bfloat16 if _native_bf16(y, precision, native) else y.dtype


def _ext():
    from ..extension import load_extension

    return load_extension()


def scratch(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, backend: str
) -> torch.Tensor:
    """An uninitialised temporary of one call (never returned or saved): from the extension's CPU
    block cache when the extension runs the op on CPU (a freed block comes back for the next call
    instead of being page-faulted in again: 1.5 us per 4 KiB page measured on a 2-core VM, 50 ms
    instead of 1.5 ms for one 20 MB gather when two threads fault at once), else ``torch.empty``."""
    if backend == "extension" and torch.device(device).type == "cpu":
        return _ext().cached_empty(list(shape), dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def _result_buffer(shape: tuple[int, ...], like: torch.Tensor, backend: str) -> torch.Tensor:
    """An uninitialised tensor for a large result that leaves the op (a weight gradient, dy): from
    the extension's CPU block cache when the extension runs the op on CPU (a freed block comes back
    for the next step instead of being page-faulted in again, ``scn_fast.release_cpu_cache``), else
    ``like.new_empty``."""
    if backend == "extension" and like.device.type == "cpu" and like.dtype.is_floating_point:
        return _ext().cached_empty(list(shape), like.dtype)
    return like.new_empty(shape)


def _gather_rows(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor, backend: str) -> None:
    """out[:, j] = src[:, idx[j]] (3-D, rows along dim 1) in out's dtype: the extension's one-pass
    gather-and-cast when it runs the op, else ATen's index_select (and a cast)."""
    if backend == "extension":
        _ext().gather_rows_out(src.contiguous(), idx, out)
    elif src.dtype == out.dtype:
        torch.index_select(src, 1, idx, out=out)
    else:
        out.copy_(src.index_select(1, idx))


def _weight_operands(
    weight: torch.Tensor,
    rows: TapRows,
    c: int,
    precision: str,
    native: bool,
    backend: str,
    tap_ordered: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """W0 (H, 2 R0 C) and W1 (H, 2 R1 C) as GEMM operands: column blocks (views) of one gathered
    (H, 2R, C) workspace (scratch: valid until the next call), in bf16 for native bf16 GEMMs; of the
    weight itself when it is held in tap order (``tap_ordered``)."""
    h = weight.shape[0]
    if tap_ordered:
        split = rows.n0 * c
        return gemm_inputs((weight[:, :split], weight[:, split:]), precision, native)
    w3 = weight.reshape(h, -1, c)
    bf16 = _native_bf16(weight, precision, native)
    wp = scratch(w3.shape, torch.bfloat16 if bf16 else w3.dtype, w3.device, backend)
    _gather_rows(w3, rows.w_rows, wp, backend)
    w0, w1 = wp[:, : rows.n0].reshape(h, -1), wp[:, rows.n0 :].reshape(h, -1)
    if not bf16:
        w0, w1 = gemm_inputs((w0, w1), precision, native)
    return w0, w1


def _combine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """pre (E, 4, H) = [A + B0, A + B1, A - B0, A - B1] from A (E, H) and B (E, 2, H)."""
    e, h = a.shape
    pre = a.new_empty((e, 2, 2, h))
    torch.add(a.unsqueeze(1), b, out=pre[:, 0])
    torch.sub(a.unsqueeze(1), b, out=pre[:, 1])
    return pre.view(e, 4, h)


@dataclass
class _Projection:
    """Forward GEMMs of one call: A (E, H) with the bias, B (E, 2, H) (None with one tap)."""

    a: torch.Tensor
    b: torch.Tensor | None


def _row_blocked(y: torch.Tensor, precision: str, native: bool) -> bool:
    """Whether to run the GEMMs per block of consecutive rows (K or N = a few times C), reading and
    writing the weight and its gradient where they lie (CPU, float32/float64 operands), rather than
    gathering the weight into [W0 | W1] first (elsewhere).

    On CPU the gather is a 20 MB copy per call at scn-t4-b2 and costs more than it saves: the block
    GEMMs (strided operands, leading dimension 2RC) ran 8.4 ms against 9.7 ms for gather + 2 GEMMs at
    E = 168 (2 threads), and write the weight gradient in place (no scratch copy, no gather back). On
    a GPU the gather takes microseconds and 2 large GEMMs beat 2R launches. Native bf16 GEMMs (oneDNN
    on CPU) have a large fixed cost per call and round every block's output to bf16, so they take
    the gathered form too (measured: a bf16 training step at scn-t4-b2 took 1.33 s with a blocked
    bf16 backward against 1.25 s gathered)."""
    return y.device.type == "cpu" and not _native_bf16(y, precision, native)


def _blocked(gemm: str, y: torch.Tensor, precision: str, native: bool, tap_ordered: bool) -> bool:
    """Whether the 4-tap GEMMs run per row block: as the plan names it (``gemm``), else by
    :func:`_row_blocked` (direct calls of the op)."""
    if gemm:
        return gemm == "row_blocked"
    return not tap_ordered and _row_blocked(y, precision, native)


def _project(
    y, weight, bias, lmax, mmax, num_taps, precision, native, backend, tap_ordered=False, gemm=""
) -> _Projection:
    e, _, r, c = y.shape
    h = weight.shape[0]
    if tap_symmetry(lmax, mmax, num_taps).num_taps == 1:
        ys, ws = gemm_inputs((y.reshape(e, 2 * r * c), weight), precision, native)
        return _Projection(gemm_mm(ys, ws.t(), precision, native).add_(bias), None)
    rows = tap_rows(lmax, mmax, num_taps, y.device)
    if _blocked(gemm, y, precision, native, tap_ordered):
        y3, w3 = gemm_inputs(
            (y.reshape(e, 2 * r, c), weight.reshape(-1, 2 * r, c)), precision, native
        )
        pair = _pair_rows(y3, rows, y3.dtype, backend).view(2 * e, rows.n1, c)
        if backend == "extension":
            a, b = _ext().tap_blocked_forward(y3, pair, w3, bias, rows.flat0, rows.flat1)
            return _Projection(a, b.view(e, 2, h))
        a = b = None
        for _, k, n in rows.runs0:
            lhs, rhs = y3[:, k : k + n].reshape(e, n * c), w3[:, k : k + n].reshape(h, -1).t()
            a = torch.addmm(bias, lhs, rhs) if a is None else a.addmm_(lhs, rhs)
        for j, k, n in rows.runs1:
            lhs = pair[:, j : j + n].reshape(2 * e, n * c)
            rhs = w3[:, k : k + n].reshape(h, -1).t()
            b = torch.mm(lhs, rhs) if b is None else b.addmm_(lhs, rhs)
        return _Projection(a, b.view(e, 2, h))
    split = _split_input(y, rows, _gathered_dtype(y, precision, native), backend)
    y0, pair = gemm_inputs(split, precision, native)
    w0, w1 = _weight_operands(weight, rows, c, precision, native, backend, tap_ordered)
    a = gemm_mm(y0, w0.t(), precision, native).add_(bias)
    b = gemm_mm(pair, w1.t(), precision, native).view(e, 2, h)
    return _Projection(a, b)


def _assemble_dy(dy: torch.Tensor, dpair: torch.Tensor, rows: TapRows) -> torch.Tensor:
    """Fill the m = +-1 rows of dy (E, 2R, C) from the pair-row gradient dpair (E, 2 n1, C): y1's
    own part plus y1''s with tap 1's signs and swap undone."""
    e, _, c = dy.shape
    dpair = _signs_of_tap1(dpair, rows)
    swapped = dpair[:, rows.n1 :].view(e, rows.n1 // 2, 2, c).flip(2).view(e, rows.n1, c)
    return dy.index_copy_(1, rows.pair_rows[: rows.n1], dpair[:, : rows.n1].add_(swapped))


def _project_backward(
    dpre, y, weight, lmax, mmax, num_taps, precision, native, backend, tap_ordered=False, gemm=""
):
    """(dy, dweight, dbias) of pre = projection(y) for dpre (E, T, H)."""
    e, h = y.shape[0], weight.shape[0]
    sym = tap_symmetry(lmax, mmax, num_taps)
    if sym.num_taps == 1:
        d = dpre.reshape(e, h)
        ys, ws, ds = gemm_inputs((y.reshape(e, y[0].numel()), weight, d), precision, native)
        dy = gemm_mm(ds, ws, precision, native).view_as(y)
        dw = gemm_mm(ds.t(), ys, precision, native)
        return dy, dw, d.sum(0)
    d4 = dpre.view(e, 2, 2, h)
    da, db = d4.sum((1, 2)), torch.sub(d4[:, 0], d4[:, 1])
    return _project_backward_ab(
        da, db, y, weight, lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm
    )


def _assemble(dy0: torch.Tensor, dpair: torch.Tensor, rows: TapRows, backend: str) -> torch.Tensor:
    """dy (E, 2R, C) from the gradients of the split's two parts, dy0 (E, n0, C) and dpair
    (E, 2 n1, C): the extension's one pass (``tap_assemble``) or ATen ops."""
    if backend == "extension" and dy0.dtype in (torch.float32, torch.float64):
        return _ext().tap_assemble(
            dy0.contiguous(),
            dpair.contiguous(),
            rows.assemble_a,
            rows.assemble_b,
            rows.assemble_sign,
        )
    e, _, c = dy0.shape
    dy = dy0.new_empty((e, rows.assemble_a.numel(), c))
    dy.index_copy_(1, rows.y0_rows, dy0)
    return _assemble_dy(dy, dpair, rows)


def _tap_ordered_weight_grad(da, db, y0, pair, weight, precision, native, backend) -> torch.Tensor:
    """The tap-ordered weight's gradient [dA^T y0 | dB^T [y1; y1']] (H, 2RC), written in place by its
    two GEMMs: da (E, H), db (2E, H), y0 (E, n0 C), pair (2E, n1 C) as GEMM operands."""
    dw = _result_buffer(tuple(weight.shape), weight, backend)
    cut = y0.shape[1]
    gemm_mm(da.t(), y0, precision, native, out=dw[:, :cut])
    gemm_mm(db.t(), pair, precision, native, out=dw[:, cut:])
    return dw


def _project_backward_ab(
    da,
    db,
    y,
    weight,
    lmax,
    mmax,
    num_taps,
    precision,
    native,
    backend,
    tap_ordered=False,
    gemm="",
):
    """(dy, dweight, dbias) of the 4-tap projection from the gradients of A (E, H) and B (E, 2, H);
    dweight in the weight's own column order (upstream's, or tap order)."""
    e, _, r, c = y.shape
    h = weight.shape[0]
    rows = tap_rows(lmax, mmax, num_taps, y.device)
    db = db.reshape(2 * e, h)  # [dB0, dB1] interleaved by edge
    if _blocked(gemm, y, precision, native, tap_ordered):
        dy = _result_buffer((e, 2 * r, c), y, backend)
        y3, w3, da_s, db_s = gemm_inputs(
            (y.reshape(e, 2 * r, c), weight.reshape(h, 2 * r, c), da, db), precision, native
        )
        pair = _pair_rows(y3, rows, y3.dtype, backend).view(2 * e, rows.n1, c)
        dpair = scratch((2 * e, rows.n1, c), y.dtype, y.device, backend)
        if backend == "extension":
            dw = _ext().tap_blocked_backward(
                da_s, db_s, y3, pair, w3, rows.flat0, rows.flat1, dy, dpair
            )
            _assemble_dy(dy, dpair.view(e, 2 * rows.n1, c), rows)
            return dy.view_as(y), dw, da.sum(0)
        dw = _result_buffer((h, 2 * r, c), weight, backend)

        def mm(a, b, out):
            gemm_mm(a, b, precision, native, out=out)

        for _, k, n in rows.runs0:
            wk, dwk = w3[:, k : k + n].reshape(h, -1), dw[:, k : k + n].reshape(h, -1)
            mm(da_s, wk, dy[:, k : k + n].reshape(e, n * c))
            mm(da_s.t(), y3[:, k : k + n].reshape(e, n * c), dwk)
        for j, k, n in rows.runs1:
            wk, dwk = w3[:, k : k + n].reshape(h, -1), dw[:, k : k + n].reshape(h, -1)
            mm(db_s, wk, dpair[:, j : j + n].reshape(2 * e, n * c))
            mm(db_s.t(), pair[:, j : j + n].reshape(2 * e, n * c), dwk)
        _assemble_dy(dy, dpair.view(e, 2 * rows.n1, c), rows)
        return dy.view_as(y), dw.view(h, -1), da.sum(0)
    split = _split_input(y, rows, _gathered_dtype(y, precision, native), backend)
    y0, pair, da_s, db_s = gemm_inputs((*split, da, db), precision, native)
    w0, w1 = _weight_operands(weight, rows, c, precision, native, backend, tap_ordered)
    # dy: the m = 0 rows from A; the m = +-1 rows from B0 plus B1's part with tap 1 undone.
    # (scratch: read once by the assembly)
    dy0 = scratch((e, rows.n0, c), y.dtype, y.device, backend)
    dpair = scratch((2 * e, rows.n1, c), y.dtype, y.device, backend)
    gemm_mm(da_s, w0, precision, native, out=dy0.view(e, rows.n0 * c))
    gemm_mm(db_s, w1, precision, native, out=dpair.view(2 * e, rows.n1 * c))
    dy = _assemble(dy0, dpair.view(e, 2 * rows.n1, c), rows, backend).view(e, 2, r, c)
    if tap_ordered:
        dw = _tap_ordered_weight_grad(da_s, db_s, y0, pair, weight, precision, native, backend)
        return dy, dw, da.sum(0)
    # dweight: both GEMMs write into the [W0 | W1] buffer (bf16 for native bf16 GEMMs, whose
    # results are bf16), gathered back to upstream's order and float32 in one pass.
    dwp = scratch((h, 2 * r, c), da_s.dtype, weight.device, backend)
    gemm_mm(da_s.t(), y0, precision, native, out=dwp[:, : rows.n0].reshape(h, -1))
    gemm_mm(db_s.t(), pair, precision, native, out=dwp[:, rows.n0 :].reshape(h, -1))
    dw = _result_buffer((h, 2 * r, c), weight, backend)
    _gather_rows(dwp, rows.w_inv, dw, backend)
    return dy, dw.view(h, -1), da.sum(0)


# ----------------------------------------------------------------------------- ungated op
@torch.library.custom_op("scn_fast::tap_projection", mutates_args=())
def _tap_projection(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    lmax: int,
    mmax: int,
    num_taps: int,
    precision: str,
    native: bool,
    backend: str,
    tap_ordered: bool,
    gemm: str = "",
) -> torch.Tensor:
    p = _project(
        y.contiguous(),
        weight,
        bias,
        lmax,
        mmax,
        num_taps,
        precision,
        native,
        backend,
        tap_ordered,
        gemm,
    )
    out = p.a.unsqueeze(1) if p.b is None else _combine(p.a, p.b)
    return out.to(y.dtype)


def _fake_out(y, weight, lmax, mmax, num_taps):
    t = tap_symmetry(lmax, mmax, num_taps).num_taps
    return y.new_empty((y.shape[0], t, weight.shape[0]))


@_tap_projection.register_fake
def _(y, weight, bias, lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm=""):
    return _fake_out(y, weight, lmax, mmax, num_taps)


def _setup_context(ctx, inputs, output):
    y, weight, _bias, *meta = inputs
    ctx.save_for_backward(y, weight)
    ctx.meta = tuple(meta)


@torch.library.custom_op("scn_fast::tap_projection_backward", mutates_args=())
def _tap_projection_backward(
    dpre: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    lmax: int,
    mmax: int,
    num_taps: int,
    precision: str,
    native: bool,
    backend: str,
    tap_ordered: bool,
    gemm: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    meta = (lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm)
    dy, dw, db = _project_backward(dpre.to(y.dtype), y.contiguous(), weight, *meta)
    return dy.to(y.dtype), dw.contiguous(), db


@_tap_projection_backward.register_fake
def _(dpre, y, weight, lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm=""):
    return torch.empty_like(y), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _backward(ctx, dpre):
    y, weight = ctx.saved_tensors
    dy, dw, db = _tap_projection_backward(dpre, y, weight, *ctx.meta)
    return dy, dw, db, None, None, None, None, None, None, None, None


_tap_projection.register_autograd(_backward, setup_context=_setup_context)


def tap_projection(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    lmax: int,
    mmax: int,
    num_taps: int,
    precision: str = "fp32",
    native: bool = True,
    backend: str = "reference",
    weight_order: str = "upstream",
) -> torch.Tensor:
    """Pre-activations (E, T, H) of fc1_edge_proj for every tap of the rotated features y (E, 2, R, C).
    ``backend``: "extension" gathers the weight with the extension's one-pass kernel (where the
    gathered form runs); anything else uses ATen ops. ``weight_order``: the weight's columns as
    upstream holds them ("upstream") or in tap order ("tap", :func:`to_tap_order`; 4 taps only)."""
    tap_ordered = _tap_ordered(weight_order, lmax, mmax, num_taps)
    return _tap_projection(
        y, weight, bias, lmax, mmax, num_taps, precision, native, backend, tap_ordered
    )


# ----------------------------------------------------------------------------- gated op
def _gate_pre(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.unsqueeze(1) if b.shape[1] == 0 else _combine(a, b)


def _gate_forward_composite(a, b, gate):
    return F.silu(_gate_pre(a, b).clone()).mul_(gate.unsqueeze(1))


def _gate_backward_composite(dm, a, b, gate):
    pre = _gate_pre(a, b)
    dgate = (dm * F.silu(pre)).sum(1)
    dpre = torch.ops.aten.silu_backward(dm * gate.unsqueeze(1), pre)
    if b.shape[1] == 0:
        return dpre.squeeze(1), torch.empty_like(b), dgate
    d4 = dpre.view(a.shape[0], 2, 2, a.shape[1])
    return d4.sum((1, 2)), torch.sub(d4[:, 0], d4[:, 1]), dgate


def _gate_impl(backend: str, dtype: torch.dtype):
    """(forward, backward) of the gate epilogue: the backend's fused kernels (float32/float64),
    else ATen ops."""
    if dtype in (torch.float32, torch.float64):
        if backend == "extension":
            from ..extension import load_extension

            ext = load_extension()
            return ext.tap_gate_forward, ext.tap_gate_backward
        if backend == "triton":
            from ..kernels import tap_elementwise

            return tap_elementwise.tap_gate_forward, tap_elementwise.tap_gate_backward
    return _gate_forward_composite, _gate_backward_composite


def _gated_forward(y, weight, bias, gate, *meta):
    p = _project(y.contiguous(), weight, bias, *meta)
    backend = meta[5]
    a = p.a.to(y.dtype)
    b = a.new_empty((a.shape[0], 0, a.shape[1])) if p.b is None else p.b.to(y.dtype)
    forward, _ = _gate_impl(backend, a.dtype)
    return forward(a, b, gate.contiguous()), a, b


@torch.library.custom_op("scn_fast::gated_tap_projection", mutates_args=())
def _gated(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate: torch.Tensor,
    lmax: int,
    mmax: int,
    num_taps: int,
    precision: str,
    native: bool,
    backend: str,
    tap_ordered: bool,
    gemm: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(silu(pre) * gate, A, B): A and B are what the backward needs (dropped by the caller when
    nothing is recorded for autograd). The backward splits y again (one pass) rather than keeping
    the split: y1' repeats y1, so the split is 1.6x y's size at L = 6."""
    meta = (lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm)
    return _gated_forward(y, weight, bias, gate, *meta)


@_gated.register_fake
def _(
    y, weight, bias, gate, lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm=""
):
    out = _fake_out(y, weight, lmax, mmax, num_taps)
    e, t, h = out.shape
    return out, y.new_empty((e, h)), y.new_empty((e, 2 if t == 4 else 0, h))


def _gated_setup(ctx, inputs, output):
    y, weight, _bias, gate, *meta = inputs
    _, a, b = output
    ctx.save_for_backward(y, weight, gate, a, b)
    ctx.meta = tuple(meta)
    # a and b are outputs only to be saved: no zero-filled (E, T, H)-sized gradients for them
    ctx.set_materialize_grads(False)


@torch.library.custom_op("scn_fast::gated_tap_projection_backward", mutates_args=())
def _gated_tap_projection_backward(
    dout: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    lmax: int,
    mmax: int,
    num_taps: int,
    precision: str,
    native: bool,
    backend: str,
    tap_ordered: bool,
    gemm: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _, backward = _gate_impl(backend, a.dtype)
    dpre_a, dpre_b, dgate = backward(dout.to(a.dtype).contiguous(), a, b, gate.contiguous())
    meta = (lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm)
    if b.shape[1] == 0:
        dy, dw, dbias = _project_backward(dpre_a.unsqueeze(1), y.contiguous(), weight, *meta)
    else:
        dy, dw, dbias = _project_backward_ab(dpre_a, dpre_b, y.contiguous(), weight, *meta)
    return dy.to(y.dtype), dw.contiguous(), dbias, dgate.to(gate.dtype)


@_gated_tap_projection_backward.register_fake
def _(
    dout,
    y,
    weight,
    gate,
    a,
    b,
    lmax,
    mmax,
    num_taps,
    precision,
    native,
    backend,
    tap_ordered,
    gemm="",
):
    h = weight.shape[0]
    return (
        torch.empty_like(y),
        torch.empty_like(weight),
        weight.new_empty(h),
        torch.empty_like(gate),
    )


def _gated_backward(ctx, dout, _da, _db):
    if dout is None:  # the output took no part in the loss
        return (None,) * 12
    y, weight, gate, a, b = ctx.saved_tensors
    dy, dw, dbias, dgate = _gated_tap_projection_backward(dout, y, weight, gate, a, b, *ctx.meta)
    return dy, dw, dbias, dgate, None, None, None, None, None, None, None, None


_gated.register_autograd(_gated_backward, setup_context=_gated_setup)


def gated_tap_projection(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate: torch.Tensor,
    lmax: int,
    mmax: int,
    num_taps: int,
    precision: str = "fp32",
    native: bool = True,
    backend: str = "reference",
    weight_order: str = "upstream",
    gemm: str = "",
) -> torch.Tensor:
    """silu(pre) * gate (E, T, H): upstream's ``act(fc1_edge_proj(a_t)) * act(fc1_dist(x_edge))`` for
    every tap, from the rotated features y (E, 2, R, C) and gate (E, H). ``backend``: whose fused
    kernels run the elementwise epilogue ("extension", "triton"; anything else: ATen ops);
    ``weight_order``: "upstream" or "tap" (as in :func:`tap_projection`); ``gemm``: the plan's GEMM
    strategy ("row_blocked", "gathered", "tap_ordered", "dense"; "" chooses by device)."""
    tap_ordered = _tap_ordered(weight_order, lmax, mmax, num_taps)
    meta = (lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm)
    return _gated(y, weight, bias, gate, *meta)[0]


# ----------------------------------------------------------------------------- split operands
@torch.library.custom_op("scn_fast::gated_tap_projection_split", mutates_args=())
def _gated_split(
    y0: torch.Tensor,
    pair: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(silu(pre) * gate, A, B) from the split operands (module doc): A = y0 W0^T + b, B = [y1; y1']
    W1^T, W0 and W1 the tap-ordered weight's two column blocks. float32/float64 GEMMs as given."""
    e, n0, c = y0.shape
    h, cut = weight.shape[0], n0 * c
    a = torch.mm(y0.view(e, cut), weight[:, :cut].t()).add_(bias)
    b = torch.mm(pair.view(2 * e, pair.shape[1] // 2 * c), weight[:, cut:].t()).view(e, 2, h)
    forward, _ = _gate_impl(backend, a.dtype)
    return forward(a, b, gate.contiguous()), a, b


@_gated_split.register_fake
def _(y0, pair, weight, bias, gate, backend):
    e, h = y0.shape[0], weight.shape[0]
    return y0.new_empty((e, 4, h)), y0.new_empty((e, h)), y0.new_empty((e, 2, h))


def _gated_split_setup(ctx, inputs, output):
    y0, pair, weight, _bias, gate, backend = inputs
    _, a, b = output
    ctx.save_for_backward(y0, pair, weight, gate, a, b)
    ctx.backend = backend
    ctx.set_materialize_grads(False)


@torch.library.custom_op("scn_fast::gated_tap_projection_split_backward", mutates_args=())
def _gated_split_backward_op(
    dout: torch.Tensor,
    y0: torch.Tensor,
    pair: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy0, dpair, dweight, dbias, dgate): dy0 = dA W0, dpair = [dB0; dB1] W1 (not assembled: the
    split rotation's backward does that), dweight = [dA^T y0 | dB^T [y1; y1']] written in place."""
    e, n0, c = y0.shape
    h, cut = weight.shape[0], n0 * c
    n_pair = pair.shape[1]
    _, backward = _gate_impl(backend, a.dtype)
    da, db, dgate = backward(dout.contiguous(), a, b, gate.contiguous())
    db = db.reshape(2 * e, h)
    dy0 = torch.mm(da, weight[:, :cut]).view(e, n0, c)
    dpair = torch.mm(db, weight[:, cut:]).view(e, n_pair, c)
    y0_2d, pair_2d = y0.view(e, cut), pair.view(2 * e, n_pair // 2 * c)
    dw = _tap_ordered_weight_grad(da, db, y0_2d, pair_2d, weight, "fp32", True, backend)
    return dy0, dpair, dw, da.sum(0), dgate


@_gated_split_backward_op.register_fake
def _(dout, y0, pair, weight, gate, a, b, backend):
    h = weight.shape[0]
    return (
        torch.empty_like(y0),
        torch.empty_like(pair),
        torch.empty_like(weight),
        weight.new_empty(h),
        torch.empty_like(gate),
    )


def _gated_split_backward(ctx, dout, _da, _db):
    if dout is None:
        return (None,) * 6
    y0, pair, weight, gate, a, b = ctx.saved_tensors
    dy0, dpair, dw, dbias, dgate = _gated_split_backward_op(
        dout, y0, pair, weight, gate, a, b, ctx.backend
    )
    return dy0, dpair, dw, dbias, dgate, None


_gated_split.register_autograd(_gated_split_backward, setup_context=_gated_split_setup)


def split_operands_apply(
    y: torch.Tensor, weight: torch.Tensor, mmax: int, taps: int, precision: str
) -> bool:
    """Whether :func:`gated_tap_projection_split` can take this call: mmax = 1 with 4 taps (``taps``:
    the resolution's tap count, the tap symmetry's case), float32/float64 operands whose GEMMs run as
    given (precision "fp32", or float64), on CPU (where the extension's split rotation writes the
    operands)."""
    return (
        y.device.type == "cpu"
        and y.dtype in (torch.float32, torch.float64)
        and weight.dtype == y.dtype
        and (precision == "fp32" or y.dtype == torch.float64)
        and mmax == 1
        and taps == 4
    )


def gated_tap_projection_split(
    y0: torch.Tensor,
    pair: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    gate: torch.Tensor,
    backend: str = "extension",
) -> torch.Tensor:
    """:func:`gated_tap_projection` (4 taps, weight in tap order) from the split operands that
    ``edge_rotation_split`` writes: y0 (E, n0, C), pair (E, 2 n1, C), gate (E, H) -> (E, 4, H). The
    backward returns (dy0, dpair) unassembled, for the split rotation's backward."""
    return _gated_split(y0, pair, weight, bias, gate, backend)[0]
