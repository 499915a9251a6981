"""Which correctness baseline a benchmark point uses, decided from estimates before it runs.

Every path is checked before it is timed (docs/measurement.md). Two baselines:

* ``reference-fp32``: the float32 reference's outputs, with ``u`` (its own force error against a
  float64 copy of itself) widening the fused float32 force limit to max(5e-5, 5u). What small points
  use; the reference and its float64 copy must both fit.
* ``fused-fp64``: the fused path run in float64 (``backend="auto"``: the extension on CPU). Used
  where the reference (float32 and float64) would not fit in memory or finish in the point's time
  budget. The float64 fused path is itself checked against the float64 reference at sizes both
  run: by tests/test_fused_model.py on the golden files (to 1e-9 / 1e-8), and, in a sweep that
  switches baselines, at its reference-fp32 points (``baseline_check`` in their records). The
  float32 paths are then checked against float64 outputs with ``u`` measured at this point when the
  float32 reference still runs here, else carried from the largest smaller point that measured
  it, else the table's floor (5e-5) alone.

Parameter gradients (training) are checked against the float32 reference's training step when it
runs, else against the float64 fused path's (``baseline_grads`` "fused-fp64") when that fits, else
not at all (``baseline_grads`` None, said in the record's ``baseline_estimate``).

``decide_point`` makes the choice from ``estimate.step_estimate``; it also says which paths are not
run (status ``skipped``, with the estimate): a reference path where it would not fit in the planned
memory (``MEM_MARGIN`` of the available) or would take the point past its time budget, a fused path
only where it would not fit in all the available memory (the sweep measures its memory); how many
repeats fit the point's time budget; and how long the point should take. All of it goes into the records (``baseline``,
``baseline_estimate``, ``repeats``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .estimate import (
    RUNTIME_BYTES,
    PointSize,
    StepEstimate,
    step_estimate,
    weights_bytes,
)
from .paths import path_spec

BASELINES = ("reference-fp32", "fused-fp64")
MEM_MARGIN = 0.85  # plan for at most this share of the available memory
BASELINE_SHARE = 0.25  # the reference pair may take at most this share of the point's time budget
FLOOR_REPLAY_SHARE = 0.45  # a GEMM floor replay takes ~this share of a reference inference step
BUILD_S_PER_MPARAM = 0.06  # building and loading one model, seconds per million parameters

_DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.float32}


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def _min(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.2g} s"


@dataclass
class PointDecision:
    """What a point runs, decided from estimates (module doc).

    ``baseline``: "reference-fp32", "fused-fp64" or None (none fits: nothing can be checked);
    ``reference_forward``: run the float32 reference's forward first (baseline or ``u``, GEMM
    shapes for the floors); ``baseline_grads``: "reference-fp32", "fused-fp64" or None;
    ``not_run``: (mode, path, precision) -> why (by estimate); ``repeats``/``warmup``: as scaled to
    the time budget; ``seconds``: the point's estimated duration; ``estimate``: the numbers and
    the reasons, for the records."""

    baseline: str | None
    reference_forward: bool
    baseline_grads: str | None
    not_run: dict[tuple[str, str, str], str]
    repeats: int
    warmup: int
    seconds: float
    estimate: dict[str, Any] = field(default_factory=dict)
    path_estimates: dict[str, dict[str, float]] = field(default_factory=dict)


def _kind(path: str) -> str:
    return "fused" if path_spec(path, "fp32").kind == "fused" else "reference"


def decide_point(
    preset: str,
    size: PointSize,
    modes: list[str],
    paths: list[str],
    precisions: list[str],
    *,
    device: str = "cpu",
    repeats: int = 3,
    warmup: int = 1,
    mem_available: int | None = None,
    budget_s: float | None = None,
    force: str = "auto",
) -> PointDecision:
    """Decide a point's baseline, reference paths, repeats and duration from the estimates.

    ``mem_available``: bytes the point may use (None: unlimited); at most ``MEM_MARGIN`` of it is
    planned for. ``budget_s``: the point's time budget (None: unlimited): the reference baseline
    may take ``BASELINE_SHARE`` of it, and repeats are cut (to no fewer than one) so that the point
    fits it. ``force``: "auto", or a baseline name to use whatever the estimate says."""
    if force != "auto" and force not in BASELINES:
        raise ValueError(f"baseline must be 'auto' or one of {BASELINES}, got {force!r}")
    avail = math.inf if mem_available is None else MEM_MARGIN * mem_available
    budget = math.inf if budget_s is None else float(budget_s)
    w32, w64 = weights_bytes(preset), weights_bytes(preset, torch.float64)

    def est(kind: str, mode: str, dtype: torch.dtype = torch.float32) -> StepEstimate:
        return step_estimate(preset, kind, mode, size, dtype, device)

    r32, r64 = est("reference", "inference"), est("reference", "inference", torch.float64)
    f64 = est("fused", "inference", torch.float64)
    f64t = est("fused", "training", torch.float64)
    # what the process holds at each baseline step (module doc of estimate.py)
    need_ref32 = RUNTIME_BYTES + w32 + r32.activation_bytes
    need_ref64 = RUNTIME_BYTES + w32 + w64 + r64.activation_bytes
    need_f64 = RUNTIME_BYTES + w32 + w64 + f64.activation_bytes
    need_f64t = RUNTIME_BYTES + w32 + 2 * w64 + f64t.activation_bytes
    ref_time = r32.seconds + r64.seconds
    fits_ref = need_ref64 <= avail and ref_time <= BASELINE_SHARE * budget
    numbers: dict[str, Any] = {
        "natoms": size.natoms,
        "edges": list(size.edges),
        "mem_available_gb": None if mem_available is None else round(mem_available / 1e9, 3),
        "mem_planned_gb": None if math.isinf(avail) else round(avail / 1e9, 3),
        "budget_s": None if math.isinf(budget) else budget,
        "reference_fp32_inference": {**r32.as_dict(), "process_gb": round(need_ref32 / 1e9, 3)},
        "reference_fp64_inference": {**r64.as_dict(), "process_gb": round(need_ref64 / 1e9, 3)},
        "fused_fp64_inference": {**f64.as_dict(), "process_gb": round(need_f64 / 1e9, 3)},
    }
    if force != "auto":
        baseline = force
        why = f"baseline {force} requested"
    elif fits_ref:
        baseline = "reference-fp32"
        why = (
            f"the float32 reference and its float64 copy fit: {_gb(need_ref64)} <= "
            f"{_gb(avail)} planned, {_min(ref_time)} <= {_min(BASELINE_SHARE * budget)}"
        )
    else:
        over = []
        if need_ref64 > avail:
            over.append(f"the float64 reference needs ~{_gb(need_ref64)} > {_gb(avail)} planned")
        if ref_time > BASELINE_SHARE * budget:
            over.append(
                f"the reference pair takes ~{_min(ref_time)} > {_min(BASELINE_SHARE * budget)}"
            )
        if need_f64 <= avail:
            baseline = "fused-fp64"
            why = "; ".join(over) + f"; the float64 fused path fits ({_gb(need_f64)})"
        else:
            baseline = None
            why = "; ".join(over) + f"; nor does the float64 fused path ({_gb(need_f64)})"
    numbers["decision"] = why

    # The reference paths run where they fit: in memory, and in time, the point's fused paths and
    # baseline first (each path: checked, one timed and one memory step at the least).
    not_run: dict[tuple[str, str, str], str] = {}
    path_est: dict[str, dict[str, float]] = {}
    keys = []
    for mode in modes:
        for q in precisions:
            for p in paths:
                e = est(_kind(p), mode, _DTYPE.get(q, torch.float32))
                path_est[f"{mode}|{p}|{q}"] = e.as_dict()
                keys.append((mode, p, q, e))
    # a fused path is not run only where even all the available memory (no margin) is too little:
    # its memory is what the sweep measures (an estimate that is off can be overridden with
    # --mem-available-gb; the address-space limit of the point still turns a real overrun into oom)
    raw = math.inf if mem_available is None else mem_available
    run_keys = []
    for mode, p, q, e in keys:
        if _kind(p) != "fused" and baseline is not None:
            continue
        held = e.held_bytes + w32 * (len(paths) - 1)
        if _kind(p) == "fused" and held + e.activation_bytes > raw:
            not_run[(mode, p, q)] = (
                f"not run: estimated {_gb(e.activation_bytes)} of activations + {_gb(held)} held "
                f"> {_gb(raw)} available"
            )
            continue
        run_keys.append((mode, p, q, e))
    builds = BUILD_S_PER_MPARAM * (w32 / 4e6) * (1 + len(paths))
    base_s = {"reference-fp32": ref_time, "fused-fp64": f64.seconds}.get(baseline or "", 0.0)
    least = builds + base_s + sum(3 * e.seconds for *_, e in run_keys)
    for mode, p, q, e in [k for k in keys if k not in run_keys and k[:3] not in not_run]:
        held = e.held_bytes + w32 * (len(paths) - 1)  # the other paths' models
        if held + e.activation_bytes > avail:
            not_run[(mode, p, q)] = (
                f"not run: estimated {_gb(e.activation_bytes)} of activations + "
                f"{_gb(held)} held > {_gb(avail)} planned"
            )
            continue
        cost = 3 * e.seconds
        if (mode, p, q) == ("inference", "reference", "fp32") and baseline == "fused-fp64":
            cost += r32.seconds  # its forward with the GEMM hooks, for u and the floors
        if least + cost > budget:
            not_run[(mode, p, q)] = (
                f"not run: estimated {_min(cost)} for its checked, timed and memory steps; "
                f"the point would take ~{_min(least + cost)} > its {_min(budget)}"
            )
            continue
        least += cost
        run_keys.append((mode, p, q, e))
    # under fused-fp64 the reference's forward runs first only where the reference is timed anyway
    # (it then gives u and the GEMM shapes of the floors)
    ref_forward = baseline == "reference-fp32" or (
        baseline == "fused-fp64"
        and any(k[:3] == ("inference", "reference", "fp32") for k in run_keys)
        and need_ref32 <= avail
    )
    ref_trains = any(
        m == "training" and p == "reference" and q == "fp32" for m, p, q, _ in run_keys
    )
    grads = None
    if "training" in modes and baseline is not None:
        if baseline == "reference-fp32" and ref_trains:
            grads = "reference-fp32"
        elif need_f64t <= avail:
            grads = "fused-fp64"
        elif ref_trains:
            grads = "reference-fp32"
        else:
            numbers["gradients"] = (
                f"parameter gradients not checked: the float64 fused training step needs "
                f"~{_gb(need_f64t)} > {_gb(avail)} planned and the reference does not train here"
            )

    # time: baseline, builds, each path's checked and memory steps, then repeats
    fixed = builds
    if baseline == "reference-fp32":
        fixed += ref_time
    elif baseline == "fused-fp64":
        fixed += f64.seconds + (r32.seconds if ref_forward else 0.0)
    if grads == "fused-fp64":
        fixed += f64t.seconds
    fixed += sum(2 * e.seconds for *_, e in run_keys) if baseline is not None else 0.0
    per_round = sum(e.seconds for *_, e in run_keys)
    if ref_forward:
        per_round += FLOOR_REPLAY_SHARE * r32.seconds * len(modes) * len(precisions)
    reps, warm = repeats, warmup
    if baseline is None:
        reps, warm, per_round = 0, 0, 0.0
    elif per_round > 0 and fixed + (repeats + max(warmup - 1, 0)) * per_round > budget:
        reps = int(max(1, min(repeats, (budget - fixed) // per_round)))
        warm = 1  # the checked step is the only warm-up
        numbers["repeats"] = (
            f"{reps} timed repeat(s) of the {repeats} requested, warm-up by the checked step "
            f"only: {repeats} would take ~{_min(fixed + repeats * per_round)} > {_min(budget)}"
        )
    seconds = fixed + (reps + max(warm - 1, 0)) * per_round
    numbers["point_seconds"] = round(seconds, 1)
    return PointDecision(
        baseline=baseline,
        reference_forward=ref_forward,
        baseline_grads=grads,
        not_run=not_run,
        repeats=reps,
        warmup=warm,
        seconds=seconds,
        estimate=numbers,
        path_estimates=path_est,
    )
