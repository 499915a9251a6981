"""The benchmark sweep: presets x sizes, each size point in its own process.

For every preset, sizes run in the order given; each point (``point.run_point``: all modes x paths x
precisions on one system) runs as ``python -m scn_fast.benchmark.point`` with a memory limit, streaming
its records back as JSON lines, so running out of memory becomes records with status ``oom`` instead of
a crash of the suite. Before a point starts, ``baseline.decide_point`` estimates its memory and time
(``estimate.py``) and chooses its correctness baseline (the float32 reference, or the fused path in
float64 where the reference would not fit or finish), which reference paths it runs (the others are
``skipped``, with the estimate) and how many repeats fit its time budget (``point_minutes``). After
its first ``oom`` or ``skipped``, a (mode, path, precision) is not run at larger sizes of that preset
(nor is anything once no baseline fits: nothing could be checked). In a sweep whose larger points
switch to the float64 fused baseline, the points that still run the reference also check the float64
fused path against the float64 reference (``baseline_check``); should it disagree there, the larger
points are not run. The fused paths are every fused backend the dispatcher accepts on the device (the
others are listed in the run's metadata with the dispatcher's reason). torch.compile of the
reference, which takes minutes to compile, runs after the sweep in points of its own (the reference
and the compiled reference, at each preset's smallest size); its speedup is against the reference of
that process.

``large``: the size sweep of ``scn-fast bench --large`` (``large.py``): scn-t4-b2 up to 2,000 atoms
on CPU by default, its plan and estimated duration printed before anything runs, a markdown table
and time / memory plots against atoms afterwards.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..presets import PRESETS
from .baseline import PointDecision, decide_point
from .env import environment, supported_precisions
from .estimate import PointSize, count_edges, mem_available_bytes
from .noise import busy_warning, load_average, usable_cores
from .paths import COMPILE, backend_refusal, fused_backends, path_spec
from .point import NO_BASELINE, RECORD_PREFIX, PointConfig
from .progress import Progress
from .records import MODES, make_record, record_key
from .systems import (
    DEFAULT_SIZES_CPU,
    DEFAULT_SIZES_CUDA,
    LARGE_SIZES_CPU,
    LARGE_SIZES_CUDA,
    build_system,
    parse_size,
)

DEFAULT_PRESETS = {
    "cpu": ("tiny", "scn-t1-b1", "scn-t4-b2"),
    "cuda": ("scn-t4-b2", "scn-t1-b1", "scn-all-md", "tiny"),  # most wanted first (--max-minutes)
}
QUICK_PRESETS = ("scn-t4-b2", "tiny")
LARGE_PRESETS = ("scn-t4-b2",)
POINT_MINUTES = {"cpu": 20.0, "cuda": 10.0}


@dataclass
class SuiteConfig:
    """A benchmark run. None means the device's default: presets ``DEFAULT_PRESETS``; sizes
    ``systems.DEFAULT_SIZES_*``; paths: the reference, every fused backend the dispatcher accepts, and
    torch.compile of the reference (``compile``: default on CUDA only, as compiling SCN with inductor
    on a 2-core CPU takes many minutes per graph); precisions: every one the device supports.
    ``mem_limit_bytes``: address-space limit of each CPU point process (default: physical memory);
    ``mem_headroom_bytes``: instead, the point's address space at start plus this (tests).
    ``max_minutes``: no new point starts after this much time (None: no limit). ``threads``: torch's
    intra-op threads in each point (None: torch's default).
    ``baseline``: "auto" (``baseline.decide_point``), "reference-fp32" or "fused-fp64".
    ``mem_available_bytes``: the memory the estimates may plan for (None: the machine's available
    memory, ``estimate.mem_available_bytes``, at each point's start). ``point_minutes``: a point's
    time budget (None: ``POINT_MINUTES`` of the device; 0: none). ``large``: the ``--large`` sweep
    (defaults ``LARGE_PRESETS``, ``systems.LARGE_SIZES_*``; its plan printed first; large.py)."""

    device: str = "cpu"
    presets: list[str] | None = None
    modes: list[str] = field(default_factory=lambda: list(MODES))
    sizes: list[str] | None = None
    paths: list[str] | None = None
    compile: bool | None = None
    precisions: list[str] | None = None
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    out: str = "bench-out"
    mem_limit_bytes: int | None = None
    mem_headroom_bytes: int | None = None
    compile_timeout_s: float = 900.0
    max_minutes: float | None = None
    threads: int | None = None
    progress: bool = True
    quick: bool = False
    large: bool = False
    baseline: str = "auto"
    mem_available_bytes: int | None = None
    point_minutes: float | None = None


def quick_config(presets: list[str] | None = None, **overrides: Any) -> SuiteConfig:
    """``--quick``: scn-t4-b2 and tiny (or ``presets``), the 14-atom Cu(111)+CO slab, inference and
    training, the reference vs every fused backend, float32, 3 repeats after 1 warm-up."""
    base = SuiteConfig(
        presets=list(presets or QUICK_PRESETS),
        sizes=["14"],
        compile=False,
        precisions=["fp32"],
        repeats=3,
        warmup=1,
        quick=True,
    )
    return replace(base, **overrides)


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class Plan:
    """The resolved run: the paths of the size sweep, whether torch.compile of the reference runs (in
    its own points, at the smallest size of each preset, after the sweep: compiling takes minutes),
    and the fused backends refused (with the dispatcher's reasons)."""

    cfg: SuiteConfig
    presets: list[str]
    sizes: list[str]
    paths: list[str]
    compile: bool
    precisions: list[str]
    refused: dict[str, str]
    _sizes: dict[tuple[str, str], PointSize] = field(default_factory=dict, repr=False)
    _planned: dict[tuple[str, str], PointDecision] = field(default_factory=dict, repr=False)

    @property
    def mem_limit(self) -> int | None:
        """RLIMIT_AS of each CPU point process (None: none, or the headroom mode of tests)."""
        c = self.cfg
        if c.mem_limit_bytes is None and c.mem_headroom_bytes is None and c.device == "cpu":
            return physical_memory_bytes()
        return c.mem_limit_bytes

    @property
    def budget_s(self) -> float | None:
        """A point's time budget in seconds (None: none)."""
        c = self.cfg
        minutes = c.point_minutes
        if minutes is None:
            minutes = POINT_MINUTES.get(torch.device(c.device).type, POINT_MINUTES["cpu"])
        return minutes * 60 if minutes > 0 else None

    def mem_available(self) -> int | None:
        """Memory a point may plan for, now (``SuiteConfig.mem_available_bytes`` when given)."""
        c = self.cfg
        if c.mem_available_bytes is not None:
            return c.mem_available_bytes
        if torch.device(c.device).type == "cuda":
            if not torch.cuda.is_available():
                return None
            total = torch.cuda.get_device_properties(torch.device(c.device)).total_memory
            return int(0.9 * total)  # without creating a CUDA context in this process
        return mem_available_bytes(c.device, self.mem_limit)

    def size_of(self, preset: str, size: str) -> PointSize:
        """Atoms and edges per resolution of a point (the model's radius graph, computed once)."""
        key = (preset, size)
        if key not in self._sizes:
            self._sizes[key] = count_edges(preset, build_system(parse_size(size)))
        return self._sizes[key]

    def decide(
        self,
        preset: str,
        size: str,
        skip: set[tuple[str, str, str]] = frozenset(),
        paths: list[str] | None = None,
        mem: int | None = None,
    ) -> PointDecision:
        """The point's decision (baseline.decide_point) with the memory available ``mem``."""
        c = self.cfg
        paths = self.paths if paths is None else paths
        keys = [k for k in self.record_keys(paths) if k not in skip]
        return decide_point(
            preset,
            self.size_of(preset, size),
            [m for m in c.modes if any(k[0] == m for k in keys)],
            [p for p in paths if any(k[1] == p for k in keys)],
            self.precisions,
            device=c.device,
            repeats=c.repeats,
            warmup=c.warmup,
            mem_available=mem,
            budget_s=self.budget_s,
            force=c.baseline,
        )

    def planned(self, preset: str, size: str) -> PointDecision:
        """The decision stated before the run (memory available at its start; no oom yet)."""
        key = (preset, size)
        if key not in self._planned:
            self._planned[key] = self.decide(preset, size, mem=self._mem_at_start)
        return self._planned[key]

    @functools.cached_property
    def _mem_at_start(self) -> int | None:
        return self.mem_available()

    def point(
        self,
        preset: str,
        size: str,
        skip: set[tuple[str, str, str]],
        paths: list[str],
        decision: PointDecision | None = None,
        check_fused_fp64: bool = False,
        u_carried: tuple[float, int] | None = None,
    ) -> PointConfig:
        c = self.cfg
        d = decision
        return PointConfig(
            preset=preset,
            size=size,
            device=c.device,
            modes=list(c.modes),
            paths=list(paths),
            precisions=list(self.precisions),
            repeats=d.repeats if d else c.repeats,
            warmup=d.warmup if d else c.warmup,
            seed=c.seed,
            skip=[list(k) for k in sorted(skip)],
            mem_limit_bytes=self.mem_limit,
            mem_headroom_bytes=c.mem_headroom_bytes,
            compile_timeout_s=c.compile_timeout_s,
            threads=c.threads,
            baseline=d.baseline if d else "reference-fp32",
            reference_forward=d.reference_forward if d else True,
            baseline_grads=d.baseline_grads if d else "reference-fp32",
            check_fused_fp64=check_fused_fp64 and d is not None and d.baseline == "reference-fp32",
            u_carried=list(u_carried) if u_carried else None,
            not_run=[[*k, why] for k, why in sorted(d.not_run.items())] if d else [],
            baseline_estimate=d.estimate if d else None,
            path_estimates=d.path_estimates if d else {},
        )

    def record_keys(self, paths: list[str] | None = None) -> list[tuple[str, str, str]]:
        """(mode, path, precision) of the records one point of ``paths`` gives."""
        paths = self.paths if paths is None else paths
        return [(m, p, q) for m in self.cfg.modes for q in self.precisions for p in paths]

    @property
    def all_paths(self) -> list[str]:
        return [*self.paths, *([COMPILE] if self.compile else [])]

    @property
    def total_records(self) -> int:
        n = len(self.presets) * len(self.sizes) * len(self.record_keys())
        return n + (len(self.presets) * len(self.record_keys([COMPILE])) if self.compile else 0)


def make_plan(cfg: SuiteConfig) -> Plan:
    """Resolve defaults and probe the dispatcher for the fused backends it accepts on the device.
    Explicit ``paths`` are run as given (the reference only when named: the baseline no longer
    needs it as a timed path)."""
    dev = torch.device(cfg.device).type
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("scn-fast bench: --device cuda, but no CUDA device is visible")
    if cfg.baseline != "auto" and cfg.baseline not in ("reference-fp32", "fused-fp64"):
        raise SystemExit(f"scn-fast bench: unknown baseline {cfg.baseline!r}")
    if cfg.large:
        presets = list(cfg.presets or LARGE_PRESETS)
        default_sizes = LARGE_SIZES_CUDA if dev == "cuda" else LARGE_SIZES_CPU
    else:
        presets = list(cfg.presets or DEFAULT_PRESETS.get(dev, DEFAULT_PRESETS["cpu"]))
        default_sizes = DEFAULT_SIZES_CUDA if dev == "cuda" else DEFAULT_SIZES_CPU
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise SystemExit(f"scn-fast bench: unknown preset(s) {unknown}; known: {sorted(PRESETS)}")
    sizes = [parse_size(s).label for s in (cfg.sizes or default_sizes)]
    supported = supported_precisions(cfg.device)
    # --large: float32 unless asked (a second precision doubles every large point)
    precisions = list(cfg.precisions or (["fp32"] if cfg.large else supported))
    if "fp32" not in precisions:
        precisions.insert(0, "fp32")  # the float32 reference is every path's baseline
    bad = [p for p in precisions if p not in supported]
    if bad:
        raise SystemExit(f"scn-fast bench: {bad} not supported on {dev} (supported: {supported})")
    refused: dict[str, str] = {}
    compile_ = cfg.compile if cfg.compile is not None else dev == "cuda"
    if cfg.paths is not None:
        for p in cfg.paths:
            path_spec(p, "fp32")  # validates the name
        paths = [p for p in cfg.paths if p != COMPILE]
        compile_ = COMPILE in cfg.paths or bool(cfg.compile)
        if not paths:
            raise SystemExit("scn-fast bench: --paths names no path to sweep")
    else:
        paths = ["reference"]
        for b in fused_backends():
            why = backend_refusal(b, cfg.device)
            if why is None:
                paths.append(b)
            else:
                refused[b] = why
    return Plan(cfg, presets, sizes, paths, compile_, precisions, refused)


# ----------------------------------------------------------------------------- duration estimate
_COMPILE_S = {"cpu": 900.0, "cuda": 240.0}  # per mode; the compile timeout bounds it
_START_S = 12.0  # a point process: imports, the system, the extension


def estimate_seconds(plan: Plan) -> float:
    """A rough wall-time estimate of the whole run on an idle machine (stated before it starts):
    the sum of the points' estimates (``baseline.decide_point``) and torch.compile's points."""
    c = plan.cfg
    dev = torch.device(c.device).type
    total = 0.0
    for preset in plan.presets:
        for size in plan.sizes:
            total += _START_S + plan.planned(preset, size).seconds
        if plan.compile:
            total += _START_S + len(c.modes) * min(_COMPILE_S.get(dev, 900.0), c.compile_timeout_s)
    return total


# ----------------------------------------------------------------------------- running points
def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


# What a point process that died of memory leaves in its log (Python, torch, glibc, OpenBLAS).
_OOM_LOG_TEXT = (
    "memoryerror",
    "out of memory",
    "cannot allocate memory",
    "can't allocate memory",
    "memory allocation",
    "bad_alloc",
)


def _missing_status(rc: int, log_tail: str) -> tuple[str, str]:
    text = log_tail.lower()
    memory = rc in (3, -9, 137) or any(s in text for s in _OOM_LOG_TEXT)
    last = next((ln for ln in reversed(log_tail.splitlines()) if ln.strip()), "")
    why = f"point process exited with code {rc}" + (f": {last.strip()}" if last else "")
    return ("oom" if memory else "failed"), why


def run_point_process(
    point: PointConfig,
    log_path: Path,
    on_record,
    expected: list[tuple[str, str, str]],
    extra_env: dict[str, str] | None = None,
) -> list[dict]:
    """Run ``point`` in a subprocess (stderr and stray stdout to ``log_path``) and return the records
    of the ``expected`` keys (others it reports are dropped); those it did not report (it crashed)
    are made here: ``oom`` if it died of memory, else ``failed``. ``extra_env``: variables set for
    the point process after the suite's own (a correctness check, never a timing, may set
    ``TRITON_INTERPRET=1`` to run the Triton path on CPU). On CPU every record gets the process's
    peak RSS (``point_peak_rss_bytes``: ``ru_maxrss`` of the finished process, from ``wait4``)."""
    env = dict(os.environ)
    env.pop("SCN_FAST_BACKEND", None)  # the suite chooses backends explicitly
    env.pop("TRITON_INTERPRET", None)  # never benchmark Triton's CPU interpreter
    env.update(extra_env or {})
    env["PYTHONPATH"] = _package_root() + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    records: list[dict] = []
    with open(log_path, "w") as log:
        log.write(f"# point {point.to_json()}\n")
        log.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "scn_fast.benchmark.point", point.to_json()],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(RECORD_PREFIX):
                rec = json.loads(line[len(RECORD_PREFIX) :])
                if record_key(rec) in expected:
                    records.append(rec)
                    on_record(rec)
            else:
                log.write(line)
                log.flush()
        rc, peak_rss = _wait(proc)
    if torch.device(point.device).type == "cpu":
        for rec in records:
            rec["point_peak_rss_bytes"] = peak_rss
    got = {record_key(r) for r in records}
    missing = [k for k in expected if k not in got]
    if missing:
        tail = log_path.read_text()[-4000:]
        status, why = _missing_status(rc, tail)
        for rec in records_without_run(point, missing, status, why):
            rec["point_peak_rss_bytes"] = peak_rss if point.device == "cpu" else None
            records.append(rec)
            on_record(rec)
    return records


def _wait(proc: subprocess.Popen) -> tuple[int, int | None]:
    """(exit code, peak RSS in bytes or None) of a finished child process."""
    try:
        _pid, status, usage = os.wait4(proc.pid, 0)
    except (AttributeError, ChildProcessError, OSError):
        return proc.wait(), None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024  # Linux: kibibytes


def records_without_run(
    point: PointConfig, keys: list[tuple[str, str, str]], status: str, why: str
) -> list[dict]:
    """Records of ``keys`` of a point that gave none of its own (crashed, or not run)."""
    spec = parse_size(point.size)
    natoms = sum(len(a) for a in build_system(spec))
    out = []
    for mode, path, precision in keys:
        ps = path_spec(path, precision)
        out.append(
            make_record(
                config=point.preset,
                mode=mode,
                backend=path,
                requested_backend=ps.requested_backend,
                path_kind=ps.kind,
                precision=precision,
                system=spec.label,
                natoms=natoms,
                nstructures=spec.count,
                status=status,
                reason=why,
                baseline=point.baseline,
                baseline_estimate=point.baseline_estimate,
                **environment(point.device),
            )
        )
    return out


@dataclass
class Sweep:
    """The state of a running suite: records so far, the start time, why it stopped early."""

    plan: Plan
    out: Path
    progress: Progress
    records: list[dict] = field(default_factory=list)
    start: float = field(default_factory=time.time)
    stopped: str | None = None
    load_at_start: float | None = None
    busy: str | None = None

    def over_budget(self, what: str) -> bool:
        limit = self.plan.cfg.max_minutes
        if limit is not None and time.time() - self.start > limit * 60:
            self.stopped = f"time budget of {limit} min reached before {what}"
        return self.stopped is not None

    def run(
        self,
        preset: str,
        size: str,
        paths: list[str],
        expected,
        skip,
        tag: str = "",
        decision: PointDecision | None = None,
        **point_kw: Any,
    ) -> list:
        """One point in its own process; its records are kept and results.json rewritten."""
        self.progress.describe(f"{preset} @ {size} atoms{tag}")
        point = self.plan.point(preset, size, skip, paths, decision, **point_kw)
        log = self.out / "logs" / f"{preset}__{size}{tag.replace(', ', '__')}.log"
        recs = run_point_process(point, log, self.progress.record, expected)
        self.records.extend(recs)
        self._write()
        return recs

    def _write(self) -> None:
        from .report import write_json

        write_json(self.results(), self.out)  # partial results survive an interrupted run

    def sizes(self, preset: str) -> None:
        """The size sweep of one preset, stopping each key after its first oom or skip (module
        doc); each point decided (baseline.decide_point) with the memory available at its start."""
        plan = self.plan
        stop: set[tuple[str, str, str]] = set()
        u_carried: tuple[float, int] | None = None
        broken: str | None = None  # the float64 fused path disagreed with the float64 reference
        for i, size in enumerate(plan.sizes):
            expected = [k for k in plan.record_keys() if k not in stop]
            if not expected or self.over_budget(f"{preset} @ {size}"):
                return
            decision = plan.decide(preset, size, stop, mem=plan.mem_available())
            if broken and decision.baseline == "fused-fp64":
                point = plan.point(preset, size, stop, plan.paths, decision)
                recs = records_without_run(point, expected, "failed", broken)
                for r in recs:
                    self.progress.record(r)
                self.records.extend(recs)
                self._write()
                continue
            later = any(
                plan.planned(preset, s).baseline == "fused-fp64" for s in plan.sizes[i + 1 :]
            )
            recs = self.run(
                preset,
                size,
                plan.paths,
                expected,
                stop,
                decision=decision,
                check_fused_fp64=later,
                u_carried=u_carried,
            )
            stop |= {record_key(r) for r in recs if r["status"] in ("oom", "skipped")}
            if any((r["reason"] or "").startswith(NO_BASELINE) for r in recs):
                stop |= set(plan.record_keys())  # nothing larger can be checked either
            for r in recs:
                u = r.get("ref_fp32_vs_fp64_force_err")
                if u is not None and decision.reference_forward:  # measured here, not carried
                    u_carried = (u, r["natoms"])
                check = r.get("baseline_check") or {}
                if check.get("passed") is False:
                    broken = (
                        f"not run: the float64 fused baseline disagreed with the float64 "
                        f"reference at {r['natoms']} atoms ({check})"
                    )
            self.progress.skip(len(plan.record_keys()) - len(expected))

    def results(self) -> dict[str, Any]:
        plan, cfg = self.plan, self.plan.cfg
        metadata = {
            "suite": asdict(cfg),
            "presets": plan.presets,
            "sizes": plan.sizes,
            "paths": plan.all_paths,
            "precisions": plan.precisions,
            "backends_refused": plan.refused,
            "expected_duration_s": estimate_seconds(plan),
            "duration_s": time.time() - self.start,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.start)),
            "stopped_early": self.stopped,
            "load_average_at_start": self.load_at_start,
            "cores": usable_cores(),
            "busy_warning": self.busy,
            "noisy_records": sum(1 for r in self.records if r.get("noisy")),
            **environment(cfg.device),
        }
        if self.records:  # the points' own view (their thread count may differ from ours)
            metadata.update({k: self.records[0][k] for k in ("device", "threads")})
        return {"metadata": metadata, "records": list(self.records)}


def run_suite(cfg: SuiteConfig) -> dict[str, Any]:
    """Run the benchmark ``cfg`` describes; write results.json (also after every point), the table
    and the plots into ``cfg.out`` and print the table. Returns {"metadata": ..., "records": [...]}.
    The expected duration is printed before anything runs; with ``large`` also each point's plan
    (atoms, edges, baseline, reference paths not run, repeats, estimated minutes) and, after the
    run, the markdown table and the time and memory plots (large.py)."""
    from . import large, report

    plan = make_plan(cfg)
    out = Path(cfg.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    tag = " --quick" if cfg.quick else (" --large" if cfg.large else "")
    print(
        f"scn-fast bench{tag} on {cfg.device}: presets {plan.presets}, "
        f"sizes {plan.sizes}, modes {list(cfg.modes)}, paths {plan.all_paths}, precisions "
        f"{plan.precisions}; {plan.total_records} records at most; expected duration about "
        f"{estimate_seconds(plan) / 60:.0f} min (rough estimate for an idle machine)",
        flush=True,
    )
    if cfg.large:
        print(large.describe_plan(plan), flush=True)
    for b, why in plan.refused.items():
        print(f"  not benchmarked: {b}: {why}", flush=True)
    sweep = Sweep(plan, out, Progress(plan.total_records, enabled=cfg.progress))
    sweep.load_at_start = load_average()
    sweep.busy = busy_warning(sweep.load_at_start)
    if sweep.busy:
        print(sweep.busy, file=sys.stderr, flush=True)
    try:
        for preset in plan.presets:
            sweep.sizes(preset)
            if sweep.stopped:
                break
        for preset in plan.presets if plan.compile and not sweep.stopped else []:
            size = plan.sizes[0]
            if sweep.over_budget(f"torch.compile of {preset} @ {size}"):
                break
            keys = plan.record_keys([COMPILE])
            decision = plan.decide(
                preset, size, paths=["reference", COMPILE], mem=plan.mem_available()
            )
            sweep.run(
                preset, size, ["reference", COMPILE], keys, set(), ", torch.compile", decision
            )
    finally:
        sweep.progress.close()
    results = sweep.results()
    report.write_all(results, out)
    if cfg.large:
        large.write_all(results, out)
    return results
