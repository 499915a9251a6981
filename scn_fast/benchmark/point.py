"""One benchmark point: a preset on one system, every requested mode x path x precision.

Order of work (docs/measurement.md, correctness first):

1. The baseline (``baseline.py`` chooses it before the point runs, ``baseline_build.py`` runs it):
   the float32 reference under ``torch.no_grad()`` with forward hooks on its nn.Linear layers (its
   outputs are the baseline, its GEMM shapes give the floors) and a float64 copy of it for ``u``, the
   reference's own float32 force error, which widens the fused force limit to max(5e-5, 5u); or,
   where the reference would not fit or finish, the fused path in float64. Reference paths that the
   estimate says would not fit or finish are not run (status ``skipped``, the estimate as reason).
2. Per mode, every path runs one step; its energy and forces (and, in training, parameter gradients)
   are compared with the baseline at its precision's tolerance (``tolerance``). A path outside is
   ``wrong`` and is not timed; a path whose requested backend did not run (``model.explain()``), or that
   raises, is ``failed``; one that runs out of memory is ``oom``.
3. The paths that passed are timed together (``measure.time_interleaved``; the checked step counts as
   each path's first warm-up call), then each one's activation memory is measured on one more step.

``python -m scn_fast.benchmark.point CONFIG_JSON`` runs a point in its own process under a memory limit
(CPU: ``RLIMIT_AS``; CUDA: the device's own memory) and prints each record as one line
``@@scn-bench-record@@ {json}`` on stdout as soon as it is known.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..data import AtomsBatch
from ..dispatch import BackendUnavailableError
from . import measure
from .baseline_build import Baseline, build_baseline
from .env import environment
from .errors import finite, first_line, free_device_memory, status_of, time_limit, timed_out
from .floor import (
    TRAINING_FACTOR,
    Floor,
    GemmReplay,
    device_peak_flops,
    isolated_floor,
)
from .models import Models, grads_of, new_model
from .noise import spread_fields
from .paths import COMPILE, PathSpec, backend_mismatch, make_step, path_spec
from .records import make_record
from .systems import build_system, parse_size
from .tolerance import check_outputs, energy_error, force_error, grad_error, tolerance_for

RECORD_PREFIX = "@@scn-bench-record@@ "
NO_BASELINE = "no baseline to check against"
_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A timestamped progress line on stderr (the point's log file)."""
    print(f"[{time.perf_counter() - _T0:8.1f} s] {msg}", file=sys.stderr, flush=True)


# Test hook: called as CHECK_HOOK(spec, mode, outputs) on each path's outputs (all but the float32
# reference) before they are checked; returns the outputs to check. Lets tests inject a wrong path.
CHECK_HOOK: Callable[[PathSpec, str, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = (
    None
)


@dataclass
class PointConfig:
    """What one point runs. ``paths``: "reference", fused backend names, "reference+compile".
    ``skip``: [mode, path, precision] triples not to run (they ran out of memory at a smaller size).
    ``mem_limit_bytes``: RLIMIT_AS for the point process on CPU (None: none); ``mem_headroom_bytes``:
    instead, the address space after start-up plus this much. ``compile_timeout_s``: limit on the first
    (compiling) call of the torch.compile path. ``threads``: torch's intra-op threads (None: default).
    ``check_only``: stop after the correctness check (step 2 of the module doc): records carry
    status and errors but no times, floors or memory (a smoke test).

    Baseline (``baseline.decide_point`` fills these; the defaults are the float32 reference):
    ``baseline`` ("reference-fp32", "fused-fp64", or None: none fits, every record ``skipped``),
    ``reference_forward`` (run the float32 reference's forward first: u, floors),
    ``baseline_grads`` ("reference-fp32", "fused-fp64" or None: gradients unchecked),
    ``check_fused_fp64`` (also check the float64 fused path against the float64 reference here),
    ``u_carried`` ([u, natoms] measured at a smaller point), ``not_run`` ([mode, path, precision,
    reason] not to run, recorded ``skipped``), ``baseline_estimate`` and ``path_estimates`` (the
    estimate behind the choice, copied into the records)."""

    preset: str
    size: str
    device: str = "cpu"
    modes: list[str] = field(default_factory=lambda: ["inference", "training"])
    paths: list[str] = field(default_factory=lambda: ["reference"])
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    gemm_repeats: int = 5
    skip: list[list[str]] = field(default_factory=list)
    mem_limit_bytes: int | None = None
    mem_headroom_bytes: int | None = None
    compile_timeout_s: float | None = 900.0
    threads: int | None = None
    check_only: bool = False
    baseline: str | None = "reference-fp32"
    reference_forward: bool = True
    baseline_grads: str | None = "reference-fp32"
    check_fused_fp64: bool = False
    u_carried: list | None = None
    not_run: list[list[str]] = field(default_factory=list)
    baseline_estimate: dict[str, Any] | None = None
    path_estimates: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PointConfig:
        return cls(**json.loads(text))


# ----------------------------------------------------------------------------- the point
def _ordered(specs: list[PathSpec]) -> list[PathSpec]:
    """The float32 reference first (it is every path's baseline), then the rest in the given order."""
    return sorted(specs, key=lambda s: 0 if (s.kind, s.precision) == ("reference", "fp32") else 1)


class _Guarded:
    """A step that, once it raises, keeps (status, reason) and becomes a no-op (the exception itself
    is dropped: its traceback would keep the failed step's tensors alive)."""

    def __init__(self, step: Callable[[], Any], device: torch.device):
        self.step, self.device = step, device
        self.error: tuple[str, str] | None = None

    def __call__(self) -> Any:
        if self.error is not None:
            return None
        try:
            return self.step()
        except Exception as exc:
            self.error = (status_of(exc), first_line(exc))
        free_device_memory(self.device)
        return None


def run_point(cfg: PointConfig, emit: Callable[[dict], None] | None = None) -> list[dict]:
    """Run one point (module doc); returns its records, also passing each to ``emit`` when known."""
    records: list[dict] = []

    def out(**fields: Any) -> None:
        rec = finite(make_record(**fields))
        records.append(rec)
        if emit is not None:
            emit(rec)

    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.set_float32_matmul_precision("highest")
    spec_sys = parse_size(cfg.size)
    data = AtomsBatch.from_ase(build_system(spec_sys), device=device)
    skip = {tuple(s) for s in cfg.skip}
    specs = _ordered([path_spec(n, p) for p in cfg.precisions for n in cfg.paths])
    todo = {m: [s for s in specs if (m, s.name, s.precision) not in skip] for m in cfg.modes}
    common: dict[str, Any] = {
        "config": cfg.preset,
        "system": spec_sys.label,
        "natoms": int(data.natoms.sum()),
        "nstructures": len(data),
        "baseline": cfg.baseline,
        "baseline_grads": cfg.baseline_grads if "training" in cfg.modes else None,
        "baseline_estimate": cfg.baseline_estimate,
        **environment(device),
    }

    def fields_of(s: PathSpec, mode: str, **more: Any) -> dict[str, Any]:
        return {
            **common,
            "mode": mode,
            "backend": s.name,
            "requested_backend": s.requested_backend,
            "path_kind": s.kind,
            "precision": s.precision,
            "estimate": cfg.path_estimates.get(f"{mode}|{s.name}|{s.precision}"),
            **more,
        }

    # 1. baseline, GEMM shapes, u
    log(f"{cfg.preset} @ {spec_sys.label}: {common['natoms']} atoms on {cfg.device}")
    torch.manual_seed(cfg.seed)
    ref = new_model(cfg.preset, fused=False, backend="auto", precision="fp32").to(device)
    common["nedges"] = int(ref.generate_graph(data).edge_index.shape[1])
    not_run = {(m, n, q): why for m, n, q, why in cfg.not_run}
    for mode in cfg.modes:
        for s in [s for s in todo[mode] if (mode, s.name, s.precision) in not_run]:
            out(**fields_of(s, mode, status="skipped", reason=not_run[(mode, s.name, s.precision)]))
        todo[mode] = [s for s in todo[mode] if (mode, s.name, s.precision) not in not_run]
    if cfg.baseline is None:
        why = (cfg.baseline_estimate or {}).get("decision", "no baseline fits")
        for mode, ss in todo.items():
            for s in ss:
                out(**fields_of(s, mode, status="skipped", reason=f"{NO_BASELINE}: {why}"))
        return records
    try:
        bl = build_baseline(
            cfg.baseline,
            cfg.preset,
            ref,
            data,
            reference_forward=cfg.reference_forward,
            baseline_grads=cfg.baseline_grads if "training" in cfg.modes else None,
            check_fused_fp64=cfg.check_fused_fp64,
            u_carried=tuple(cfg.u_carried) if cfg.u_carried else None,
            log=log,
        )
    except Exception as exc:
        traceback.print_exc()
        free_device_memory(device)
        why = first_line(exc)
        for mode, ss in todo.items():
            for s in ss:
                own = cfg.baseline == "reference-fp32" and (s.kind, s.precision) == (
                    "reference",
                    "fp32",
                )
                status = status_of(exc) if own else "failed"
                reason = why if own else f"{NO_BASELINE} ({cfg.baseline}: {why})"
                out(**fields_of(s, mode, status=status, reason=reason))
        return records
    common["baseline_check"] = bl.check
    if bl.u_note:
        print(f"scn-bench: {bl.u_note}", file=sys.stderr)
    calls = bl.calls
    models = Models(cfg.preset, ref, device)
    isolated: dict[str, Floor | None] = {}

    def isolated_of(precision: str, mode: str) -> Floor | None:
        """The isolated floor (floor.py), measured once per precision; for comparison only."""
        if calls is None:
            return None
        if precision not in isolated:
            try:
                log(f"isolated GEMM floor ({precision})")
                isolated[precision] = isolated_floor(
                    calls, device, precision, repeats=cfg.gemm_repeats
                )
            except Exception as exc:
                print(
                    f"scn-bench: isolated floor ({precision}): {first_line(exc)}", file=sys.stderr
                )
                free_device_memory(device)
                isolated[precision] = None
        f = isolated[precision]
        return None if f is None else (f.scaled(TRAINING_FACTOR) if mode == "training" else f)

    # 2. and 3., per mode
    for mode in cfg.modes:
        _run_mode(cfg, mode, todo[mode], models, data, bl, isolated_of, fields_of, out)
        free_device_memory(device)
    return records


def _errors_of(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "energy_err_rel": energy_error(out["energy"], base["energy"]),
        "max_force_err_rel": force_error(out["forces"], base["forces"])
        if "forces" in base
        else None,
    }


def _run_mode(cfg, mode, specs, models, data, bl: Baseline, isolated_of, fields_of, out) -> None:
    device = torch.device(cfg.device)
    ok: dict[PathSpec, tuple[_Guarded, dict[str, Any]]] = {}
    ref_grads: dict[str, torch.Tensor | None] | None = None
    if cfg.baseline_grads == "fused-fp64":
        ref_grads = bl.grads
    label = bl.label + (f"; {bl.u_note}" if bl.u_note and bl.name == "fused-fp64" else "")
    for s in specs:
        f = fields_of(s, mode, ref_fp32_vs_fp64_force_err=bl.u)
        log(f"{mode} {s.name} {s.precision}: checked step")
        try:
            entry, result, note = _first_step(cfg, s, mode, models, data)
        except Exception as exc:
            if not isinstance(exc, NotImplementedError | BackendUnavailableError | TimeoutError):
                traceback.print_exc()
            free_device_memory(device)
            reason = first_line(exc)
            if s.kind == "compile" and timed_out(exc):
                reason = f"compiling took longer than compile_timeout_s = {cfg.compile_timeout_s} s"
            out(**f, status=status_of(exc), reason=reason)
            continue
        explain = entry.module.explain()
        f.update(explain=explain, requested_backend=entry.requested_backend, reason=note)
        mismatch = backend_mismatch(s, explain)
        if mismatch:
            out(**{**f, "status": "failed", "reason": mismatch})
            continue
        grads = grads_of(entry.module) if mode == "training" else None
        if (s.kind, s.precision) == ("reference", "fp32"):
            # the float32 reference's record: its own error against float64 (not a gate)
            if bl.name == "reference-fp32":
                f.update(energy_err_rel=bl.ref_errors[0], max_force_err_rel=bl.u)
            else:
                f.update(_errors_of(result, bl.outputs))
            f.update(error_baseline=bl.ref_label)
            if grads is not None and cfg.baseline_grads == "reference-fp32":
                ref_grads = {k: None if g is None else g.detach().clone() for k, g in grads.items()}
            elif grads is not None and ref_grads is not None:
                f.update(max_grad_err_rel=grad_error(grads, ref_grads))
        else:
            checked = CHECK_HOOK(s, mode, result) if CHECK_HOOK is not None else result
            tol = tolerance_for(s.kind, s.precision)
            chk = check_outputs(checked, bl.outputs, tol, bl.u, grads, ref_grads)
            f.update(
                energy_err_rel=chk.energy_err,
                max_force_err_rel=chk.force_err,
                force_cosine=chk.force_cos,
                max_grad_err_rel=chk.grad_err,
                force_err_limit=chk.force_limit,
                error_baseline=label,
            )
            if not chk.passed:
                out(**{**f, "status": "wrong", "reason": chk.reason})
                continue
        del result, grads
        ok[s] = (_Guarded(make_step(entry.call, entry.params, mode, data), device), f)

    if cfg.check_only:
        for _g, f in ok.values():
            out(**f, status="ok")
        return
    steps = {s: g for s, (g, _) in ok.items()}
    log(f"{mode}: timing {[s.name + ' ' + s.precision for s in steps]}")
    replays = _floor_replays(bl.calls, device, {s.precision for s in steps})
    # The checked step above was each path's first warm-up call; each floor replay ran once too.
    warmup = max(0, cfg.warmup - 1)
    times = measure.time_interleaved(
        {**steps, **{f"GEMM floor ({p})": g for p, (g, _) in replays.items()}},
        device,
        cfg.repeats,
        warmup,
    )

    factor = TRAINING_FACTOR if mode == "training" else 1.0
    floors = {
        p: replay.floor(last=cfg.repeats) if guarded.error is None else None
        for p, (guarded, replay) in replays.items()
    }
    # the algebraic floor of each timed replay (its repeats' spread is reported with every record)
    floor_samples = {
        p: [f.algebraic_s * factor for f in replay.samples[-cfg.repeats :]]
        for p, (guarded, replay) in replays.items()
        if guarded.error is None
    }
    del replays  # their operands are not held during the memory steps

    def floor_of(precision: str) -> Floor | None:
        f = floors.get(precision)
        return None if f is None else f.scaled(factor)

    log(f"{mode}: memory")
    # Activation memory is taken above the weights and gradients held before the step, so its
    # training step keeps the gradients allocated (zeroed in place) rather than dropping them.
    mem = {}
    for s, g in steps.items():
        if g.error is None:
            entry = models.get(s)
            mem_step = _Guarded(
                make_step(entry.call, entry.params, mode, data, zero_grads="in_place"), device
            )
            mem[s] = measure.activation_memory(mem_step, device)
            g.error = mem_step.error  # a step that fails here (out of memory) fails the record
    ref_spec = next((s for s in ok if (s.kind, s.precision) == ("reference", "fp32")), None)
    ref_median = None
    if ref_spec is not None and steps[ref_spec].error is None:
        ref_median = measure.median(times[ref_spec])
    for s, (g, f) in ok.items():
        if g.error is not None:
            out(**{**f, "status": g.error[0], "reason": g.error[1]})
            continue
        med = measure.median(times[s])
        fl, iso = floor_of(s.precision), isolated_of(s.precision, mode)
        over_floor = (med / fl.algebraic_s) if fl and fl.algebraic_s > 0 else None
        out(
            **f,
            status="ok",
            median_s=med,
            times_s=times[s],
            **spread_fields(times[s], floor_samples.get(s.precision), over_floor),
            speedup_vs_reference=(ref_median / med) if ref_median and med else None,
            repeats=len(times[s]),
            warmup=max(1, cfg.warmup),  # the checked step is the first
            atom_steps_per_s=f["natoms"] / med if med else None,
            peak_mem_bytes=mem.get(s),
            floor_s=fl.algebraic_s if fl else None,
            gemm_floor_s=fl.gemm_s if fl else None,
            time_over_floor=over_floor,
            time_over_gemm_floor=(med / fl.gemm_s) if fl and fl.gemm_s > 0 else None,
            gemm_flops=fl.flops if fl else None,
            algebraic_gemm_flops=fl.algebraic_flops if fl else None,
            gemm_flops_per_s=fl.flops_per_s if fl else None,
            isolated_floor_s=iso.algebraic_s if iso else None,
            time_over_isolated_floor=(med / iso.algebraic_s)
            if iso and iso.algebraic_s > 0
            else None,
            device_peak_flops_per_s=device_peak_flops(f["device"], s.precision)
            if device.type == "cuda"
            else None,
        )


def _floor_replays(
    calls: list | None, device: torch.device, precisions: set[str]
) -> dict[str, tuple[_Guarded, GemmReplay]]:
    """Per precision, the reference's GEMM replay (floor.py) as a guarded step, run once (warm-up,
    not kept). A replay that cannot be built or fails leaves that precision without a floor; no
    calls (the reference did not run here) leave every precision without one."""
    out: dict[str, tuple[_Guarded, GemmReplay]] = {}
    if calls is None:
        return out
    for p in sorted(precisions):
        try:
            replay = GemmReplay(calls, device, p)
        except Exception as exc:
            print(f"scn-bench: GEMM floor ({p}): {first_line(exc)}", file=sys.stderr)
            free_device_memory(device)
            continue
        guarded = _Guarded(replay, device)
        guarded()
        replay.clear()
        if guarded.error is not None:
            print(f"scn-bench: GEMM floor ({p}): {guarded.error[1]}", file=sys.stderr)
        out[p] = (guarded, replay)
    return out


def _first_step(cfg: PointConfig, s: PathSpec, mode: str, models: Models, data: AtomsBatch):
    """Build ``s`` and run its first (checked) step: (entry, outputs, note). An explicitly requested
    fused backend that the dispatcher refuses for some op is retried with backend="auto", kept only if
    the edge ops then ran on the requested backend (the caller checks explain)."""
    limit = cfg.compile_timeout_s if s.name == COMPILE else None
    entry = models.get(s)
    try:
        with time_limit(limit):
            result = make_step(entry.call, entry.params, mode, data)()
        return entry, result, entry.note
    except BackendUnavailableError as exc:
        if s.kind != "fused" or entry.requested_backend == "auto":
            raise
        auto = models.get(s, backend="auto")
        auto.note = (
            f"backend={s.name!r} raised ({first_line(exc)}); ran backend='auto' instead, kept only "
            "because its edge ops ran on the requested backend"
        )
        result = make_step(auto.call, auto.params, mode, data)()
        if backend_mismatch(s, auto.module.explain()):
            models.replace(s, exc.with_traceback(None))  # backend='auto' does not run it either
            raise exc
        models.replace(s, auto)
        return auto, result, auto.note


# ----------------------------------------------------------------------------- process entry
def apply_memory_limit(cfg: PointConfig) -> int | None:
    """Set RLIMIT_AS for this process on CPU (the limit, or the current address space plus the
    headroom); returns the limit set, or None. On CUDA the device's memory is the limit."""
    if torch.device(cfg.device).type != "cpu":
        return None
    limit = cfg.mem_limit_bytes
    if cfg.mem_headroom_bytes is not None:
        current = measure.address_space_bytes() or 0
        limit = current + cfg.mem_headroom_bytes
    if limit is None:
        return None
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


def _preload(cfg: PointConfig) -> None:
    """Load what the paths need before the memory limit applies (a failed build is reported later)."""
    if "extension" in cfg.paths:
        try:
            from ..extension import load_extension

            load_extension()
        except Exception as exc:
            print(f"scn-bench: extension unavailable: {first_line(exc)}", file=sys.stderr)
    if torch.device(cfg.device).type == "cuda":
        torch.zeros(1, device=cfg.device)  # create the CUDA context


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = PointConfig.from_json(argv[0] if argv else sys.stdin.read())
    _preload(cfg)
    apply_memory_limit(cfg)

    def emit(rec: dict) -> None:
        sys.stdout.write(RECORD_PREFIX + json.dumps(rec, allow_nan=False) + "\n")
        sys.stdout.flush()

    try:
        run_point(cfg, emit)
    except MemoryError:
        traceback.print_exc()
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
