"""Precision modes: ``"fp32"`` (default, faithful), ``"tf32"`` and ``"bf16"`` (opt-in, faster GEMMs).

A low-precision mode rounds the operands of the model's GEMMs (every ``nn.Linear``: the edge MLPs,
``fc1_edge_proj``, the grid MLP, the output heads) to TF32 (10-bit mantissa) or bfloat16 (7-bit) and
accumulates in float32; outputs, the residual stream, the Wigner rotations, the frames, the grid
projections and every reduction (message sums, head means, per-structure energies) stay float32.

Two implementations give those numerics:
- native: the GEMM runs on low-precision units (CUDA TF32 / bf16 tensor cores from sm_80, CPUs
  with AVX512-BF16 or AMX for bf16), operands stored in bf16 for backward (half the memory);
- emulated: operands rounded to the mode's precision, the GEMM run in float32. Same rounding of
  inputs, no speedup; chosen where the hardware has no such units (TF32 on any CPU; bf16 on CPUs
  without AVX512-BF16/AMX, where torch's bf16 GEMM is a scalar loop ~150x slower than float32,
  measured on an AVX2 EPYC) and inside the fused ops' own GEMMs (their kernels are float32).
``gemm_support(precision, device)`` says which one runs and why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

PRECISIONS = ("fp32", "tf32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


# The GPU a plan for an absent CUDA device assumes (``scn_fast.planning`` on a CPU machine): Hopper.
ASSUMED_CUDA_CAPABILITY = (9, 0)


def cuda_capability(device: torch.device, capability: tuple[int, int] | None = None):
    """``capability`` when given, else the device's own when CUDA is present, else
    :data:`ASSUMED_CUDA_CAPABILITY` (a plan for a GPU built where there is none)."""
    if capability is not None:
        return tuple(capability)
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability(device)
    return ASSUMED_CUDA_CAPABILITY


def gemm_support(
    precision: str, device: torch.device | str, capability: tuple[int, int] | None = None
) -> tuple[bool, str]:
    """(native, reason): whether ``precision``'s GEMMs run on low-precision units on ``device``
    (a CUDA device of compute ``capability``, see :func:`cuda_capability`)."""
    check_precision(precision)
    device = torch.device(device)
    if precision == "fp32":
        return True, "float32 GEMMs"
    if device.type == "cuda":
        major, _ = cuda_capability(device, capability)
        if major >= 8:
            return True, f"{precision} tensor cores (sm_{major}x)"
        return (
            False,
            f"sm_{major}x has no {precision} tensor cores: operands rounded, float32 GEMMs",
        )
    if device.type == "cpu" and precision == "bf16":
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        if avx512_bf16 or amx:
            return True, "bf16 GEMMs on " + ("AMX" if amx else "AVX512-BF16")
        return False, (
            "this CPU has no AVX512-BF16/AMX (torch's bf16 GEMM would be ~150x slower than "
            "float32): operands rounded to bf16, float32 GEMMs"
        )
    return False, f"no {precision} GEMM units on {device.type}: operands rounded, float32 GEMMs"


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to TF32 (10 explicit mantissa bits, round to nearest even), as float32."""
    bits = x.float().contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    rounded = (bits + 0x0FFF + lsb) & ~0x1FFF
    finite = torch.isfinite(x)
    return torch.where(finite, rounded.view(torch.float32), x.float())


def round_to(x: torch.Tensor, precision: str) -> torch.Tensor:
    """``x`` rounded to ``precision`` and returned in x's dtype (identity for fp32)."""
    if precision == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    if precision == "tf32":
        return round_tf32(x).to(x.dtype)
    return x


class _RoundOperand(torch.autograd.Function):
    """Forward: round to the precision; backward: identity (the gradient of the exact op)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, precision: str) -> torch.Tensor:
        return round_to(x, precision)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def gemm_operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """A GEMM operand in ``precision`` (rounded; straight-through gradient). fp32: ``x`` itself."""
    if precision == "fp32" or not x.is_floating_point() or x.dtype == torch.float64:
        return x
    return _RoundOperand.apply(x, precision)


@contextlib.contextmanager
def _cuda_tf32(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _operand(t: torch.Tensor, precision: str, native: bool) -> torch.Tensor:
    """A GEMM operand as _mm takes it (and as saved for backward): bf16 storage for "bf16"; for
    "tf32", float32 rounded to TF32 (emulated) or as is (native: the tensor cores round)."""
    if precision == "bf16":
        return t.to(torch.bfloat16)
    return t.float() if native else round_tf32(t)


def _mm(a: torch.Tensor, b: torch.Tensor, precision: str, native: bool) -> torch.Tensor:
    """a @ b of two _operand()s with a float32 result."""
    if precision == "bf16":
        return torch.mm(a, b).float() if native else torch.mm(a.float(), b.float())
    with _cuda_tf32(native):
        return torch.mm(a, b)


def _exact(t: torch.Tensor, precision: str) -> bool:
    return precision == "fp32" or t.dtype == torch.float64


def gemm_inputs(
    tensors: tuple[torch.Tensor, ...], precision: str, native: bool
) -> tuple[torch.Tensor, ...]:
    """GEMM operands for :func:`gemm_mm` (no autograd): unchanged in "fp32" or float64; native:
    as a Linear's GEMM takes them (bf16 storage; float32 for TF32 units); emulated: float32 values
    rounded to the precision."""
    return tuple(
        t
        if _exact(t, precision)
        else (_operand(t, precision, native) if native else round_to(t, precision))
        for t in tensors
    )


def gemm_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    precision: str,
    native: bool,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """a @ b of two :func:`gemm_inputs` operands: a float32 result (float64 for float64 operands),
    or written into ``out`` (any strided view; a bf16 ``out`` keeps native bf16 GEMMs' bf16 result
    as it is). ``bias`` (N,), without ``out``: a @ b + bias in one GEMM (``addmm``: one launch on
    a GPU, not two) for float32 / float64 operands; added to the float32 result otherwise."""
    if bias is not None:
        if out is not None:
            raise ValueError("gemm_mm: bias is for a new result, not with out")
        if a.dtype in (torch.float32, torch.float64):
            with _cuda_tf32(precision == "tf32" and native):
                return torch.addmm(bias, a, b)
        return gemm_mm(a, b, precision, native).add_(bias)
    if out is not None and out.dtype == a.dtype:
        with _cuda_tf32(precision == "tf32" and native):
            return torch.mm(a, b, out=out)
    if a.dtype in (torch.float32, torch.float64):
        with _cuda_tf32(precision == "tf32" and native):
            result = torch.mm(a, b)
    else:
        result = torch.mm(a, b)  # native bf16: a bf16 result
        if out is None:
            return result.float()
    return result if out is None else out.copy_(result)


class _LowPrecisionLinear(torch.autograd.Function):
    """y = x W^T + b with x, W (and, in backward, dy) rounded to the precision; float32 accumulation
    and outputs; bias and its gradient float32. x (M, K), W (O, K), b (O,) -> (M, O)."""

    @staticmethod
    def forward(ctx, x, weight, bias, precision: str, native: bool, keep_bf16: bool = False):
        xs, ws = _operand(x, precision, native), _operand(weight, precision, native)
        ctx.save_for_backward(xs, ws)
        ctx.precision, ctx.native, ctx.has_bias = precision, native, bias is not None
        ctx.dtypes = (x.dtype, weight.dtype)
        if keep_bf16 and bias is None and xs.dtype == torch.bfloat16:
            return torch.mm(xs, ws.t())  # the native GEMM's bf16 result, as it is
        if bias is not None and precision == "tf32" and native and xs.dtype == bias.dtype:
            # native TF32 (a GPU's tensor cores): the bias in the GEMM, one launch
            with _cuda_tf32(True):
                return torch.addmm(bias, xs, ws.t()).to(x.dtype)
        out = _mm(xs, ws.t(), precision, native)
        if bias is not None:
            out = out + bias
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        xs, ws = ctx.saved_tensors
        p, native = ctx.precision, ctx.native
        g = _operand(grad, p, native)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm(g, ws, p, native).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            gw = _mm(g.t(), xs, p, native).to(ctx.dtypes[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.float().sum(0)
        return gx, gw, gb, None, None, None


def low_precision_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    precision: str,
    native: bool,
    keep_bf16: bool = False,
) -> torch.Tensor:
    """``F.linear`` in ``precision`` (see module doc); any leading shape of x. ``keep_bf16`` (no
    bias): a native bf16 GEMM's result is returned in bf16, for a consumer that reads it as is."""
    if precision == "fp32" or x.dtype == torch.float64:
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    out = _LowPrecisionLinear.apply(
        x.reshape(-1, x.shape[-1]), weight, bias, precision, native, keep_bf16
    )
    return out.view(*lead, weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, init and state_dict) whose GEMM follows ``self.precision``;
    the model sets it on every layer. ``precision_native``: low-precision units (True) or emulated."""

    precision: str = "fp32"
    precision_native: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def matmul(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, keep_bf16: bool = False
    ) -> torch.Tensor:
        """x W^T (+ bias when given) in this layer's precision: ``forward`` without the bias, for a
        fused op that adds it in its own pass; ``keep_bf16``: native bf16 results stay bf16."""
        if self.precision == "fp32":
            return F.linear(x, self.weight, bias)
        return low_precision_linear(
            x, self.weight, bias, self.precision, self.precision_native, keep_bf16
        )


def set_precision(modules: nn.Module, precision: str, native: bool) -> None:
    """Set the GEMM precision and implementation (native or emulated) of every :class:`Linear`
    in ``modules`` (nothing to do when they already have it)."""
    state = (precision, native)
    if getattr(modules, "_gemm_precision", None) == state:
        return
    for module in modules.modules():
        if isinstance(module, Linear):
            module.precision, module.precision_native = state
    modules._gemm_precision = state


def linear_operands(precision: str, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """(w1, b1, w2, b2, ...) of ``layers`` as a fused op takes them: weights as GEMM operands in
    ``precision`` (:func:`gemm_operand`), biases unchanged."""
    out: list[torch.Tensor] = []
    for layer in layers:
        out += [gemm_operand(layer.weight, precision), layer.bias]
    return tuple(out)
