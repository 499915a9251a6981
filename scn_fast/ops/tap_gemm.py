"""The GEMM strategies of the tap projection (``tap_projection`` for the math):

    A = W0 y0 + b,  [B0; B1] = W1 [y1; y1']

* "dense" (one tap): the plain linear map;
* "row_blocked" (CPU, upstream's weight order): GEMMs per block of consecutive weight rows, the
  weight and its gradient read and written where they lie (the extension's loop, or ATen's);
* "gathered": y split into y0 / [y1 | y1'] and the weight gathered into [W0 | W1] (GPUs, native
  bf16 GEMMs);
* "tap_ordered": y split, the weight held in tap order already (the fused model): its two column
  blocks read and its gradient written in place.

The plan names the strategy (``scn_fast.planning``); a direct call of the op without one takes
:func:`_row_blocked`'s rule. Forward: :func:`_project` -> A (E, H), B (E, 2, H). Backward:
:func:`_project_backward` / :func:`_project_backward_ab` -> (dy, dweight, dbias).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..precision import gemm_inputs, gemm_mm
from .layout import tap_symmetry
from .tap_buffers import (
    _assemble,
    _assemble_dy,
    _ext,
    _gather_rows,
    _gathered_dtype,
    _native_bf16,
    _pair_rows,
    _result_buffer,
    _split_input,
    scratch,
)
from .tap_rows import TapRows, tap_rows


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
    (H, 2R, C) scratch buffer of this call, in bf16 for native bf16 GEMMs; of the
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
    if backend == "triton":  # the bias in the GEMM: one launch (the Triton path runs on GPUs)
        a = gemm_mm(y0, w0.t(), precision, native, bias=bias)
    else:
        a = gemm_mm(y0, w0.t(), precision, native).add_(bias)
    b = gemm_mm(pair, w1.t(), precision, native).view(e, 2, h)
    return _Projection(a, b)


def _project_backward(
    dpre, y, weight, lmax, mmax, num_taps, precision, native, backend, tap_ordered=False, gemm=""
):
    """(dy, dweight, dbias) of pre = projection(y) for dpre (E, T, H)."""
    e, h = y.shape[0], weight.shape[0]
    sym = tap_symmetry(lmax, mmax, num_taps)
    if sym.num_taps == 1:
        d = dpre.reshape(e, h)
        ys, ws, ds = gemm_inputs((y.reshape(e, y.shape[1:].numel()), weight, d), precision, native)
        dy = gemm_mm(ds, ws, precision, native).view_as(y)
        dw = gemm_mm(ds.t(), ys, precision, native)
        return dy, dw, d.sum(0)
    d4 = dpre.view(e, 2, 2, h)
    da, db = d4.sum((1, 2)), torch.sub(d4[:, 0], d4[:, 1])
    return _project_backward_ab(
        da, db, y, weight, lmax, mmax, num_taps, precision, native, backend, tap_ordered, gemm
    )


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
