"""``scn_fast::linear_act``: a Linear layer of the edge MLP, optionally followed by SiLU, as one fused
GEMM launch forward and two backward (Triton, ``kernels/edge_mlp.py``).

    y = act(x W^T + b)        x (M, K), W (N, K), b (N,) or None -> y (M, N), act SiLU or identity

Forward: one GEMM whose epilogue adds b, applies SiLU and, when autograd records, stores the
pre-activation p (kept for the backward instead of y). Backward, with d = dy * silu'(p) (or dy):

    dx = d W          (one launch: d formed in the A prologue, never stored)
    dW = d^T x,  db = sum_m d      (one launch: db are the row sums of that A)

against ATen's addmm + silu forward and silu_backward + mm + mm + sum backward: 3 launches instead
of 6 per layer with SiLU, 3 instead of 4 without (the bias gradient). The plan chooses it
(``Plan.edge_mlp`` = "triton": the fused message path on Triton, float32 or float64, precision
fp32 or tf32 on tensor cores); elsewhere :func:`linear_act` is ``nn.Linear`` (+ SiLU) as ATen runs
it. Differentiable w.r.t. x, W and b; gradcheck in float64 (tests/test_edge_linear.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..precision import low_precision_linear

__all__ = ["linear_act", "linear_act_weights"]


def _kernels():
    from ..kernels import edge_mlp

    return edge_mlp


@torch.library.custom_op("scn_fast::linear_act", mutates_args=())
def _linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: bool,
    precision: str,
    store_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().linear_act_forward(x, weight, bias, act, precision, store_pre)


@_linear_act.register_fake
def _(x, weight, bias, act, precision, store_pre):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    return y, (torch.empty_like(y) if act and store_pre else x.new_empty((0,)))


@torch.library.custom_op("scn_fast::linear_act_backward", mutates_args=())
def _linear_act_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    pre: torch.Tensor,
    act: bool,
    has_bias: bool,
    need_dx: bool,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().linear_act_backward(dy, x, weight, pre, act, has_bias, need_dx, precision)


@_linear_act_backward.register_fake
def _(dy, x, weight, pre, act, has_bias, need_dx, precision):
    dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
    db = weight.new_empty((weight.shape[0],)) if has_bias else weight.new_empty((0,))
    return dx, torch.empty_like(weight), db


def _setup_context(ctx, inputs, output):
    x, weight, bias, act, precision, _ = inputs
    _, pre = output
    ctx.save_for_backward(x, weight, pre)
    ctx.meta = (act, bias is not None, precision)
    ctx.set_materialize_grads(False)  # pre is an output only to be saved


def _backward(ctx, dy, _dpre):
    if dy is None:
        return None, None, None, None, None, None
    x, weight, pre = ctx.saved_tensors
    act, has_bias, precision = ctx.meta
    need_dx = ctx.needs_input_grad[0]
    dx, dw, db = _linear_act_backward(dy, x, weight, pre, act, has_bias, need_dx, precision)
    return (dx if need_dx else None), dw, (db if has_bias else None), None, None, None


_linear_act.register_autograd(_backward, setup_context=_setup_context)


def linear_act(
    layer: nn.Linear, x: torch.Tensor, act: bool, impl: str = "aten", precision: str = "fp32"
) -> torch.Tensor:
    """``act(layer(x))`` (act SiLU when ``act``, else the identity) for x (..., K) -> (..., N):
    impl "triton" the fused GEMM launches (module doc) in ``precision``; "aten" the layer's own
    forward (its precision setting) and ``F.silu``."""
    if impl == "aten":
        y = layer(x)
        return F.silu(y) if act else y
    return linear_act_weights(x, layer.weight, layer.bias, act, impl, precision)


def linear_act_weights(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: bool,
    impl: str,
    precision: str = "fp32",
    native: bool = False,
) -> torch.Tensor:
    """:func:`linear_act` with the weight (N, K) and bias (N,) or None given as tensors (e.g. a
    layer's rows gathered); impl "aten" runs ``low_precision_linear`` (``precision``, ``native``)."""
    if impl == "aten":
        y = low_precision_linear(x, weight, bias, precision, native)
        return F.silu(y) if act else y
    if impl != "triton":
        raise ValueError(f"linear_act: impl must be 'aten' or 'triton', got {impl!r}")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_act: input of width {x.shape[-1]} for a weight of shape {tuple(weight.shape)}"
        )
    lead = x.shape[:-1]
    # the pre-activation is stored only for a backward (inference keeps y alone)
    tensors = (x, weight) if bias is None else (x, weight, bias)
    store_pre = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    y, _ = _linear_act(x.reshape(-1, x.shape[-1]), weight, bias, act, precision, store_pre)
    return y.view(*lead, weight.shape[0])
