"""The benchmark suite (scn_fast.benchmark): floors, correctness gating, out-of-memory handling, the
JSON schema and a ``scn-fast bench --quick`` smoke run restricted to the tiny preset (CPU, fast)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from scn_fast import AtomsBatch, SphericalChannelNetwork, preset
from scn_fast.benchmark import cli as bench_cli
from scn_fast.benchmark import measure, point
from scn_fast.benchmark.floor import (
    TRAINING_FACTOR,
    GemmReplay,
    algebraic_fraction,
    isolated_floor,
    record_gemm_calls,
)
from scn_fast.benchmark.records import RECORD_FIELDS, STATUSES
from scn_fast.benchmark.runner import SuiteConfig, run_suite
from scn_fast.benchmark.systems import build_system, parse_size
from scn_fast.benchmark.tolerance import TOLERANCES, check_outputs


def _fake_timer(m, k, n, device, precision, repeats):
    return m * k * n * 1e-12  # seconds proportional to the shape: hand-checkable sums


def test_gemm_floor_of_one_linear_is_hand_checkable():
    model = nn.Sequential(nn.Linear(4, 3))
    with record_gemm_calls(model) as calls:
        model(torch.zeros(2, 7, 4))
    assert [(c.m, c.k, c.n) for c in calls] == [(14, 4, 3)]
    assert calls[0].flops == 2 * 14 * 4 * 3
    floor = isolated_floor(calls, "cpu", timer=_fake_timer)
    assert floor.flops == 336 and floor.gemm_s == pytest.approx(14 * 4 * 3 * 1e-12)
    assert floor.algebraic_s == floor.gemm_s  # no fc1_edge_proj: the floors agree
    train = floor.scaled(TRAINING_FACTOR)
    assert train.flops == 3 * 336 and train.gemm_s == pytest.approx(3 * floor.gemm_s)


def test_algebraic_floor_counts_fc1_edge_proj_at_the_tap_fraction():
    assert algebraic_fraction(6, 1, 4) == pytest.approx(31 / 76)
    assert algebraic_fraction(4, 1, 4) == pytest.approx(21 / 52)
    assert algebraic_fraction(6, 1, 1) == 1.0 and algebraic_fraction(6, 0, 1) == 1.0
    torch.manual_seed(0)
    model = SphericalChannelNetwork(**preset("tiny"), deterministic_frames=True)
    data = AtomsBatch.from_ase(build_system(parse_size("14")))
    with record_gemm_calls(model) as calls, torch.no_grad():
        model(data)
    assert len(calls) == sum(isinstance(m, nn.Linear) for m in model.modules())  # one call each
    proj = [c for c in calls if c.name.endswith("fc1_edge_proj")]
    assert len(proj) == 2 * 2  # 2 interactions x 2 resolutions
    for c in proj:  # tiny: lmax 4, mmax 1, 4 taps: R = 13, C' = 8
        assert c.k == 2 * 13 * 8 and c.m % 4 == 0
        assert c.algebraic_fraction == pytest.approx(21 / 52)
    floor = isolated_floor(calls, "cpu", timer=_fake_timer)
    proj_s = sum(c.m * c.k * c.n * 1e-12 for c in proj)
    assert floor.gemm_s - floor.algebraic_s == pytest.approx(proj_s * (1 - 21 / 52))
    # the replay applies the same fractions, call by call, to the times it measured
    replay = GemmReplay(calls, "cpu", replay_times=lambda cs: [c.m * c.k * c.n * 1e-12 for c in cs])
    replayed = replay()
    assert replayed.gemm_s == pytest.approx(floor.gemm_s)
    assert replayed.algebraic_s == pytest.approx(floor.algebraic_s)


def test_gemm_replay_times_every_call_in_order_and_takes_the_median():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5), nn.Linear(4, 3))
    with record_gemm_calls(model) as calls:
        x = torch.zeros(6, 4)
        model[2](x), model[1](model[0](x))
    assert [(c.k, c.n) for c in calls] == [(4, 3), (4, 3), (3, 5)]
    seen = []
    rounds = iter([[1.0, 2.0, 4.0], [3.0, 3.0, 3.0], [0.5, 0.5, 0.5], [9.0, 9.0, 9.0]])

    def fake(cs):
        seen.append([(c.k, c.n) for c in cs])
        return next(rounds)

    replay = GemmReplay(calls, "cpu", replay_times=fake)
    assert replay.floor() is None
    assert replay().gemm_s == 7.0  # one replay: the sum over its calls
    replay.clear()
    for _ in range(3):
        replay()
    assert seen == [[(4, 3), (4, 3), (3, 5)]] * 4  # every call, in the model's order
    assert replay.floor().gemm_s == 9.0  # median of 9, 1.5, 27 (the warm-up sample is gone)
    assert replay.floor(last=2).gemm_s == pytest.approx((1.5 + 27) / 2)


def test_gemm_replay_runs_the_recorded_shapes_on_cpu():
    torch.manual_seed(0)
    model = SphericalChannelNetwork(**preset("tiny"), deterministic_frames=True)
    data = AtomsBatch.from_ase(build_system(parse_size("14")))
    with record_gemm_calls(model) as calls, torch.no_grad():
        model(data)
    replay = GemmReplay(calls, "cpu", "fp32")
    # operands: one set per distinct shape, not one per call
    assert len(replay._a) == len({(c.m, c.k) for c in calls if c.m > 0}) < len(calls)
    times = measure.time_interleaved({"floor": replay}, "cpu", repeats=3, warmup=1)
    assert len(times["floor"]) == 3 and len(replay.samples) == 4
    f = replay.floor(last=3)
    assert 0 < f.algebraic_s < f.gemm_s  # tiny has 4-tap fc1_edge_proj calls
    for whole, sample in zip(times["floor"], replay.samples[1:], strict=True):
        assert 0 < sample.gemm_s <= whole  # the calls' own times, within the whole replay's
    assert f.flops == sum(c.flops for c in calls)


def test_check_outputs_applies_the_tolerance_table():
    ref = {"energy": torch.tensor([2.0]), "forces": torch.tensor([[1.0, -2.0, 0.5]])}
    tol = TOLERANCES["fused_fp32"]
    same = check_outputs({k: v.clone() for k, v in ref.items()}, ref, tol, u=1e-6)
    assert same.passed and same.force_limit == pytest.approx(5e-5)
    assert check_outputs(ref, ref, tol, u=1e-4).force_limit == pytest.approx(5e-4)
    bad = {"energy": ref["energy"].clone(), "forces": ref["forces"] * (1 + 1e-3)}
    res = check_outputs(bad, ref, tol, u=1e-6)
    assert not res.passed and "force error" in res.reason
    g = {"w": torch.ones(3)}
    res = check_outputs(ref, ref, tol, 1e-6, {"w": torch.ones(3) * 1.01}, g)
    assert not res.passed and "gradient" in res.reason


def _extension_available() -> bool:
    try:
        from scn_fast.extension import load_extension

        load_extension()
        return True
    except Exception:
        return False


def test_a_path_outside_its_tolerance_is_wrong_and_not_timed(monkeypatch):
    if not _extension_available():
        pytest.skip("the C++ extension (the CPU fused backend) cannot be built here")

    def perturb(spec, mode, out):
        return {**out, "forces": out["forces"] * 1.01} if spec.name == "extension" else out

    timed: list = []
    real_time = measure.time_interleaved

    def spy(steps, *args, **kwargs):
        timed.extend(steps)
        return real_time(steps, *args, **kwargs)

    monkeypatch.setattr(point, "CHECK_HOOK", perturb)
    monkeypatch.setattr(measure, "time_interleaved", spy)
    cfg = point.PointConfig(
        preset="tiny",
        size="14",
        modes=["inference"],
        paths=["reference", "extension"],
        repeats=1,
        warmup=0,
        gemm_repeats=1,
        threads=1,
    )
    threads = torch.get_num_threads()
    try:
        recs = {r["backend"]: r for r in point.run_point(cfg)}
    finally:
        torch.set_num_threads(threads)
    ext = recs["extension"]
    assert ext["status"] == "wrong" and "force error" in ext["reason"]
    assert ext["median_s"] is None and ext["times_s"] is None and ext["peak_mem_bytes"] is None
    assert ext["max_force_err_rel"] > ext["force_err_limit"]
    assert recs["reference"]["status"] == "ok" and recs["reference"]["median_s"] > 0
    # only the reference was timed, next to the GEMM floor's replay
    assert [getattr(s, "name", s) for s in timed] == ["reference", "GEMM floor (fp32)"]


def test_out_of_memory_becomes_a_record_and_stops_the_sweep(tmp_path, capsys):
    cfg = SuiteConfig(
        presets=["tiny"],
        sizes=["14", "38"],
        modes=["inference"],
        paths=["reference"],
        precisions=["fp32"],
        repeats=1,
        warmup=0,
        out=str(tmp_path),
        mem_headroom_bytes=0,
        progress=False,
    )
    results = run_suite(cfg)
    recs = results["records"]
    assert len(recs) == 1, "the sweep must not grow a path after its first oom"
    assert recs[0]["status"] == "oom" and recs[0]["natoms"] == 14 and recs[0]["reason"]
    assert json.loads((tmp_path / "results.json").read_text())["records"][0]["status"] == "oom"
    assert "oom" in capsys.readouterr().out


@pytest.fixture(scope="module")
def quick_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--preset", "tiny", "--out", str(out), "--no-progress"]
    # one thread and one timed repeat: fast even on a busy 2-core machine
    rc = bench_cli.main([*argv, "--threads", "1", "--repeats", "1"])
    return rc, out


def test_quick_smoke_run_writes_json_table_and_plots(quick_tiny):
    rc, out = quick_tiny
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    meta, recs = results["metadata"], results["records"]
    assert meta["presets"] == ["tiny"] and meta["sizes"] == ["14"] and meta["suite"]["quick"]
    assert {(r["mode"], r["backend"]) for r in recs} >= {
        ("inference", "reference"),
        ("training", "reference"),
    }
    pngs = (
        "speedup_vs_natoms.png",
        "time_over_floor_vs_natoms.png",
        "activation_memory_vs_natoms.png",
    )
    if importlib.util.find_spec("matplotlib") is None:  # plots are optional: no matplotlib, no PNGs
        assert not any((out / name).exists() for name in pngs)
    else:
        assert all((out / name).stat().st_size > 1000 for name in pngs)
    table = (out / "table.txt").read_text()
    assert "tiny" in table and "reference" in table and "speedup" in table


def test_records_follow_the_schema(quick_tiny):
    _, out = quick_tiny
    recs = json.loads(Path(out / "results.json").read_text())["records"]
    for r in recs:
        assert set(r) == set(RECORD_FIELDS)
        assert r["status"] in STATUSES and r["config"] == "tiny" and r["natoms"] == 14
        assert r["device"] and r["torch_version"] == torch.__version__
        assert r["nedges"] > 0 and r["precision"] == "fp32"
        if r["status"] == "ok":
            for f in (
                "median_s",
                "floor_s",
                "gemm_floor_s",
                "time_over_floor",
                "isolated_floor_s",
                "time_over_isolated_floor",
                "speedup_vs_reference",
                "peak_mem_bytes",
                "energy_err_rel",
                "max_force_err_rel",
                "explain",
            ):
                assert r[f] is not None, f
            assert r["gemm_floor_s"] >= r["floor_s"] > 0
            ran = {op: r["explain"][op]["ran"] for op in ("edge_rotation", "scatter_aggregation")}
            assert set(ran.values()) == {r["backend"]}
    ref = [r for r in recs if r["backend"] == "reference" and r["status"] == "ok"]
    assert {r["mode"] for r in ref} == {"inference", "training"}
    assert all(r["speedup_vs_reference"] == 1.0 for r in ref)


def test_bench_subcommand_registers_and_parses_the_quick_suite():
    import argparse

    parser = argparse.ArgumentParser(prog="scn-fast")
    bench_cli.add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "--quick", "--preset", "tiny", "--natoms", "14,2x38"])
    assert args.func is bench_cli.cmd_bench
    cfg = bench_cli.suite_config(args)
    assert cfg.quick and cfg.presets == ["tiny"] and cfg.sizes == ["14", "2x38"]
    assert cfg.precisions == ["fp32"] and cfg.compile is False and cfg.repeats == 3
    full = bench_cli.suite_config(parser.parse_args(["bench", "--mode", "training"]))
    assert not full.quick and full.presets is None and full.modes == ["training"]
    assert [s.label for s in map(parse_size, ["38", "6x38", " 500 "])] == ["38", "6x38", "500"]
    with pytest.raises(ValueError, match="bad system size"):
        parse_size("many")


def test_failures_are_classified():
    import time

    from scn_fast.benchmark.errors import first_line, is_oom, time_limit, timed_out

    with pytest.raises(TimeoutError) as info, time_limit(0.05):
        time.sleep(5)
    wrapped = RuntimeError(f"compile failed: got {info.value!r}")  # as torch.compile reports it
    assert timed_out(info.value) and timed_out(wrapped) and not timed_out(RuntimeError("x"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert is_oom(MemoryError()) and not is_oom(ValueError("out of memory"))
    assert first_line(ValueError("\n  first\nsecond")) == "ValueError: first"


def test_training_step_drops_gradients_for_timing_and_keeps_them_for_memory():
    """make_step's training step: "set_to_none" (timing, as optimizer.zero_grad() by default) leaves
    the last backward's gradients as fresh tensors; "in_place" (activation memory) keeps each .grad
    tensor allocated and zeroes it before the backward adds into it. Either way one step's
    gradients, never an accumulation over steps."""
    from scn_fast.benchmark.paths import make_step

    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)

    def model(data):
        y = lin(data)
        return {"energy": y.sum(1), "forces": y.unsqueeze(-1).expand(-1, -1, 3)}

    params = list(lin.parameters())
    make_step(model, params, "training", x)()
    once = [p.grad.clone() for p in params]
    held = [p.grad for p in params]

    make_step(model, params, "training", x, zero_grads="in_place")()
    assert all(p.grad is h for p, h in zip(params, held, strict=True))  # same storage
    assert all(torch.equal(p.grad, g) for p, g in zip(params, once, strict=True))

    make_step(model, params, "training", x)()
    assert all(p.grad is not h for p, h in zip(params, held, strict=True))  # dropped, rebuilt
    assert all(torch.equal(p.grad, g) for p, g in zip(params, once, strict=True))

    with pytest.raises(ValueError, match="zero_grads"):
        make_step(model, params, "training", x, zero_grads="keep")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible")
def test_gemm_replay_times_cuda_calls_with_events():
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 32))
    with record_gemm_calls(model) as calls:
        model(torch.zeros(256, 64))
    replay = GemmReplay(calls, "cuda", "fp32")
    for _ in range(3):
        replay()
    f = replay.floor()
    assert 0 < f.gemm_s < 1.0 and f.algebraic_s == f.gemm_s
    assert all(s.gemm_s > 0 for s in replay.samples)
