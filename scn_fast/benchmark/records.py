"""The benchmark record: one (config, system, mode, path, precision) result, a flat JSON dict.

Fields (None where they do not apply, e.g. timings of a path that is not ``ok``):

* what: ``config`` (preset name), ``mode`` (inference | training), ``backend`` (path name:
  "reference", a fused backend such as "extension" or "triton", or "reference+compile" for
  torch.compile of the reference path), ``requested_backend`` (the model's ``backend=`` argument),
  ``path_kind`` (reference | fused | compile), ``precision``, ``system`` (size spec), ``natoms``,
  ``nstructures``, ``nedges``.
* outcome: ``status`` (ok | wrong | failed | oom), ``reason`` (why, when not ok).
* time: ``median_s`` (median of ``times_s``, interleaved repeats), ``speedup_vs_reference`` (median of
  the float32 reference in the same run and mode / this median).
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
* memory: ``peak_mem_bytes`` (activation memory of one step, docs/measurement.md).
* correctness: ``energy_err_rel``, ``max_force_err_rel``, ``force_cosine``, ``max_grad_err_rel``,
  ``force_err_limit``, ``error_baseline`` ("float32 reference"; for the float32 reference itself
  "float64 reference": its own error), ``ref_fp32_vs_fp64_force_err`` (u of docs/tolerances.md).
* provenance: ``device``, ``device_type``, ``threads``, ``torch_version``, ``triton_version``,
  ``cuda_version``, ``git_commit``, ``git_dirty``, ``explain`` (``model.explain()`` after the step:
  what ran per op).
"""

from __future__ import annotations

from typing import Any

STATUSES = ("ok", "wrong", "failed", "oom")
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
    "energy_err_rel",
    "max_force_err_rel",
    "force_cosine",
    "max_grad_err_rel",
    "force_err_limit",
    "error_baseline",
    "ref_fp32_vs_fp64_force_err",
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
