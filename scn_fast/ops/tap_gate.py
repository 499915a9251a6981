"""The gate epilogue of ``gated_tap_projection``: m = silu(pre) * gate per tap from A (E, H) and
B (E, Tb, H) (Tb = 2: pre = [A + B0, A + B1, A - B0, A - B1]; Tb = 0: pre = [A]), and its backward
(dA, dB, dgate): the extension's or Triton's fused kernels, or ATen ops ("aten").
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .tap_gemm import _combine


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
