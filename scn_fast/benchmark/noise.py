"""Whether a benchmark number can be trusted: the spread of its repeats and a busy-machine warning.

A time is the median of interleaved repeats (``measure``). On a machine shared with other jobs the
repeats scatter and, since the GEMM floor is replayed between them, the floor scatters too; a step can
then even come out below its floor (a training step once printed at 0.65x its floor while another job
ran beside it). So every record carries the spread of its repeats and of its floor's, and is flagged:

* ``spread``: (max - min) / median of a list of repeat times (0 for one repeat).
* a point is ``noisy`` when its repeats spread by more than ``NOISY_SPREAD`` (10%), when its floor's
  repeats do, or when its median is below its algebraic floor (``time_over_floor < 1``: the floor is
  what the reference's GEMMs alone take, so a full step below it means the two were measured under
  different loads), or when it was timed once (its spread is unknown: large points whose time budget
  allows one repeat). ``noise_reasons`` says which; ``noisy`` is None when nothing was timed.
* ``busy_warning``: a line when the 1-minute load average exceeds the number of cores the process may
  use (the machine is already busy, so the numbers will be noisy), else None.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence

NOISY_SPREAD = 0.10


def spread(times: Sequence[float] | None) -> float | None:
    """(max - min) / median of ``times``; None for no times (or a zero median)."""
    if not times:
        return None
    med = statistics.median(times)
    if med <= 0:
        return None
    return (max(times) - min(times)) / med


def noise_reasons(
    times: Sequence[float] | None,
    floor_times: Sequence[float] | None = None,
    time_over_floor: float | None = None,
    limit: float = NOISY_SPREAD,
) -> list[str]:
    """Why a timed point is not trustworthy (module doc); [] when it is."""
    reasons = []
    if times is not None and len(times) == 1:
        reasons.append("one timed repeat: its spread is unknown")
    s = spread(times)
    if s is not None and s > limit:
        reasons.append(f"repeats spread by {s:.0%} (> {limit:.0%})")
    fs = spread(floor_times)
    if fs is not None and fs > limit:
        reasons.append(f"floor's repeats spread by {fs:.0%} (> {limit:.0%})")
    if time_over_floor is not None and time_over_floor < 1.0:
        reasons.append(f"time below its floor ({time_over_floor:.2f}x)")
    return reasons


def spread_fields(
    times: Sequence[float] | None,
    floor_times: Sequence[float] | None = None,
    time_over_floor: float | None = None,
) -> dict[str, object]:
    """The record fields of one timed point: ``min_s``, ``max_s``, ``spread``, ``floor_min_s``,
    ``floor_max_s``, ``floor_spread``, ``noisy``, ``noise`` (the reasons joined, or None)."""
    reasons = noise_reasons(times, floor_times, time_over_floor)
    return {
        "min_s": min(times) if times else None,
        "max_s": max(times) if times else None,
        "spread": spread(times),
        "floor_min_s": min(floor_times) if floor_times else None,
        "floor_max_s": max(floor_times) if floor_times else None,
        "floor_spread": spread(floor_times),
        "noisy": bool(reasons) if times else None,
        "noise": "; ".join(reasons) if reasons else None,
    }


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_warning(load: float | None = None, cores: int | None = None) -> str | None:
    """A warning line when the load average is above the core count (module doc), else None."""
    load = load_average() if load is None else load
    cores = usable_cores() if cores is None else cores
    if load is None or load <= cores:
        return None
    return (
        f"WARNING: the machine is busy (load average {load:.1f} > {cores} cores): other jobs share "
        "it, so timings will scatter; points whose repeats spread by more than "
        f"{NOISY_SPREAD:.0%} or that come out below their floor are flagged noisy"
    )
