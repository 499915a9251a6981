"""Large systems in the benchmark (scn_fast.benchmark.baseline, estimate, large): the baseline chosen
from the estimate, the float64 fused baseline catching a wrong path, and the ``--large`` sweep on the
tiny preset (its plan and duration stated first, records, the markdown table, the plots)."""

from __future__ import annotations

import argparse
import functools
import importlib.util
from pathlib import Path

import pytest
import torch

from scn_fast.benchmark import baseline, large, point, runner
from scn_fast.benchmark import cli as bench_cli
from scn_fast.benchmark.estimate import RUNTIME_BYTES, count_edges, step_estimate
from scn_fast.benchmark.records import RECORD_FIELDS, make_record, record_key
from scn_fast.benchmark.systems import build_system, parse_size


def _extension_available() -> bool:
    try:
        from scn_fast.extension import load_extension

        load_extension()
        return True
    except Exception:
        return False


needs_extension = pytest.mark.skipif(
    not _extension_available(), reason="the C++ extension (the CPU fused backend) cannot be built"
)


@functools.cache
def _size(n: str):
    return count_edges("tiny", build_system(parse_size(n)))


def _decide(n: str, mem: int | None, preset: str = "tiny", **kw):
    kw.setdefault("paths", ["reference", "extension"])
    return baseline.decide_point(
        preset, _size(n), kw.pop("modes", ["inference"]), precisions=["fp32"], mem_available=mem,
        **kw,
    )  # fmt: skip


def _budget_between(small: str, big: str) -> float:
    """A point time budget (s) at which ``small`` keeps the reference baseline and runs the
    reference, and ``big`` neither takes it nor runs the reference path (the middle of the range
    the estimate gives, 10 ms steps)."""
    good = []
    for ms in range(10, 5000, 10):
        a, b = _decide(small, None, budget_s=ms / 1000), _decide(big, None, budget_s=ms / 1000)
        if (
            a.baseline == "reference-fp32"
            and not a.not_run
            and b.baseline == "fused-fp64"
            and ("inference", "reference", "fp32") in b.not_run
        ):
            good.append(ms / 1000)
    assert good, "no time budget separates the two points"
    return good[len(good) // 2]


def test_baseline_choice_follows_the_memory_estimate():
    # scn-t4-b2 (tiny and scn-t4-b2 share the cutoff and neighbour limit, so the sizes are the
    # same): a model whose per-edge messages dominate, as the baseline choice is for
    big = _decide("38", 64 * 10**9, "scn-t4-b2")
    assert big.baseline == "reference-fp32" and big.reference_forward and not big.not_run
    est = big.estimate
    assert est["reference_fp64_inference"]["process_gb"] > est["fused_fp64_inference"]["process_gb"]
    # an injected limit below the float64 reference's estimate: the float64 fused path instead
    need = est["reference_fp64_inference"]["process_gb"] * 1e9
    d = _decide("38", int(need / baseline.MEM_MARGIN) - 1_000_000, "scn-t4-b2")
    assert d.baseline == "fused-fp64"
    assert "float64 reference needs" in d.estimate["decision"]
    assert "float64 fused path fits" in d.estimate["decision"]
    # the float32 reference may still run as a timed path (then it gives u and the floors)
    assert d.reference_forward == (("inference", "reference", "fp32") not in d.not_run)
    # nothing fits: no baseline, so nothing can be checked
    none = _decide("38", RUNTIME_BYTES // 2, "scn-t4-b2")
    assert none.baseline is None and "nor does the float64 fused path" in none.estimate["decision"]
    # forced, whatever the estimate says
    assert _decide("38", None, force="fused-fp64").baseline == "fused-fp64"
    with pytest.raises(ValueError, match="baseline"):
        _decide("38", None, force="float16")


def test_baseline_decision_cuts_repeats_to_the_time_budget():
    free = _decide("38", None, repeats=5, budget_s=None)
    assert free.repeats == 5 and free.warmup == 1 and "repeats" not in free.estimate
    tight = _decide("38", None, repeats=5, warmup=3, budget_s=free.seconds * 0.6)
    assert 1 <= tight.repeats < 5 and tight.warmup == 1
    assert f"{tight.repeats} timed repeat(s) of the 5 requested" in tight.estimate["repeats"]
    assert _decide("38", None, repeats=5, budget_s=1e-3).repeats == 1  # never fewer than one
    # a reference that would not finish in the budget is not run
    e = step_estimate("tiny", "reference", "inference", _size("38"))
    slow = _decide("38", None, budget_s=2 * e.seconds)
    assert "not run: estimated" in slow.not_run[("inference", "reference", "fp32")]


def test_baseline_gradients_fall_back_to_the_float64_fused_training_step():
    # 100 atoms of scn-t4-b2: the float32 reference's training step (~16 GB by estimate) needs
    # more than the float64 fused one (checkpointed by its plan: ~4 GB)
    d = _decide("100", 64 * 10**9, "scn-t4-b2", modes=["inference", "training"])
    assert d.baseline_grads == "reference-fp32"
    # the reference does not train (by estimate): the float64 fused path gives the gradients
    ref_train = step_estimate("scn-t4-b2", "reference", "training", _size("100"))
    mem = int((ref_train.total_bytes - 1) / baseline.MEM_MARGIN)
    d = _decide("100", mem, "scn-t4-b2", modes=["inference", "training"])
    assert ("training", "reference", "fp32") in d.not_run
    assert d.baseline_grads == "fused-fp64"


def _run_point(cfg: point.PointConfig) -> list[dict]:
    threads = torch.get_num_threads()
    try:
        return point.run_point(cfg)
    finally:
        torch.set_num_threads(threads)


@needs_extension
def test_fused_fp64_baseline_checks_outputs_and_gradients_and_catches_a_wrong_path(monkeypatch):
    cfg = point.PointConfig(
        preset="tiny",
        size="14",
        modes=["inference", "training"],
        paths=["extension"],
        repeats=1,
        warmup=1,
        gemm_repeats=1,
        threads=1,
        baseline="fused-fp64",
        reference_forward=False,
        baseline_grads="fused-fp64",
        check_only=True,
    )
    recs = {r["mode"]: r for r in _run_point(cfg)}
    for mode, r in recs.items():
        assert r["status"] == "ok", r["reason"]
        assert r["baseline"] == "fused-fp64" and r["error_baseline"].startswith("float64 fused")
        assert r["max_force_err_rel"] < r["force_err_limit"] == 5e-5  # u unknown: the floor
        assert r["baseline_grads"] == "fused-fp64"
        if mode == "training":
            assert r["max_grad_err_rel"] is not None and r["max_grad_err_rel"] < 1e-3

    def perturb(spec, mode, out):
        return {**out, "forces": out["forces"] * 1.001}

    monkeypatch.setattr(point, "CHECK_HOOK", perturb)
    cfg.modes = ["inference"]
    (wrong,) = _run_point(cfg)
    assert wrong["status"] == "wrong" and "force error" in wrong["reason"]
    assert wrong["baseline"] == "fused-fp64"


def _in_process(point_cfg, log_path, on_record, expected, extra_env=None):
    """runner.run_point_process without the subprocess (fast): the same records, no peak RSS."""
    Path(log_path).write_text(f"# point {point_cfg.to_json()}\n")
    recs = [r for r in _run_point(point_cfg) if record_key(r) in expected]
    for r in recs:
        on_record(r)
    return recs


@needs_extension
def test_large_sweep_states_its_plan_first_and_writes_records_table_and_plots(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(runner, "run_point_process", _in_process)
    budget = _budget_between("14", "100")
    args = [
        "--large", "--preset", "tiny", "--natoms", "14,38,100", "--mode", "inference",
        "--paths", "reference,extension", "--repeats", "1", "--threads", "1", "--no-progress",
        "--point-minutes", repr(budget / 60), "--out", str(tmp_path),
    ]  # fmt: skip
    parser = argparse.ArgumentParser(prog="scn-fast bench")
    cfg = bench_cli.suite_config(bench_cli.configure_bench_parser(parser).parse_args(args))
    assert cfg.large and cfg.point_minutes == pytest.approx(budget / 60)
    results = runner.run_suite(cfg)
    text = capsys.readouterr().out
    first = text.splitlines()[0]
    assert first.startswith("scn-fast bench --large") and "expected duration about" in first
    plan_at = text.index("plan of the size sweep")
    assert plan_at < text.index("| config | mode | atoms")  # stated before the results
    assert "fused-fp64" in text[plan_at : text.index("total: about")]

    recs = {(int(r["system"]), r["backend"]): r for r in results["records"]}
    assert all(set(r) == set(RECORD_FIELDS) for r in recs.values())
    small, big = recs[(14, "extension")], recs[(100, "extension")]
    assert small["status"] == big["status"] == "ok"
    assert small["baseline"] == "reference-fp32" and big["baseline"] == "fused-fp64"
    assert big["baseline_estimate"]["decision"] and big["estimate"]["seconds"] > 0
    assert big["repeats"] == 1 and big["atom_steps_per_s"] == pytest.approx(
        big["natoms"] / big["median_s"]
    )
    assert big["noisy"] and "one timed repeat" in big["noise"]
    # the smaller point checked the float64 fused baseline against the float64 reference
    check = small["baseline_check"]
    assert check["passed"] and check["max_force_err_rel"] <= 1e-8
    # the reference would not finish in the budget at 100 atoms: skipped, with the estimate
    ref = recs[(100, "reference")]
    assert ref["status"] == "skipped" and ref["reason"].startswith("not run: estimated")
    assert recs[(14, "reference")]["status"] == "ok"
    # u measured with the reference at a smaller point widens the limit at 100 atoms
    assert big["ref_fp32_vs_fp64_force_err"] is not None and "atoms" in big["error_baseline"]

    table = (tmp_path / large.TABLE).read_text()
    assert f"| tiny | inference | {big['natoms']} |" in table and "| skipped [" in table
    assert "not run: estimated" in table
    pngs = [tmp_path / large.PLOT_TIME, tmp_path / large.PLOT_MEMORY]
    if importlib.util.find_spec("matplotlib") is None:
        assert not any(p.exists() for p in pngs)
    else:
        assert all(p.stat().st_size > 1000 for p in pngs)


def _rec(natoms, backend, status="ok", **kw):
    base = dict(
        config="tiny", mode="inference", backend=backend, precision="fp32", natoms=natoms,
        status=status, device="test CPU",
    )  # fmt: skip
    return make_record(**{**base, **kw})


def test_large_plots_and_table_mark_the_reference_out_of_memory_point(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: --large writes no plots")
    recs = [
        _rec(14, "reference", median_s=1.0, peak_mem_bytes=2e8, point_peak_rss_bytes=1e9),
        _rec(14, "extension", median_s=0.5, peak_mem_bytes=5e7, point_peak_rss_bytes=1e9),
        _rec(200, "reference", "oom", reason="MemoryError"),
        _rec(500, "reference", "skipped", reason="not run", estimate={"seconds": 9.0}),
        _rec(200, "extension", median_s=5.0, peak_mem_bytes=6e8, point_peak_rss_bytes=3e9),
    ]
    assert large.reference_limits(recs)[("tiny", "inference")]["natoms"] == 200
    written = large.write_plots(recs, tmp_path)
    assert [p.name for p in written] == [large.PLOT_TIME, large.PLOT_MEMORY]
    assert all(p.stat().st_size > 1000 for p in written)
    table = large.format_table({"metadata": {"device": "test CPU"}, "records": recs})
    assert "| tiny | inference | 200 | - | reference | oom [1] |" in table
    assert "[1] MemoryError" in table


@pytest.mark.parametrize(
    ("size", "kind", "dtype", "measured_gb"),
    [
        ("38", "reference", torch.float32, 0.527),
        ("100", "reference", torch.float32, 0.747),
        ("100", "reference", torch.float64, 1.311),
        ("200", "reference", torch.float32, 1.261),
        ("100", "fused", torch.float32, 0.315),
        ("100", "fused", torch.float64, 0.623),
        ("200", "fused", torch.float32, 0.746),
        ("200", "fused", torch.float64, 1.431),
    ],
)
def test_baseline_estimate_reproduces_its_calibration(size, kind, dtype, measured_gb):
    """scn-t4-b2 inference activation memory measured on 2026-12-02 (estimate.py's table): the
    estimate lands within 35% of each measurement."""
    ps = count_edges("scn-t4-b2", build_system(parse_size(size)))
    est = step_estimate("scn-t4-b2", kind, "inference", ps, dtype).activation_bytes / 1e9
    assert measured_gb / 1.35 <= est <= measured_gb * 1.35


def test_baseline_estimate_of_the_reference_training_step_at_1000_atoms():
    ps = count_edges("scn-t4-b2", build_system(parse_size("1000")))
    est = step_estimate("scn-t4-b2", "reference", "training", ps)
    assert 120e9 < est.activation_bytes < 180e9  # ~140-170 GB by extrapolation from 14 and 38 atoms
