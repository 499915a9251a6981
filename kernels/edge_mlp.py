"""Triton launchers of the edge MLP's Linear layers (``scn_fast/ops/edge_linear.py``): each layer
one :func:`kernels.gemm.mm` launch forward and two backward, SiLU and bias gradient fused.

Shapes: x (M, K) edge rows, weight (N, K) (``nn.Linear``'s), bias (N,), dy (M, N).

* :func:`linear_act_forward`: y = act(x W^T + b), act SiLU or the identity; with SiLU the
  pre-activation p = x W^T + b is stored by the same launch (the backward's silu').
* :func:`linear_act_backward`: with d = dy * silu'(p) (or dy), dx = d W (one launch, d formed in
  the GEMM's A prologue, never stored) and dW = d^T x with db = sum_m d (one launch: the prologue
  forms d^T, the row sums of that A are db).
* :func:`silu_mm_forward`: z = silu(h) W^T (SiLU in the A prologue: only h is kept);
  :func:`silu_mm_backward`: dh = (dz W) * silu'(h) (epilogue), dW = dz^T silu(h) written as
  dW^T = silu(h)^T dz (prologue on A = h^T).

Precision as :func:`kernels.gemm.mm` takes it ("fp32" exact IEEE, "tf32" / "bf16" tensor cores).
"""

from __future__ import annotations

import torch

from .gemm import EPI_DSILU, EPI_NONE, EPI_SILU, PRO_DSILU, PRO_NONE, PRO_SILU, mm

__all__ = [
    "T4B2_WIDTHS",
    "launch_configs",
    "linear_act_backward",
    "linear_act_forward",
    "silu_mm_backward",
    "silu_mm_forward",
]


def linear_act_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: bool,
    precision: str,
    store_pre: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, p): y = act(x W^T + b) (M, N); p the pre-activation (M, N) with ``act`` and
    ``store_pre`` (a backward will read it), else an empty tensor (module doc)."""
    m, n = x.shape[0], weight.shape[0]
    y = x.new_empty((m, n))
    keep = act and store_pre
    pre = x.new_empty((m, n)) if keep else x.new_empty((0,))
    mm(
        x,
        weight.t(),
        y,
        bias=bias,
        epi=EPI_SILU if act else EPI_NONE,
        pre=pre if keep else None,
        precision=precision,
    )
    return y, pre


def linear_act_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    pre: torch.Tensor,
    act: bool,
    has_bias: bool,
    need_dx: bool,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW, db) of :func:`linear_act_forward`; dx empty unless ``need_dx``, db empty unless
    ``has_bias`` (module doc)."""
    dy = dy.contiguous()
    prologue, za = (PRO_DSILU, pre) if act else (PRO_NONE, None)
    dx = x.new_empty((0,))
    if need_dx:
        dx = x.new_empty(x.shape)
        mm(dy, weight, dx, prologue=prologue, za=za, precision=precision)
    dw = weight.new_empty(weight.shape)
    db = dy.new_empty((weight.shape[0],)) if has_bias else dy.new_empty((0,))
    mm(
        dy.t(),
        x,
        dw,
        prologue=prologue,
        za=za.t() if za is not None else None,
        rowsum=db if has_bias else None,
        precision=precision,
    )
    return dx, dw, db


def silu_mm_forward(h: torch.Tensor, weight: torch.Tensor, precision: str) -> torch.Tensor:
    """z = silu(h) W^T (M, N) (module doc)."""
    z = h.new_empty((h.shape[0], weight.shape[0]))
    return mm(h, weight.t(), z, prologue=PRO_SILU, precision=precision)


def silu_mm_backward(
    dz: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, dW) of :func:`silu_mm_forward` (module doc)."""
    dz = dz.contiguous()
    dh = torch.empty_like(h)
    mm(dz, weight, dh, epi=EPI_DSILU, z=h, precision=precision)
    dw = torch.empty_like(weight)
    mm(h.t(), dz, dw.t(), prologue=PRO_SILU, precision=precision)
    return dh, dw


# (K, N) of scn-t4-b2's edge layers (the compile cases of :func:`launch_configs`).
T4B2_WIDTHS = (
    (400, 128), (128, 128), (128, 1024), (1024, 1024), (1024, 2432), (128, 256), (256, 256),
    (256, 1664),
)  # fmt: skip


def launch_configs(
    rows: int = 4000,
    widths: tuple[tuple[int, int], ...] = T4B2_WIDTHS,
    dtype: torch.dtype = torch.float32,
    precision: str = "fp32",
) -> list:
    """The distinct GEMM specialisations of the four launchers for (K, N) ``widths`` (scn-t4-b2's
    edge layers: the distance block's fc1_dist 400 -> 128 and fc1_edge_attr 128 -> 128; per
    resolution fc1_dist 128 -> H, fc1_edge H -> H, fc2_edge H -> R C' with H = 1024, 256 and
    R C' = 2432, 1664), traced on meta tensors."""
    from . import aot

    def t(*shape):
        return torch.empty(shape, dtype=dtype, device="meta")

    with aot.trace() as launches:
        for k, n in widths:
            x, w, b = t(rows, k), t(n, k), t(n)
            for act in (False, True):
                _, pre = linear_act_forward(x, w, b, act, precision)
                linear_act_backward(t(rows, n), x, w, pre, act, True, True, precision)
            silu_mm_forward(x, w, precision)
            silu_mm_backward(t(rows, n), x, w, precision)
    return aot.configs_of(launches)
