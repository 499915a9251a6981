"""fc1_edge_proj's weight in tap order and back: the column permutation that makes W0 (the m = 0 rows
of both sides) and W1 (the m = +-1 rows) two contiguous column blocks (``scn_fast.tap_order`` holds
the fused model's weight this way; state_dict stays upstream's).

weight (H, 2RC) with 2R column blocks of C channels, rows as in :class:`~.tap_rows.TapRows`.
"""

from __future__ import annotations

import torch

from .tap_rows import has_tap_order, tap_rows


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
