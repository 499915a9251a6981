"""The benchmark sweep: presets x sizes, each size point in its own process.

For every preset, sizes run in the order given; each point (``point.run_point``: all modes x paths x
precisions on one system) runs as ``python -m scn_fast.benchmark.point`` with a memory limit, streaming
its records back as JSON lines, so running out of memory becomes records with status ``oom`` instead of
a crash of the suite. After its first ``oom``, a (mode, path, precision) is not run at larger sizes of
that preset (nor is anything once the float32 reference itself no longer fits: nothing could be
checked). The fused paths are every fused backend the dispatcher accepts on the device (the others are
listed in the run's metadata with the dispatcher's reason). torch.compile of the reference, which takes
minutes to compile, runs after the sweep in points of its own (the reference and the compiled
reference, at each preset's smallest size); its speedup is against the reference of that process.
"""

from __future__ import annotations

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
from .env import environment, supported_precisions
from .noise import busy_warning, load_average, usable_cores
from .paths import COMPILE, backend_refusal, fused_backends, path_spec
from .point import NO_BASELINE, RECORD_PREFIX, PointConfig
from .progress import Progress
from .records import MODES, make_record, record_key
from .systems import (
    DEFAULT_SIZES_CPU,
    DEFAULT_SIZES_CUDA,
    build_system,
    parse_size,
)

DEFAULT_PRESETS = {
    "cpu": ("tiny", "scn-t1-b1", "scn-t4-b2"),
    "cuda": ("scn-t4-b2", "scn-t1-b1", "scn-all-md", "tiny"),  # most wanted first (--max-minutes)
}
QUICK_PRESETS = ("scn-t4-b2", "tiny")


@dataclass
class SuiteConfig:
    """A benchmark run. None means the device's default: presets ``DEFAULT_PRESETS``; sizes
    ``systems.DEFAULT_SIZES_*``; paths: the reference, every fused backend the dispatcher accepts, and
    torch.compile of the reference (``compile``: default on CUDA only, as compiling SCN with inductor
    on a 2-core CPU takes many minutes per graph); precisions: every one the device supports.
    ``mem_limit_bytes``: address-space limit of each CPU point process (default: physical memory);
    ``mem_headroom_bytes``: instead, the point's address space at start plus this (tests).
    ``max_minutes``: no new point starts after this much time (None: no limit). ``threads``: torch's
    intra-op threads in each point (None: torch's default)."""

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

    def point(
        self, preset: str, size: str, skip: set[tuple[str, str, str]], paths: list[str]
    ) -> PointConfig:
        c = self.cfg
        mem_limit = c.mem_limit_bytes
        if mem_limit is None and c.mem_headroom_bytes is None and c.device == "cpu":
            mem_limit = physical_memory_bytes()
        return PointConfig(
            preset=preset,
            size=size,
            device=c.device,
            modes=list(c.modes),
            paths=list(paths),
            precisions=list(self.precisions),
            repeats=c.repeats,
            warmup=c.warmup,
            seed=c.seed,
            skip=[list(k) for k in sorted(skip)],
            mem_limit_bytes=mem_limit,
            mem_headroom_bytes=c.mem_headroom_bytes,
            compile_timeout_s=c.compile_timeout_s,
            threads=c.threads,
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
    """Resolve defaults and probe the dispatcher for the fused backends it accepts on the device."""
    dev = torch.device(cfg.device).type
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("scn-fast bench: --device cuda, but no CUDA device is visible")
    presets = list(cfg.presets or DEFAULT_PRESETS.get(dev, DEFAULT_PRESETS["cpu"]))
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise SystemExit(f"scn-fast bench: unknown preset(s) {unknown}; known: {sorted(PRESETS)}")
    default_sizes = DEFAULT_SIZES_CUDA if dev == "cuda" else DEFAULT_SIZES_CPU
    sizes = [parse_size(s).label for s in (cfg.sizes or default_sizes)]
    supported = supported_precisions(cfg.device)
    precisions = list(cfg.precisions or supported)
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
    else:
        paths = ["reference"]
        for b in fused_backends():
            why = backend_refusal(b, cfg.device)
            if why is None:
                paths.append(b)
            else:
                refused[b] = why
    if "reference" not in paths:
        paths.insert(0, "reference")
    return Plan(cfg, presets, sizes, paths, compile_, precisions, refused)


# ----------------------------------------------------------------------------- duration estimate
# Reference step seconds on the 14-atom slab, idle 2-core CPU, float32 (docs/measurement.md and runs
# of this suite): (inference, training). Other sizes scale with the atom count.
_CPU_REF_S = {
    "tiny": (0.05, 0.15),
    "scn-t1-b1": (0.6, 1.8),
    "scn-t4-b2": (1.5, 4.2),
    "scn-all-md": (2.0, 5.6),
}
_PARAMS_M = {"tiny": 0.1, "scn-t1-b1": 120.0, "scn-t4-b2": 127.0, "scn-all-md": 169.0}
_COMPILE_S = {"cpu": 900.0, "cuda": 240.0}  # per mode; the compile timeout bounds it


def estimate_seconds(plan: Plan) -> float:
    """A rough wall-time estimate of the whole run on an idle machine (stated before it starts)."""
    c = plan.cfg
    dev = torch.device(c.device).type
    runs = max(c.warmup, 1) + c.repeats + 1  # checked step (= first warm-up), repeats, memory
    # a fused fp32 path ~0.8x the reference; other precisions fail fast until precision modes land
    per_path = sum(1.0 if p == "reference" else 0.8 for p in plan.paths)
    total = 0.0
    for preset in plan.presets:
        inf, train = _CPU_REF_S.get(preset, (2.0, 5.6))
        build = 6 + _PARAMS_M.get(preset, 100) / 40 * (len(plan.paths) + 1)
        for size in plan.sizes:
            spec = parse_size(size)
            scale = spec.count * spec.size / 14
            step = {"inference": inf * scale, "training": train * scale}
            if dev == "cuda":
                step = {m: max(0.03, t / 60) for m, t in step.items()}
            total += build + 3 * step["inference"]  # start-up, baseline, float64, floors
            total += sum(runs * step[m] * per_path for m in c.modes)
            # the GEMM floor's replays: one per round and precision, ~0.45x a reference inference
            total += len(c.modes) * (runs - 1) * len(plan.precisions) * 0.45 * step["inference"]
        if plan.compile:
            total += build + len(c.modes) * min(_COMPILE_S.get(dev, 900.0), c.compile_timeout_s)
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
    ``TRITON_INTERPRET=1`` to run the Triton path on CPU)."""
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
        rc = proc.wait()
    got = {record_key(r) for r in records}
    missing = [k for k in expected if k not in got]
    if missing:
        tail = log_path.read_text()[-4000:]
        status, why = _missing_status(rc, tail)
        spec = parse_size(point.size)
        natoms = sum(len(a) for a in build_system(spec))
        for mode, path, precision in missing:
            ps = path_spec(path, precision)
            rec = make_record(
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
                **environment(point.device),
            )
            records.append(rec)
            on_record(rec)
    return records


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

    def run(self, preset: str, size: str, paths: list[str], expected, skip, tag: str = "") -> list:
        """One point in its own process; its records are kept and results.json rewritten."""
        self.progress.describe(f"{preset} @ {size} atoms{tag}")
        point = self.plan.point(preset, size, skip, paths)
        log = self.out / "logs" / f"{preset}__{size}{tag.replace(', ', '__')}.log"
        recs = run_point_process(point, log, self.progress.record, expected)
        self.records.extend(recs)
        from .report import write_json

        write_json(self.results(), self.out)  # partial results survive an interrupted run
        return recs

    def sizes(self, preset: str) -> None:
        """The size sweep of one preset, stopping each key after its first oom."""
        plan = self.plan
        ooms: set[tuple[str, str, str]] = set()
        for size in plan.sizes:
            expected = [k for k in plan.record_keys() if k not in ooms]
            if not expected or self.over_budget(f"{preset} @ {size}"):
                return
            recs = self.run(preset, size, plan.paths, expected, ooms)
            ooms |= {record_key(r) for r in recs if r["status"] == "oom"}
            if any((r["reason"] or "").startswith(NO_BASELINE) for r in recs):
                ooms |= set(plan.record_keys())  # nothing larger can be checked either
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
    and the plots into ``cfg.out`` and print the table. Returns {"metadata": ..., "records": [...]}."""
    from . import report

    plan = make_plan(cfg)
    out = Path(cfg.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    print(
        f"scn-fast bench{' --quick' if cfg.quick else ''} on {cfg.device}: presets {plan.presets}, "
        f"sizes {plan.sizes}, modes {list(cfg.modes)}, paths {plan.all_paths}, precisions "
        f"{plan.precisions}; {plan.total_records} records at most; expected duration about "
        f"{estimate_seconds(plan) / 60:.0f} min (rough estimate for an idle machine)",
        flush=True,
    )
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
            sweep.run(preset, size, ["reference", COMPILE], keys, set(), ", torch.compile")
    finally:
        sweep.progress.close()
    results = sweep.results()
    report.write_all(results, out)
    return results
