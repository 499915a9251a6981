"""The reference's GEMM floor, the algebraic floor, and device peak FLOP/s (docs/algebra.md, docs/measurement.md).

GEMM floor: forward hooks on every ``nn.Linear`` of a *reference* model record each call's shape
(M rows, K = in_features, N = out_features) during one forward on the benchmarked system, in the order
the model makes them. The floor is what those calls take when they are all the work there is: they are
replayed back to back in the model's order (``GemmReplay``: ``torch.addmm(bias, A (M, K), W.t() (K, N),
out=...)``, one operand set per distinct shape, outputs preallocated so that no allocation is timed,
each call timed on its own), on the same device, in the same process and precision. The replay runs
interleaved with the timed steps (one replay per round, median over the rounds, docs/measurement.md),
so that the floor and the times divided by it see the same machine. A training step (forward +
backward) is counted as 3 times the forward GEMMs.

Algebraic floor: the same, with every ``fc1_edge_proj`` call of a message block whose resolution has
mmax = 1 and 4 taps counted at (5L+1)/(12L+4) of its time (L that block's lmax): the tap symmetry of
docs/algebra.md makes the rest of that GEMM redundant, exactly. Otherwise equal to the GEMM floor.

Isolated floor (``isolated_floor``, kept for comparison with older records): each distinct shape timed
in a loop of its own (the same GEMM again and again) and summed over the calls. It comes out lower than
the replay (on a 2-core Xeon, scn-t4-b2 at 14 atoms, timed side by side: by 8-14%): a GEMM repeated back
to back finds its operands, output buffer and the library's state where the previous call left them,
which no call in the model does, so no path that runs the model's GEMMs can reach it.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..precision import gemm_support
from .measure import synchronize

# Dense (non-sparse) peak FLOP/s by device-name pattern, most specific first; values in TFLOP/s for
# (fp32 on CUDA cores, tf32 tensor cores, bf16 tensor cores). H200 has H100 SXM's compute.
DEVICE_PEAKS_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 NVL", {"fp32": 60.0, "tf32": 418.0, "bf16": 835.0}),
    ("H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0}),
    ("H100", {"fp32": 67.0, "tf32": 495.0, "bf16": 990.0}),
    ("H200 NVL", {"fp32": 60.0, "tf32": 418.0, "bf16": 835.0}),
    ("H200", {"fp32": 67.0, "tf32": 495.0, "bf16": 990.0}),
    ("GH200", {"fp32": 67.0, "tf32": 495.0, "bf16": 990.0}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0}),
)


def device_peak_flops(device_name: str | None, precision: str) -> float | None:
    """The device's dense peak FLOP/s for ``precision`` if its name is in the table, else None."""
    if not device_name:
        return None
    for pattern, peaks in DEVICE_PEAKS_TFLOPS:
        if pattern in device_name and precision in peaks:
            return peaks[precision] * 1e12
    return None


@dataclass(frozen=True)
class GemmCall:
    """One nn.Linear call: module name, rows M, in_features K, out_features N, and the fraction of
    its FLOPs that remain after the tap symmetry (1.0 unless it is a 4-tap mmax=1 fc1_edge_proj)."""

    name: str
    m: int
    k: int
    n: int
    algebraic_fraction: float = 1.0

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def algebraic_fraction(lmax: int, mmax: int, num_taps: int) -> float:
    """(5L+1)/(12L+4) for mmax = 1 with 4 taps, else 1 (docs/algebra.md)."""
    if mmax == 1 and num_taps == 4:
        return (5 * lmax + 1) / (12 * lmax + 4)
    return 1.0


def _fractions(model: nn.Module) -> dict[str, float]:
    """Algebraic fraction per nn.Linear name: fc1_edge_proj of message blocks with 4 taps and mmax=1."""
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        res = getattr(module, "res", None)
        proj = getattr(module, "fc1_edge_proj", None)
        if res is not None and isinstance(proj, nn.Linear):
            key = f"{name}.fc1_edge_proj" if name else "fc1_edge_proj"
            out[key] = algebraic_fraction(res.lmax, res.mmax, res.num_taps)
    return out


@contextmanager
def record_gemm_calls(model: nn.Module) -> Iterator[list[GemmCall]]:
    """Record every nn.Linear call of ``model`` while the context is open (forward hooks)."""
    calls: list[GemmCall] = []
    fractions = _fractions(model)
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):

            def hook(mod: nn.Linear, inputs, _output, name: str = name) -> None:
                x = inputs[0]
                m = x.numel() // x.shape[-1] if x.dim() else 1
                calls.append(
                    GemmCall(name, m, mod.in_features, mod.out_features, fractions.get(name, 1.0))
                )

            handles.append(module.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """fp32 GEMMs without TF32 ("fp32"), or with it ("tf32"), restoring the previous setting."""
    old = torch.get_float32_matmul_precision()  # "high" = TF32 on CUDA; no effect on CPU
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def gemm_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype the floor's GEMMs run in: bf16 where bf16 GEMMs are native, else float32 (the
    model emulates bf16 with float32 GEMMs there, scn_fast.precision)."""
    native = gemm_support(precision, device)[0]
    return torch.bfloat16 if precision == "bf16" and native else torch.float32


def time_gemm(
    m: int,
    k: int,
    n: int,
    device: torch.device | str,
    precision: str = "fp32",
    repeats: int = 5,
    warmup: int = 1,
) -> float:
    """Median seconds of ``torch.addmm(bias, A (m, k), W.t())`` with W (n, k), as nn.Linear runs it.

    Shapes that take under a millisecond are timed in batches of calls (each sample about 1 ms) so
    that timer and scheduling noise does not dominate them.
    """
    dtype = gemm_dtype(precision, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(n, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=gen).to(device=device, dtype=dtype)

    def sample(calls: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            out = torch.addmm(b, a, w.t())
        synchronize(device)
        del out
        return (time.perf_counter() - start) / calls

    with matmul_precision(precision):
        for _ in range(max(1, warmup)):
            one = sample(1)
        calls = max(1, min(1000, int(1e-3 / max(one, 1e-9))))
        times = [sample(calls) for _ in range(repeats)]
    return statistics.median(times)


@dataclass(frozen=True)
class Floor:
    """Floors of one run: ``gemm_s`` (the reference's GEMM floor), ``algebraic_s``, the GEMM FLOPs
    behind them (``flops``, ``algebraic_flops``) and the GEMM rate measured at these shapes."""

    gemm_s: float
    algebraic_s: float
    flops: float
    algebraic_flops: float

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.gemm_s if self.gemm_s > 0 else 0.0

    def scaled(self, factor: float) -> Floor:
        return Floor(
            self.gemm_s * factor,
            self.algebraic_s * factor,
            self.flops * factor,
            self.algebraic_flops * factor,
        )


TRAINING_FACTOR = 3.0  # forward + backward (dX and dW): 3x the forward GEMM FLOPs


def isolated_floor(
    calls: list[GemmCall],
    device: torch.device | str,
    precision: str = "fp32",
    repeats: int = 5,
    timer: Callable[..., float] = time_gemm,
) -> Floor:
    """The isolated forward floor of ``calls`` (module doc): each distinct (M, K, N) timed in a loop of
    its own (``timer``), summed over calls. Multiply by ``TRAINING_FACTOR`` (``Floor.scaled``) for a
    training step."""
    shape_count = Counter((c.m, c.k, c.n) for c in calls)
    shape_time = {
        shape: timer(*shape, device=device, precision=precision, repeats=repeats)
        for shape in shape_count
        if shape[0] > 0
    }
    gemm_s = algebraic_s = flops = algebraic_flops = 0.0
    for c in calls:
        t = shape_time.get((c.m, c.k, c.n), 0.0)
        gemm_s += t
        algebraic_s += t * c.algebraic_fraction
        flops += c.flops
        algebraic_flops += c.flops * c.algebraic_fraction
    return Floor(gemm_s, algebraic_s, flops, algebraic_flops)


def _floor_of_times(calls: list[GemmCall], seconds: list[float]) -> Floor:
    """The Floor of one replay: per-call seconds summed, in full and at each call's fraction."""
    gemm_s = sum(seconds)
    algebraic_s = sum(t * c.algebraic_fraction for c, t in zip(calls, seconds, strict=True))
    flops = float(sum(c.flops for c in calls))
    algebraic_flops = sum(c.flops * c.algebraic_fraction for c in calls)
    return Floor(gemm_s, algebraic_s, flops, algebraic_flops)


class GemmReplay:
    """The reference's nn.Linear calls replayed back to back in the model's order (module doc).

    ``GemmReplay(calls, device, precision)``: operands are made once, one set per distinct shape (A
    (M, K) per (M, K); W (N, K) and a bias per (K, N); the output (M, N) per (M, N), written in place so
    that no allocation is timed; random, in the floor's dtype, ``gemm_dtype``).
    Calling the object replays every call once (a ``measure.time_interleaved`` step) and keeps that
    replay's Floor in ``samples``; ``floor()`` is the median over the samples taken since
    ``clear()``. Each call is timed on its own: ``time.perf_counter`` on CPU, a pair of CUDA events per
    call on a GPU (no synchronisation between calls). ``replay_times`` replaces the timing (tests):
    calls -> seconds per call.
    """

    def __init__(
        self,
        calls: list[GemmCall],
        device: torch.device | str,
        precision: str = "fp32",
        replay_times: Callable[[list[GemmCall]], list[float]] | None = None,
    ) -> None:
        self.calls = [c for c in calls if c.m > 0]
        self.device = torch.device(device)
        self.precision = precision
        self.samples: list[Floor] = []
        self._replay_times = replay_times
        self._a: dict[tuple[int, int], torch.Tensor] = {}
        self._wb: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._out: dict[tuple[int, int], torch.Tensor] = {}
        if replay_times is None:
            dtype = gemm_dtype(precision, self.device)
            gen = torch.Generator(device="cpu").manual_seed(0)

            def rand(*shape: int) -> torch.Tensor:
                return torch.randn(*shape, generator=gen).to(device=self.device, dtype=dtype)

            for c in self.calls:
                if (c.m, c.k) not in self._a:
                    self._a[(c.m, c.k)] = rand(c.m, c.k)
                if (c.k, c.n) not in self._wb:
                    self._wb[(c.k, c.n)] = (rand(c.n, c.k), rand(c.n))
                if (c.m, c.n) not in self._out:
                    self._out[(c.m, c.n)] = torch.empty(c.m, c.n, dtype=dtype, device=self.device)

    def _operands(self, c: GemmCall) -> tuple[torch.Tensor, ...]:
        w, b = self._wb[(c.k, c.n)]
        return b, self._a[(c.m, c.k)], w.t(), self._out[(c.m, c.n)]

    def _times_cpu(self) -> list[float]:
        seconds = []
        for c in self.calls:
            b, a, wt, out = self._operands(c)
            start = time.perf_counter()
            torch.addmm(b, a, wt, out=out)
            seconds.append(time.perf_counter() - start)
        return seconds

    def _times_cuda(self) -> list[float]:
        events = []
        for c in self.calls:
            b, a, wt, out = self._operands(c)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.addmm(b, a, wt, out=out)
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) * 1e-3 for s, e in events]

    def __call__(self) -> Floor:
        if self._replay_times is not None:
            seconds = self._replay_times(self.calls)
        else:
            with matmul_precision(self.precision), torch.no_grad():
                synchronize(self.device)
                seconds = self._times_cuda() if self.device.type == "cuda" else self._times_cpu()
        floor = _floor_of_times(self.calls, seconds)
        self.samples.append(floor)
        return floor

    def clear(self) -> None:
        """Forget the samples taken so far (warm-up replays)."""
        self.samples.clear()

    def floor(self, last: int | None = None) -> Floor | None:
        """The median replay (median of each field) over the samples since ``clear()``, or over the
        ``last`` ones (the timed rounds after warm-up replays); None before any."""
        samples = self.samples[-last:] if last else self.samples
        if not samples:
            return None
        return Floor(
            statistics.median(f.gemm_s for f in samples),
            statistics.median(f.algebraic_s for f in samples),
            samples[0].flops,
            samples[0].algebraic_flops,
        )
