"""The benchmark record: one (config, system, mode, path, precision) result, a flat JSON dict.

Fields (None where they do not apply, e.g. timings of a path that is not ``ok``):

* what: ``config`` (preset name), ``mode`` (inference | training), ``backend`` (path name:
  "reference", a fused backend such as "extension" or "triton", or "reference+compile" for
  torch.compile of the reference path), ``requested_backend`` (the model's ``backend=`` argument),
  ``path_kind`` (reference | fused | compile), ``precision``, ``system`` (size spec), ``natoms``,
  ``nstructures``, ``nedges``.
* outcome: ``status`` (ok | wrong | failed | oom | skipped: not run because the estimate said it
  would not fit in memory or finish in the point's time budget, or no baseline fits), ``reason``
  (why, when not ok).
* time: ``median_s`` (median of ``times_s``, interleaved repeats), ``repeats`` (how many were timed:
  fewer than asked where the point's time budget cut them, see ``baseline_estimate``), ``warmup``
  (warm-up calls, the checked step included), ``speedup_vs_reference`` (median of the float32
  reference in the same run and mode / this median), ``atom_steps_per_s`` (natoms / median_s: atoms
  times steps per second).
* trust (noise.py): ``min_s``, ``max_s`` and ``spread`` ((max - min) / median) of the repeats; the
  same of the algebraic floor's replays (``floor_min_s``, ``floor_max_s``, ``floor_spread``);
  ``noisy`` (True when the repeats or the floor's spread by more than 10%, or the time is below its
  floor; None when nothing was timed) and ``noise`` (why).
* floors (floor.py): ``gemm_floor_s`` (the reference's nn.Linear GEMMs replayed back to back in the
  model's order, interleaved with the timed steps, median; x3 for training), ``floor_s`` (the
  algebraic floor), ``time_over_floor`` (median / floor_s), ``time_over_gemm_floor``, ``gemm_flops``
  and ``algebraic_gemm_flops`` (FLOPs behind the two floors), ``gemm_flops_per_s`` (the GEMM rate of
  the replay), ``device_peak_flops_per_s`` (GPU table, else None); for comparison with older records,
  ``isolated_floor_s`` (the algebraic floor from each shape timed in a loop of its own,
  measured once per point) and ``time_over_isolated_floor``.
* memory: ``peak_mem_bytes`` (activation memory of one step, docs/measurement.md);
  ``point_peak_rss_bytes`` (CPU: the peak RSS of the whole point process, every path and the
  baseline together, from the kernel's accounting of the finished process, ``ru_maxrss``; None on
  CUDA and where unavailable).
* correctness: ``energy_err_rel``, ``max_force_err_rel``, ``force_cosine``, ``max_grad_err_rel``,
  ``force_err_limit``, ``error_baseline`` ("float32 reference"; for the float32 reference itself
  "float64 reference": its own error), ``ref_fp32_vs_fp64_force_err`` (u of docs/tolerances.md).
* baseline (baseline.py): ``baseline`` ("reference-fp32" or "fused-fp64": what outputs were checked
  against), ``baseline_grads`` (what parameter gradients were checked against, None: not checked),
  ``baseline_estimate`` (the estimate that chose them: GB and seconds of the reference pair and
  of the float64 fused path, memory available, time budget, the decision in words),
  ``baseline_check`` (at a reference-fp32 point of a sweep that later switches to fused-fp64: the
  float64 fused path against the float64 reference), ``estimate`` (this path's estimated
  activation GB, held GB and seconds per step, estimate.py).
* provenance: ``device``, ``device_type``, ``threads``, ``torch_version``, ``triton_version``,
  ``cuda_version``, ``git_commit``, ``git_dirty``, ``explain`` (``model.explain()`` after the step:
  what ran per op).
"""

from __future__ import annotations

from typing import Any

STATUSES = ("ok", "wrong", "failed", "oom", "skipped")
MODES = ("inference", "training")

RECORD_FIELDS = (
    "config",
    "mode",
    "backend",
    "requested_backend",
    "path_kind",
    "precision",
    "system",
    "natoms",
    "nstructures",
    "nedges",
    "status",
    "reason",
    "median_s",
    "times_s",
    "min_s",
    "max_s",
    "spread",
    "noisy",
    "noise",
    "speedup_vs_reference",
    "repeats",
    "warmup",
    "atom_steps_per_s",
    "floor_s",
    "gemm_floor_s",
    "time_over_floor",
    "floor_min_s",
    "floor_max_s",
    "floor_spread",
    "time_over_gemm_floor",
    "gemm_flops",
    "algebraic_gemm_flops",
    "gemm_flops_per_s",
    "isolated_floor_s",
    "time_over_isolated_floor",
    "device_peak_flops_per_s",
    "peak_mem_bytes",
    "point_peak_rss_bytes",
    "energy_err_rel",
    "max_force_err_rel",
    "force_cosine",
    "max_grad_err_rel",
    "force_err_limit",
    "error_baseline",
    "ref_fp32_vs_fp64_force_err",
    "baseline",
    "baseline_grads",
    "baseline_estimate",
    "baseline_check",
    "estimate",
    "device",
    "device_type",
    "threads",
    "torch_version",
    "triton_version",
    "cuda_version",
    "git_commit",
    "git_dirty",
    "explain",
)


def make_record(**fields: Any) -> dict[str, Any]:
    """A record with every field of ``RECORD_FIELDS`` (missing ones None); unknown names are errors."""
    unknown = set(fields) - set(RECORD_FIELDS)
    if unknown:
        raise KeyError(f"unknown record fields {sorted(unknown)}")
    if fields.get("status") not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {fields.get('status')!r}")
    return {name: fields.get(name) for name in RECORD_FIELDS}


def record_key(rec: dict[str, Any]) -> tuple[str, str, str]:
    """(mode, backend, precision): what the sweep stops growing after an out-of-memory."""
    return (rec["mode"], rec["backend"], rec["precision"])
