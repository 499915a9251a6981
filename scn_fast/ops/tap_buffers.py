"""Where the tap projection's operands live and how its rows move: the buffer policy (scratch of one
call, results that leave the op) and the row gathers (the split of y into the two GEMM operands,
its adjoint, the weight's column gathers), each in one pass on the extension where it runs the
op, else in ATen ops.

y (E, 2, R, C) viewed as (E, 2R, C); y0 (E, n0, C) its m = 0 rows; pair (E, 2 n1, C) its
m = +-1 rows then tap 1's arrangement of them ([y1 | y1'], read as the (2E, n1 C) matrix
[y1; y1'] interleaved by edge); rows as in :class:`~.tap_rows.TapRows`.
"""

from __future__ import annotations

import torch

from .tap_rows import TapRows


def _signs_of_tap1(t: torch.Tensor, rows: TapRows) -> torch.Tensor:
    """Apply tap 1's signs, in place, to the second half of a (B, 2 n1, C) pair-row tensor."""
    b, _, c = t.shape
    half = t[:, rows.n1 :].view(b, rows.n1 // 2, 2, c)
    for k in rows.neg_slots:
        half[:, :, k].neg_()
    return t


def _pair_rows(y3: torch.Tensor, rows: TapRows, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """[y1 | y1'] (E, 2 n1, C) of y3 (E, 2R, C) in dtype, in scratch of this call (:func:`scratch`)."""
    e, _, c = y3.shape
    pair = scratch((e, 2 * rows.n1, c), dtype, y3.device, backend)
    _gather_rows(y3, rows.pair_rows, pair, backend)
    return _signs_of_tap1(pair, rows)


def _triton_split(y: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether Triton's ``tap_split`` gathers y into ``dtype``: float32 / float64 as they are,
    float32 into bfloat16 off the CPU (Triton's interpreter, which runs the kernels on CPU
    tensors, truncates float32 to bfloat16 where a GPU rounds to nearest even, so interpreted
    runs take the ATen gathers)."""
    if dtype == y.dtype and dtype in (torch.float32, torch.float64):
        return True
    return dtype == torch.bfloat16 and y.dtype == torch.float32 and y.device.type != "cpu"


def _split_input(
    y: torch.Tensor, rows: TapRows, dtype: torch.dtype, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (E, 2, R, C) -> y0 (E, 2 R0 C) and [y1; y1'] (2E, 2 R1 C) (rows interleaved by edge), in
    dtype, in scratch of this call: the extension's or Triton's one-pass ``tap_split`` (gather
    and tap 1's signs together) where it applies, else gathers and a sign pass."""
    e, _, r, c = y.shape
    y3 = y.reshape(e, 2 * r, c)
    if backend == "triton" and _triton_split(y, dtype):
        from ..kernels import tap_elementwise

        y0, pair = tap_elementwise.tap_split(
            y3.contiguous(), rows.y0_rows, rows.pair_rows, rows.pair_signs, dtype
        )
        return y0.view(e, rows.n0 * c), pair.view(2 * e, rows.n1 * c)
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


def _assemble_dy(dy: torch.Tensor, dpair: torch.Tensor, rows: TapRows) -> torch.Tensor:
    """Fill the m = +-1 rows of dy (E, 2R, C) from the pair-row gradient dpair (E, 2 n1, C): y1's
    own part plus y1''s with tap 1's signs and swap undone."""
    e, _, c = dy.shape
    dpair = _signs_of_tap1(dpair, rows)
    swapped = dpair[:, rows.n1 :].view(e, rows.n1 // 2, 2, c).flip(2).view(e, rows.n1, c)
    return dy.index_copy_(1, rows.pair_rows[: rows.n1], dpair[:, : rows.n1].add_(swapped))


def _assemble(dy0: torch.Tensor, dpair: torch.Tensor, rows: TapRows, backend: str) -> torch.Tensor:
    """dy (E, 2R, C) from the gradients of the split's two parts, dy0 (E, n0, C) and dpair
    (E, 2 n1, C): the extension's or Triton's one pass (``tap_assemble``), or ATen ops."""
    if backend == "extension" and dy0.dtype in (torch.float32, torch.float64):
        return _ext().tap_assemble(
            dy0.contiguous(),
            dpair.contiguous(),
            rows.assemble_a,
            rows.assemble_b,
            rows.assemble_sign,
        )
    if backend == "triton" and dy0.dtype in (torch.float32, torch.float64):
        from ..kernels import tap_elementwise

        return tap_elementwise.tap_assemble(
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
