"""The stages of ``bench/gpu_suite.sh`` (run through the shell script, which checks the tools first).

    python bench/gpu_suite.py OUTDIR --scratch DIR [--rehearse]

Stages, in order, each a subprocess with a hard deadline (seconds since the start of the suite; a
stage still running at its deadline is killed, its process group with it, and recorded as ``timeout``):

1. ``build``   compiles (or reuses) the C++/CUDA extension once, so that no later stage pays for it;
2. ``smoke``   one benchmark point on a small system (``scn_fast.benchmark.point``): forward + backward
               of the reference, triton and extension backends in fp32 and bf16, each checked against
               the float32 reference at its precision's tolerance, with ``model.explain()``;
3. ``pytest``  ``pytest -m gpu -x`` (the CUDA equivalence tests; CPU-only tests are deselected);
4. ``bench``   ``scn-fast bench`` (``python -m scn_fast.benchmark.cli``): scn-t4-b2 at 38, 200, 500,
               1000 atoms, fp32 and bf16, inference and training, every backend, correctness-gated;
               no new size point starts after the stage's soft deadline, an out-of-memory is ``oom``;
5. ``ops``     the op microbenchmarks (``bench/bench_*.py``, pytest-benchmark), one file at a time,
               none started after the soft deadline;
6. ``tf32``    the benchmark again in tf32, only with the time left (GPU only).

``--rehearse`` runs the same plumbing on CPU (``TRITON_INTERPRET=1`` for the smoke's Triton path,
the tiny preset, 14 atoms, a few op benchmarks) in under 3 minutes and then requires every record it
produced to be ``ok``: it is how CI keeps this kit working without a GPU.

Outputs and their limits: ``gpu_suite_output``. Logs are kept in ``--scratch`` and packed into
OUTDIR/logs.tar.gz after every stage, so a run cut short still leaves them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import gpu_suite_output as output  # noqa: E402

from scn_fast.benchmark.env import environment  # noqa: E402
from scn_fast.benchmark.noise import busy_warning, load_average, usable_cores  # noqa: E402
from scn_fast.benchmark.report import format_table, write_plots  # noqa: E402

STAGES = ("build", "smoke", "pytest", "bench", "ops", "tf32")


@dataclass(frozen=True)
class Profile:
    """Everything that differs between the GPU run and its CPU rehearsal. ``deadlines``: seconds
    since the start by which each stage must have ended (hard); ``soft``: after which no new
    benchmark point starts (bench, ops, tf32)."""

    name: str
    device: str
    budget_s: float
    deadlines: dict[str, float]
    soft: dict[str, float]
    smoke_preset: str
    smoke_size: str
    smoke_paths: tuple[str, ...]
    smoke_precisions: tuple[str, ...]
    bench_preset: str
    bench_sizes: tuple[str, ...]
    bench_precisions: tuple[str, ...]
    bench_repeats: int
    ops_files: tuple[str, ...]
    ops_select: str
    tf32: bool
    smoke_env: dict[str, str] = field(default_factory=dict)
    scale_with_load: bool = False


GPU = Profile(
    name="gpu",
    device="cuda",
    budget_s=480.0,
    deadlines={"build": 140, "smoke": 200, "pytest": 255, "bench": 415, "ops": 452, "tf32": 472},
    soft={"bench": 390, "ops": 442, "tf32": 460},
    smoke_preset="scn-t4-b2",
    smoke_size="14",
    smoke_paths=("reference", "triton", "extension"),
    smoke_precisions=("fp32", "bf16"),
    bench_preset="scn-t4-b2",
    bench_sizes=("38", "200", "500", "1000"),
    bench_precisions=("fp32", "bf16"),
    bench_repeats=3,
    ops_files=(
        "bench_edge_rotation.py",
        "bench_scatter_aggregation.py",
        "bench_tap_combine.py",
        "bench_tap_projection.py",
        "bench_grid_projection.py",
    ),
    ops_select="cuda",
    tf32=True,
)

REHEARSAL = Profile(
    name="rehearsal",
    device="cpu",
    budget_s=180.0,
    deadlines={"build": 75, "smoke": 120, "pytest": 140, "bench": 165, "ops": 178, "tf32": 178},
    soft={"bench": 150, "ops": 172, "tf32": 178},
    smoke_preset="tiny",
    smoke_size="6",
    smoke_paths=("reference", "triton", "extension"),
    smoke_precisions=("fp32", "bf16"),
    bench_preset="tiny",
    bench_sizes=("14",),
    bench_precisions=("fp32",),
    bench_repeats=2,
    ops_files=("bench_tap_combine.py",),
    ops_select="cpu and 4 and fwd and not bwd",
    tf32=False,
    smoke_env={"TRITON_INTERPRET": "1"},
    scale_with_load=True,
)
MAX_LOAD_SCALE = 3.0


def time_scale(profile: Profile, load: float | None, cores: int) -> float:
    """The factor on every deadline: ``SCN_GPU_SUITE_TIME_SCALE`` when set; for the rehearsal on a
    busy machine, load / cores (at most MAX_LOAD_SCALE: a CPU shared with other jobs runs everything
    slower, and the rehearsal checks plumbing, not speed); else 1."""
    env = os.environ.get("SCN_GPU_SUITE_TIME_SCALE")
    if env:
        return max(float(env), 0.1)
    if profile.scale_with_load and load is not None and cores > 0:
        return min(max(load / cores, 1.0), MAX_LOAD_SCALE)
    return 1.0


class Clock:
    """Seconds since the suite started (``SCN_GPU_SUITE_T0``, set by the shell script, else now)."""

    def __init__(self) -> None:
        self.t0 = float(os.environ.get("SCN_GPU_SUITE_T0") or time.time())

    def now(self) -> float:
        return time.time() - self.t0

    def say(self, msg: str) -> None:
        print(f"[gpu_suite {self.now():6.1f} s] {msg}", flush=True)


def _stream(proc: subprocess.Popen, log_path: Path) -> threading.Thread:
    def pump() -> None:
        assert proc.stdout is not None
        with open(log_path, "a") as log:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(
    cmd: list[str], log_path: Path, limit_s: float, env: dict[str, str] | None = None
) -> tuple[int | None, bool]:
    """Run ``cmd`` (in the repository, its own process group), echoing and logging its output;
    kill the group after ``limit_s``. Returns (exit code or None if killed, timed out)."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",  # compiler output is not always UTF-8
        env=env,
        preexec_fn=os.setsid,  # its own process group, so _kill_group reaches its children
    )
    pump = _stream(proc, log_path)
    try:
        rc: int | None = proc.wait(timeout=max(limit_s, 1.0))
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        rc, timed_out = None, True
    pump.join(timeout=5)
    return rc, timed_out


def clear_build_lock() -> None:
    """Remove the extension build folder's ``lock`` file that a build killed at a deadline leaves
    behind: torch's ``cpp_extension.load`` would otherwise wait for it forever in every later stage
    (the object files already compiled are kept, so the next load resumes the build)."""
    build_dir = os.environ.get("SCN_FAST_EXT_DIR")
    if not build_dir:
        try:
            from torch.utils.cpp_extension import _get_build_directory

            build_dir = _get_build_directory("scn_fast_ext", verbose=False)
        except Exception:
            return
    lock = Path(build_dir) / "lock"
    if lock.exists():
        lock.unlink(missing_ok=True)
        print(f"gpu_suite: removed the stale build lock {lock}", flush=True)


class Suite:
    """The state of one run: profile, folders, clock, stage outcomes, collected results."""

    def __init__(self, profile: Profile, outdir: Path, scratch: Path) -> None:
        self.p, self.outdir, self.scratch = profile, outdir, scratch
        self.logs = scratch / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.clock = Clock()
        self.py = sys.executable
        self.stages: list[dict[str, Any]] = []
        self.smoke: list[dict] = []
        self.records: list[dict] = []
        self.bench_meta: dict[str, Any] = {}
        self.ops: list[dict] = []
        self.pytest: dict[str, Any] = {}
        env_load = os.environ.get("SCN_GPU_SUITE_LOAD")
        self.load = float(env_load) if env_load else load_average()
        self.busy = os.environ.get("SCN_GPU_SUITE_BUSY") or (
            None if env_load else busy_warning(self.load)
        )
        self.scale = time_scale(profile, self.load, usable_cores())

    def deadline(self, name: str, soft: bool = False) -> float:
        """Seconds since the start by which stage ``name`` must end (``soft``: start nothing new)."""
        return (self.p.soft if soft else self.p.deadlines)[name] * self.scale

    # ------------------------------------------------------------------ stage plumbing
    def stage(self, name: str, run) -> dict[str, Any]:
        deadline = self.deadline(name)
        start = self.clock.now()
        entry: dict[str, Any] = {"stage": name, "deadline_s": deadline, "started_at_s": start}
        if deadline - start < 5:
            entry.update(status="skipped", note=f"no time left (deadline {deadline:.0f} s)")
        else:
            self.clock.say(f"stage {name}: start (must end by {deadline:.0f} s)")
            try:
                entry.update(run(deadline))
            except Exception as exc:  # the driver itself must survive any stage
                entry.update(status="failed", note=f"driver error: {type(exc).__name__}: {exc}")
        entry["ended_at_s"] = self.clock.now()
        entry["elapsed_s"] = entry["ended_at_s"] - start
        self.stages.append(entry)
        self.clock.say(
            f"stage {name}: {entry['status']} after {entry['elapsed_s']:.1f} s"
            + (f" ({entry['note']})" if entry.get("note") else "")
        )
        self.write()
        return entry

    def command(self, name: str, cmd: list[str], deadline: float, env=None) -> dict[str, Any]:
        rc, timed_out = run_command(
            cmd, self.logs / f"{name}.log", deadline - self.clock.now(), env
        )
        if timed_out:
            clear_build_lock()
            return {
                "status": "timeout",
                "rc": None,
                "note": f"killed at its deadline {deadline:.0f} s",
            }
        return {"status": "ok" if rc == 0 else "failed", "rc": rc}

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("SCN_FAST_BACKEND", None)
        env.pop("TRITON_INTERPRET", None)
        env.update(extra)
        return env

    # ------------------------------------------------------------------ stages
    def build(self, deadline: float) -> dict[str, Any]:
        code = (
            "import time; t = time.time()\n"
            "from scn_fast.extension import load_extension, csrc_dir\n"
            "load_extension()\n"
            "print(f'extension built and loaded in {time.time() - t:.1f} s from {csrc_dir()}')\n"
            "import torch; from torch.utils.cpp_extension import CUDA_HOME\n"
            "print(f'torch CUDA {torch.version.cuda}, CUDA_HOME {CUDA_HOME} (None: no CUDA twin)')\n"
        )
        return self.command("build", [self.py, "-c", code], deadline, self.env())

    def run_smoke(self, deadline: float) -> dict[str, Any]:
        out = self.logs / "smoke-records.json"
        cmd = [self.py, str(Path(__file__)), "--smoke-point", str(out), "--profile", self.p.name]
        res = self.command("smoke", cmd, deadline, self.env())
        if out.is_file():
            self.smoke = json.loads(out.read_text())
        print(output.format_smoke(self.smoke), flush=True)
        bad = [r for r in self.smoke if r["status"] != "ok"]
        if res["status"] == "ok" and bad:
            res.update(
                status="failed", note=f"{len(bad)} of {len(self.smoke)} smoke records not ok"
            )
        return res

    def run_pytest(self, deadline: float) -> dict[str, Any]:
        cmd = [self.py, "-m", "pytest", "-m", "gpu", "-x", "-q", "-p", "no:cacheprovider", "tests"]
        res = self.command("pytest", cmd, deadline, self.env())
        lines = (self.logs / "pytest.log").read_text().strip().splitlines()
        self.pytest = {"rc": res["rc"], "summary": lines[-1] if lines else ""}
        res["note"] = res.get("note") or self.pytest["summary"]
        return res

    def _bench(self, name: str, precisions, deadline: float) -> dict[str, Any]:
        soft = self.deadline(name, soft=True)
        minutes = (soft - self.clock.now()) / 60
        if minutes <= 0:
            return {"status": "skipped", "note": f"past its soft deadline {soft:.0f} s"}
        out = self.scratch / name
        cmd = [
            self.py, "-m", "scn_fast.benchmark.cli",
            "--device", self.p.device,
            "--preset", self.p.bench_preset,
            "--natoms", ",".join(self.p.bench_sizes),
            "--precision", *precisions,
            "--mode", "inference", "training",
            "--repeats", str(self.p.bench_repeats),
            "--no-compile",
            "--max-minutes", f"{minutes:.3f}",
            "--out", str(out),
            "--no-progress",
        ]  # fmt: skip
        res = self.command(name, cmd, deadline, self.env())
        path = out / "results.json"
        if path.is_file():  # written after every point: partial results survive a kill
            data = json.loads(path.read_text())
            keep = [r for r in data["records"] if name == "bench" or r["precision"] in precisions]
            self.records.extend(keep)
            self.bench_meta[name] = data["metadata"]
            stopped = data["metadata"].get("stopped_early")
            if stopped:
                res["note"] = stopped
            if res["status"] == "failed":  # exit 1: some path was wrong
                wrong = sum(1 for r in keep if r["status"] == "wrong")
                res["note"] = f"{wrong} records wrong (outside their tolerance)"
        return res

    def run_bench(self, deadline: float) -> dict[str, Any]:
        return self._bench("bench", list(self.p.bench_precisions), deadline)

    def run_tf32(self, deadline: float) -> dict[str, Any]:
        if not self.p.tf32:
            return {"status": "skipped", "note": f"tf32 not run on {self.p.device}"}
        return self._bench("tf32", ["tf32"], deadline)

    def run_ops(self, deadline: float) -> dict[str, Any]:
        soft = self.deadline("ops", soft=True)
        done, statuses = [], []
        for f in self.p.ops_files:
            if self.clock.now() > soft:
                break
            js = self.logs / f"ops-{Path(f).stem}.json"
            cmd = [
                self.py, "-m", "pytest", f"bench/{f}", "-q", "-p", "no:cacheprovider",
                "--benchmark-only", "-k", self.p.ops_select, "--benchmark-json", str(js),
            ]  # fmt: skip
            res = self.command("ops", cmd, deadline, self.env())
            if res["rc"] == 5:  # pytest: no test selected in this file
                res["status"] = "ok"
            statuses.append(res["status"])
            self.ops.extend(output.ops_summary(js))
            done.append(f)
            if res["status"] == "timeout":
                break
        left = [f for f in self.p.ops_files if f not in done]
        note = f"{len(self.ops)} op benchmarks" + (f"; not started: {left}" if left else "")
        bad = [s for s in statuses if s != "ok"]
        return {"status": bad[0] if bad else ("ok" if done else "skipped"), "note": note}

    # ------------------------------------------------------------------ outputs
    def results(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "kit": "bench/gpu_suite.sh",
            "profile": self.p.name,
            "profile_config": asdict(self.p),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock.t0)),
            "elapsed_s": self.clock.now(),
            "budget_s": self.p.budget_s,
            "deadline_scale": self.scale,
            "python": sys.version.split()[0],
            "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
            "wheels_installed": os.environ.get("SCN_GPU_SUITE_WHEELS", "").split() or None,
            "load_average_at_start": self.load,
            "cores": usable_cores(),
            "busy_warning": self.busy,
            "stages": self.stages,
            "bench_runs": self.bench_meta,
            **environment(self.p.device),
        }
        return {
            "metadata": meta,
            "smoke": self.smoke,
            "pytest": self.pytest,
            "records": self.records,
            "ops": self.ops,
        }

    def table(self, results: dict[str, Any]) -> str:
        m = results["metadata"]
        head = (
            f"scn_fast GPU suite ({m['profile']}) on {m['device']}, commit {m['git_commit']}"
            f"{' (dirty)' if m.get('git_dirty') else ''}, torch {m['torch_version']}, "
            f"triton {m['triton_version']}, started {m['started']}, {m['elapsed_s']:.0f} s"
        )
        parts = [head]
        if m.get("busy_warning"):
            parts.append(m["busy_warning"])
        parts += [
            "== stages",
            output.format_stages(self.stages),
            f"== smoke: forward + backward on {self.p.smoke_preset} @ {self.p.smoke_size} atoms "
            "vs the float32 reference",
            output.format_smoke(self.smoke),
            f"== pytest -m gpu -x: {self.pytest.get('summary', '(not run)')}",
            "== benchmark (scn-fast bench)",
            format_table(self.records) if self.records else "(no benchmark record)",
            "== op microbenchmarks",
            output.format_ops(self.ops),
        ]
        return "\n\n".join(parts) + "\n"

    def write(self, final: bool = False) -> None:
        """results.json, table.txt and logs.tar.gz (and, at the end, the plots) into OUTDIR."""
        results = self.results()
        self.outdir.mkdir(parents=True, exist_ok=True)
        tmp = self.outdir / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
        tmp.replace(self.outdir / "results.json")
        (self.outdir / "table.txt").write_text(self.table(results))
        if final and self.records:
            write_plots(self.records, self.outdir)
        sources = [(self.logs, "stages")]
        sources += [(self.scratch / n / "logs", n) for n in ("bench", "tf32")]
        output.pack_logs(sources, self.outdir / "logs.tar.gz")

    def rehearsal_problems(self) -> list[str]:
        """What the rehearsal requires beyond finishing: every stage ok (tf32 is skipped on CPU),
        every record ok, an ok smoke record for each backend, op benchmark results."""
        problems = [
            f"stage {s['stage']}: {s['status']}"
            for s in self.stages
            if s["status"] != "ok" and not (s["stage"] == "tf32" and s["status"] == "skipped")
        ]
        for what, recs in (("smoke", self.smoke), ("bench", self.records)):
            if not recs:
                problems.append(f"{what}: no records")
            problems += [
                f"{what}: {r['mode']} {r['backend']} {r['precision']}: {r['status']} ({r['reason']})"
                for r in recs
                if r["status"] != "ok"
            ]
        paths = {r["backend"] for r in self.smoke if r["status"] == "ok"}
        if set(self.p.smoke_paths) - paths:
            problems.append(f"smoke: no ok record for {sorted(set(self.p.smoke_paths) - paths)}")
        if not self.ops:
            problems.append("ops: no op benchmark result")
        return problems


def smoke_point(profile: Profile, out: Path) -> int:
    """The smoke stage's process: one benchmark point (training: forward + backward), its records
    (status, errors against the float32 reference, explain) written to ``out`` as JSON."""
    from scn_fast.benchmark.point import PointConfig
    from scn_fast.benchmark.runner import run_point_process

    point = PointConfig(
        preset=profile.smoke_preset,
        size=profile.smoke_size,
        device=profile.device,
        modes=["training"],
        paths=list(profile.smoke_paths),
        precisions=list(profile.smoke_precisions),
        repeats=1,
        warmup=1,
        gemm_repeats=1,
        compile_timeout_s=None,
        check_only=True,
    )
    expected = [("training", p, q) for q in profile.smoke_precisions for p in profile.smoke_paths]
    log = out.with_name("smoke-point.log")
    got: list[dict] = []

    def keep(rec: dict) -> None:  # written as they come: a stage killed at its deadline keeps them
        got.append(rec)
        out.write_text(json.dumps(got, indent=1, default=str) + "\n")
        print(
            f"smoke: {rec['mode']} {rec['backend']} {rec['precision']}: {rec['status']}", flush=True
        )

    records = run_point_process(point, log, keep, expected, extra_env=profile.smoke_env)
    print(log.read_text()[-20000:], flush=True)
    out.write_text(json.dumps(records, indent=1, default=str) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", nargs="?")
    ap.add_argument("--scratch")
    ap.add_argument("--rehearse", action="store_true")
    ap.add_argument("--profile", choices=("gpu", "rehearsal"))
    ap.add_argument("--smoke-point", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    name = args.profile or ("rehearsal" if args.rehearse else "gpu")
    profile = REHEARSAL if name == "rehearsal" else GPU
    if args.smoke_point:
        return smoke_point(profile, Path(args.smoke_point))
    if not args.outdir or not args.scratch:
        ap.error("OUTDIR and --scratch are required")
    suite = Suite(profile, Path(args.outdir).resolve(), Path(args.scratch).resolve())
    runs = {
        "build": suite.build,
        "smoke": suite.run_smoke,
        "pytest": suite.run_pytest,
        "bench": suite.run_bench,
        "ops": suite.run_ops,
        "tf32": suite.run_tf32,
    }
    suite.clock.say(
        f"profile {profile.name}, budget {profile.budget_s:.0f} s, deadlines x{suite.scale:.2g}, "
        f"out {suite.outdir}"
    )
    for name in STAGES:
        suite.stage(name, runs[name])
    suite.write(final=True)
    problems = output.check_outdir(suite.outdir)
    for p in problems:
        suite.clock.say(f"OUTDIR limit violated: {p}")
    failed = [s["stage"] for s in suite.stages if s["status"] in ("failed", "timeout")]
    if profile.name == "rehearsal":
        problems += suite.rehearsal_problems()
    if suite.clock.now() > profile.budget_s:
        suite.clock.say(
            f"note: took {suite.clock.now():.0f} s, over the {profile.budget_s:.0f} s budget"
            + (f" (deadlines x{suite.scale:.2g}: busy machine)" if suite.scale > 1 else "")
        )
    print(suite.table(suite.results()), flush=True)
    files = sorted(p.name for p in suite.outdir.iterdir())
    suite.clock.say(f"done; {len(files)} files in {suite.outdir}: {', '.join(files)}")
    for p in problems:
        suite.clock.say(f"PROBLEM: {p}")
    if failed:
        suite.clock.say(f"stages not ok: {failed}")
    return 1 if problems or failed else 0


if __name__ == "__main__":
    sys.exit(main())
