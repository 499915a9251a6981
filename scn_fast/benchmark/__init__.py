"""The benchmark suite behind ``scn-fast bench`` (docs/measurement.md, docs/tolerances.md).

Modules, one job each:

* ``measure``   interleaved timing (warm-up, repeats across the compared paths, median) and
                activation memory of one step (GPU allocator peak / CPU peak RSS).
* ``noise``     whether a time can be trusted: the spread of its repeats and of its floor's, the
                ``noisy`` flag (spread > 10% or time below the floor), the busy-machine warning.
* ``floor``     the reference's GEMM floor and the algebraic floor: nn.Linear shapes recorded with
                forward hooks on a reference run, timed with ``torch.addmm``; device peak FLOP/s.
* ``tolerance`` the tolerance table of docs/tolerances.md and the output/gradient comparisons.
* ``systems``   built-in, deterministic OC20-like systems of several sizes.
* ``paths``     the compared paths (reference, each fused backend, torch.compile) and their steps.
* ``models``    each path's model, built once per point with the reference's weights.
* ``estimate``  a point's memory and time per path and step, estimated before it runs (a linear
                model of the atom and edge counts, calibrated on scn-t4-b2).
* ``baseline``  per point, from the estimate: the correctness baseline (float32 reference, or the
                fused path in float64), the paths not run, the repeats that fit its time budget;
                ``baseline_build`` runs the chosen baseline inside the point.
* ``large``     ``--large``: the plan stated first, the markdown size table, time / memory plots.
* ``point``     one (preset, system) point: correctness first, then timing and memory; also the
                ``python -m scn_fast.benchmark.point`` entry that runs it under a memory limit.
* ``runner``    the sweep: plans points, runs each in a subprocess, stops growing a path after
                its first out-of-memory, shows progress (``progress``).
* ``records``   the record schema; ``errors`` failure classification; ``env`` device and versions.
* ``report``    results.json, the plain-text table, the PNG plots.
* ``cli``       ``add_bench_parser(subparsers)`` for the ``scn-fast bench`` subcommand.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SuiteConfig", "add_bench_parser", "quick_config", "run_suite"]


def __getattr__(name: str) -> Any:
    # Lazy, so that ``python -m scn_fast.benchmark.point`` does not import itself twice.
    if name in ("SuiteConfig", "quick_config", "run_suite"):
        from . import runner

        return getattr(runner, name)
    if name == "add_bench_parser":
        from .cli import add_bench_parser

        return add_bench_parser
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
