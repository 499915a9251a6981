"""The GPU bring-up kit's plumbing (bench/gpu_suite.py, bench/gpu_suite_output.py) and the plain-checkout
import of ``scn_fast.kernels``. The whole kit runs on CPU as ``bash bench/gpu_suite.sh --rehearse`` (CI);
these tests cover its parts that a rehearsal on a healthy machine never reaches: deadlines that kill,
oversized logs, too many output files."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(REPO / "bench"))


@pytest.fixture(scope="module")
def out_mod():
    return _load("gpu_suite_output")


@pytest.fixture(scope="module")
def suite_mod():
    return _load("gpu_suite")


def test_kernels_import_from_a_plain_checkout():
    """With no install (the editable finder removed), the checkout on sys.path gives scn_fast.kernels
    from the top-level kernels/ folder, submodules included."""
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "sys.path_importer_cache.clear()\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import importlib.util, scn_fast.kernels as k\n"
        "print(k.__file__)\n"
        "print(importlib.util.find_spec('scn_fast.kernels.edge_rotation').origin)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    init, sub = res.stdout.split()
    assert Path(init) == REPO / "kernels" / "__init__.py"
    assert Path(sub) == REPO / "kernels" / "edge_rotation.py"


def test_checkout_finder_answers_only_for_the_kernels_package(tmp_path):
    from scn_fast._checkout import CheckoutKernelsFinder, checkout_kernels_dir

    finder = CheckoutKernelsFinder(REPO / "kernels")
    assert finder.find_spec("scn_fast.kernels").origin == str(REPO / "kernels" / "__init__.py")
    assert finder.find_spec("kernels") is None and finder.find_spec("scn_fast.model") is None
    assert checkout_kernels_dir(REPO / "scn_fast") == REPO / "kernels"
    installed = tmp_path / "scn_fast"  # a wheel's layout: scn_fast/kernels is a real subpackage
    (installed / "kernels").mkdir(parents=True)
    (installed / "kernels" / "__init__.py").write_text("")
    assert checkout_kernels_dir(installed) is None


def test_outdir_limits(out_mod, tmp_path):
    for i in range(out_mod.MAX_FILES):
        (tmp_path / f"f{i}").write_text("x")
    assert out_mod.check_outdir(tmp_path) == []
    (tmp_path / "one-too-many").write_text("x")
    assert "9 files" in out_mod.check_outdir(tmp_path)[0]
    (tmp_path / "one-too-many").unlink()
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (tmp_path / "f0").unlink()
    (deep / "f").write_text("x")
    assert any("folders deep" in p for p in out_mod.check_outdir(tmp_path))


def test_logs_are_packed_below_the_size_limit(out_mod, tmp_path, monkeypatch):
    monkeypatch.setattr(out_mod, "MAX_FILE_BYTES", 20_000)
    monkeypatch.setattr(out_mod, "LOG_TAIL_BYTES", 1_000)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "big.log").write_bytes(os.urandom(60_000))  # incompressible
    (logs / "small.log").write_text("the end\n")
    dest = out_mod.pack_logs([(logs, "stages"), (tmp_path / "absent", "x")], tmp_path / "l.tar.gz")
    assert dest.stat().st_size <= 20_000
    import tarfile

    with tarfile.open(dest) as tar:
        names = tar.getnames()
        big = tar.extractfile("logs/stages/big.log").read()
    assert names == ["logs/stages/big.log", "logs/stages/small.log"]
    assert big.startswith(b"[... truncated") and len(big) < 1_100


def test_stage_past_its_deadline_is_killed_with_its_children(suite_mod, tmp_path):
    """A stage still running at its deadline is killed, its process group with it."""
    child = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(child)!r}, 'w').write(str(p.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    t = time.time()
    rc, timed_out = suite_mod.run_command([sys.executable, "-c", code], tmp_path / "s.log", 3.0)
    assert timed_out and rc is None and time.time() - t < 30
    assert "started" in (tmp_path / "s.log").read_text()
    pid = int(child.read_text())
    for _ in range(50):  # the grandchild goes too
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the stage's child process survived the kill")


def test_stage_without_time_left_is_skipped_and_results_still_written(suite_mod, tmp_path):
    suite = suite_mod.Suite(suite_mod.REHEARSAL, tmp_path / "out", tmp_path / "scratch")
    suite.scale = 1e-3  # every deadline has passed already
    entry = suite.stage("bench", lambda deadline: pytest.fail("must not start"))
    assert entry["status"] == "skipped" and "no time left" in entry["note"]
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["metadata"]["stages"][0]["stage"] == "bench"
    assert data["metadata"]["git_commit"] is not None and data["metadata"]["device"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "logs.tar.gz",
        "results.json",
        "table.txt",
    ]


def test_rehearsal_deadlines_stretch_on_a_busy_machine(suite_mod, monkeypatch):
    monkeypatch.delenv("SCN_GPU_SUITE_TIME_SCALE", raising=False)
    assert suite_mod.time_scale(suite_mod.REHEARSAL, 1.0, 2) == 1.0
    assert suite_mod.time_scale(suite_mod.REHEARSAL, 5.0, 2) == 2.5
    assert suite_mod.time_scale(suite_mod.REHEARSAL, 50.0, 2) == suite_mod.MAX_LOAD_SCALE
    assert suite_mod.time_scale(suite_mod.GPU, 50.0, 2) == 1.0  # the GPU budget is fixed
    monkeypatch.setenv("SCN_GPU_SUITE_TIME_SCALE", "2")
    assert suite_mod.time_scale(suite_mod.GPU, None, 16) == 2.0


def test_gpu_profile_fits_its_budget_and_the_issue(suite_mod):
    gpu = suite_mod.GPU
    assert gpu.budget_s <= 480 and max(gpu.deadlines.values()) <= gpu.budget_s
    ends = [gpu.deadlines[s] for s in suite_mod.STAGES]
    assert ends == sorted(ends)
    assert all(gpu.soft[s] <= gpu.deadlines[s] for s in gpu.soft)
    assert gpu.bench_sizes == ("38", "200", "500", "1000") and gpu.bench_preset == "scn-t4-b2"
    assert set(gpu.smoke_paths) == {"reference", "triton", "extension"}
    assert set(gpu.smoke_precisions) == {"fp32", "bf16"}


def test_ops_summary_flags_noisy_benchmarks(out_mod, tmp_path):
    js = tmp_path / "ops.json"
    bench = [
        {"name": "steady", "group": "g", "stats": {"median": 1.0, "min": 0.99, "max": 1.05,
         "rounds": 5}, "extra_info": {"device": "cuda", "peak_mem_bytes": 10}},
        {"name": "noisy", "group": "g", "stats": {"median": 1.0, "min": 0.8, "max": 1.3,
         "rounds": 5}, "extra_info": {}},
    ]  # fmt: skip
    js.write_text(json.dumps({"benchmarks": bench}))
    ops = out_mod.ops_summary(js)
    assert [o["noisy"] for o in ops] == [False, True]
    assert ops[0]["peak_mem_bytes"] == 10 and ops[1]["spread"] == pytest.approx(0.5)
    assert "noisy" in out_mod.format_ops(ops) and out_mod.ops_summary(tmp_path / "none") == []


def test_small_sizes_are_clusters_of_exactly_that_many_atoms():
    from scn_fast.benchmark.systems import build_system, parse_size

    for n in (3, 6, 13):
        (atoms,) = build_system(parse_size(str(n)))
        assert len(atoms) == n and not atoms.pbc.any()
        assert sorted(atoms.get_chemical_symbols()[-2:]) == ["C", "O"]
    (slab,) = build_system(parse_size("14"))
    assert len(slab) == 14 and slab.pbc[:2].all()


def test_check_only_point_gates_without_timing():
    """The smoke stage's point: correctness records (errors, explain), no times or floors."""
    from scn_fast.benchmark.point import PointConfig, run_point

    cfg = PointConfig(
        preset="tiny",
        size="6",
        modes=["training"],
        paths=["reference"],
        precisions=["fp32", "bf16"],
        repeats=1,
        check_only=True,
    )
    recs = run_point(cfg)
    assert [(r["precision"], r["status"]) for r in recs] == [("fp32", "ok"), ("bf16", "ok")]
    assert all(r["median_s"] is None and r["floor_s"] is None and r["noisy"] is None for r in recs)
    bf16 = recs[1]
    assert bf16["energy_err_rel"] is not None and bf16["max_grad_err_rel"] is not None
    assert bf16["explain"]["edge_rotation"]["ran"] == "reference"


def test_missing_prerequisites_are_named_before_anything_runs(tmp_path):
    """Without a CUDA device (this machine) the GPU run refuses at once, naming what is missing, and
    writes nothing; a missing wheel folder is named too."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_suite.sh"), str(out), "--wheels", str(tmp_path / "no")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 2 and "the wheel folder" in res.stderr and not out.exists()
    if not __import__("torch").cuda.is_available():
        res = subprocess.run(
            ["bash", str(REPO / "bench" / "gpu_suite.sh"), str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert res.returncode == 2 and "nothing was run" in res.stderr
        assert "CUDA" in res.stderr and not out.exists()
