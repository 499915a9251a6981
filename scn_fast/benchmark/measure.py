"""Timing and activation memory of one step (docs/measurement.md).

Timing: every compared path is warmed up, then the repeats are interleaved across the paths (repeat r
runs every path once, the starting path rotating with r, so slow drifts of a busy machine hit all paths
alike); each step is bracketed by device synchronisation and timed with ``time.perf_counter``; a path's
time is the median of its repeats. Ratios are only meaningful within one such run.

Activation memory of a step: the peak memory during the step minus what was held just before it
(weights, gradients, cached constants), measured on a step of its own after a warm-up step, never on a
timed one (returning freed heap to the OS before it makes the step re-fault its memory).

* GPU: ``torch.cuda.reset_peak_memory_stats()``, then ``max_memory_allocated() - memory_allocated()``
  (the latter read before the step).
* CPU: freed heap and the extension's cached blocks are returned to the OS (``malloc_trim``,
  ``scn_fast.release_cpu_cache``), the process's peak-RSS mark is reset by
  writing ``5`` to ``/proc/self/clear_refs``, then ``VmHWM`` after the step minus ``VmRSS`` before it
  (from ``/proc/self/status``). Returns None where ``/proc`` does not allow this.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

Step = Callable[[], Any]


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Step, device: torch.device | str) -> float:
    """Seconds of one call of ``step`` (synchronised before and after; its result is dropped)."""
    synchronize(device)
    start = time.perf_counter()
    out = step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def time_interleaved(
    steps: Mapping[str, Step], device: torch.device | str, repeats: int = 3, warmup: int = 1
) -> dict[str, list[float]]:
    """Per path, the times of ``repeats`` interleaved calls after ``warmup`` calls of each."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            time_step(steps[name], device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            times[name].append(time_step(steps[name], device))
    return times


def median(values: list[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------- memory
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size (VmRSS) of this process, in bytes."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """Peak resident set size (VmHWM) since the last reset, in bytes."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def address_space_bytes() -> int | None:
    """Current virtual address space (VmSize) of this process, in bytes."""
    kib = _status_kib("VmSize")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``); False if not allowed."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> None:
    """Collect garbage, free the extension's cached CPU blocks (``scn_fast.release_cpu_cache``) and
    return freed heap pages to the OS (glibc ``malloc_trim``), so that RSS before a step holds live
    data only."""
    from ..extension import release_cpu_cache

    gc.collect()
    release_cpu_cache()
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def memory_mark(device: torch.device | str) -> int | None:
    """Start an activation-memory measurement: the memory held now (GPU: allocated bytes; CPU: RSS
    after returning freed heap), with the peak mark reset. None if the platform cannot measure it."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return before
    release_free_heap()
    before = rss_bytes()
    if before is None or not reset_peak_rss():
        return None
    return before


def memory_peak(device: torch.device | str, before: int | None) -> int | None:
    """The peak since ``memory_mark`` above what it found held, in bytes (None if unmeasurable)."""
    if before is None:
        return None
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    peak = peak_rss_bytes()
    return None if peak is None else max(0, peak - before)


def activation_memory(step: Step, device: torch.device | str) -> int | None:
    """Peak memory of one call of ``step`` above what was held before it, in bytes (see module doc).

    Call it after a warm-up call of the same step. None when the platform cannot measure it.
    """
    before = memory_mark(device)
    out = step()
    del out
    return memory_peak(device, before)
