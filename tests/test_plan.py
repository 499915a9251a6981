"""The plan (``scn_fast.planning``): every fused op's backend and variant, decided before a forward.

* Plans for devices that are not here (CUDA on a CPU machine): the GPU choices as data.
* The model runs what its plan names and nothing else: the extension's entry points are recorded
  during a forward (and backward) and compared with what the plan's variants imply.
"""

from __future__ import annotations

import pytest
import torch
from scn_fast.kernels import tiling

import scn_fast
import scn_fast.planning as planning
from scn_fast import AtomsBatch, SphericalChannelNetwork, preset
from scn_fast.dispatch import OPS, BackendUnavailableError
from scn_fast.systems import pt_bulk


def test_cpu_plan_for_scn_t4_b2():
    cfg = preset("scn-t4-b2")
    infer = scn_fast.plan(cfg, device="cpu", natoms=14)
    assert set(infer.explain()) == {*OPS, "memory"}
    assert all(infer[op].ran == "extension" for op in OPS)
    assert infer.natoms == 14
    assert infer["edge_rotation"].variant == {"split_rotation": True, "degree0_input": True}
    assert infer["gated_tap_projection"].variant["gemm"] == "split_operands"
    assert infer["gated_tap_projection"].variant["weight_order"] == "tap"
    assert infer["tap_combine"].variant["fc2"] == "scratch"
    assert infer["grid_projection"].variant["saved_activations"] is False
    assert infer["grid_projection"].variant["tile_atoms"] == 2048 // 210
    train = scn_fast.plan(cfg, device="cpu", training=True)
    assert train["tap_combine"].variant["fc2"] == "silu_mm"
    assert train["grid_projection"].variant["saved_activations"] is True
    compiled = scn_fast.plan(cfg, device="cpu", compiled=True)
    assert not compiled["edge_rotation"].variant["split_rotation"]
    assert compiled["gated_tap_projection"].variant["gemm"] == "tap_ordered"
    assert compiled["tap_combine"].variant["fc2"] == "linear"
    one_tap = scn_fast.plan(preset("scn-t1-b1"), device="cpu")
    assert one_tap["gated_tap_projection"].variant["gemm"] == "dense"
    assert not one_tap["edge_rotation"].variant["split_rotation"]


def test_cuda_plan_on_a_cpu_machine():
    """A bf16 plan for 1000 atoms on a GPU (sm_90 assumed when none is present)."""
    pytest.importorskip("triton")
    p = scn_fast.plan(preset("scn-t4-b2"), device="cuda", precision="bf16", natoms=1000)
    assert p.device.type == "cuda" and p.precision == "bf16" and p.native
    for op in OPS:
        assert p[op].ran == "triton", (op, p[op])
    if torch.version.cuda is None:
        assert "not a CUDA build" in p["edge_rotation"].refused["extension"]
    assert p["edge_rotation"].variant["split_rotation"] is False
    proj = p["gated_tap_projection"].variant
    assert proj["gemm"] == "tap_ordered" and proj["gate"] == "triton"
    assert proj["precision"] == "bf16" and proj["native"]
    combine = p["tap_combine"].variant
    assert combine["bf16_input"] is False and combine["impl"] == "triton"
    grid = p["grid_projection"].variant
    # GPU tiles from the tile loops' scratch budget (kernels/tiling.py), not a fixed row count:
    # one tile holds the whole 1,000-atom system: ~2,400 atoms in inference, ~1,350 in training.
    assert grid["tile_atoms"] == tiling.grid_tile_atoms(6, 2, 128, training=False) == 2396
    assert grid["saved_activations"] is False
    # the Triton grid GEMMs take bf16 themselves (weights converted once, activations in registers)
    assert grid["bf16_gemms"] is False and grid["operands"] == "fp32"
    heads_tile = tiling.heads_tile_atoms(6, 128, 128, [128] * 2, [128] * 2, [1, 1], training=False)
    assert p["output_heads"].variant == {"precision": "fp32", "tile_atoms": heads_tile}
    train = scn_fast.plan(
        preset("scn-t4-b2"), device="cuda", precision="bf16", natoms=1000, training=True
    )
    assert train["grid_projection"].variant["tile_atoms"] == 1349
    cpu = scn_fast.plan(preset("scn-t4-b2"), device="cpu", training=True)
    assert cpu["grid_projection"].variant["tile_atoms"] < 100  # cache-sized CPU tiles
    assert p.explain()["gemm_precision"]["ran"] == "bf16 native"
    old = scn_fast.plan(
        preset("scn-t4-b2"), device="cuda", precision="tf32", capability=(7, 0), training=True
    )
    assert not old.native and "sm_7" in old.explain()["gemm_precision"]["refused"]["native"]
    upstream = scn_fast.plan(preset("scn-t4-b2"), device="cuda", use_fused=False)
    assert all(upstream[op].ran == "reference" for op in OPS)


def test_unsupported_requests():
    with pytest.raises(BackendUnavailableError, match="float32 and float64"):
        scn_fast.plan(preset("tiny"), device="cpu", dtype=torch.bfloat16, backend="extension")
    # auto: the reference, with the reasons
    p = scn_fast.plan(preset("tiny"), device="cpu", dtype=torch.bfloat16)
    assert all(p[op].ran == "reference" for op in OPS)
    assert "bfloat16" in p["grid_projection"].refused["extension"]


class _Recorder:
    """The extension's namespace, recording the name of every entry point called."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, set()

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def wrapped(*args, **kwargs):
            self.calls.add(name)
            return fn(*args, **kwargs)

        return wrapped


def _expected_forward(p) -> set[str]:
    """The extension entry points a forward on plan ``p`` (all ops on the extension) calls."""
    rotate, proj = p["edge_rotation"].variant, p["gated_tap_projection"].variant
    want = {"rotate_scatter", "tap_gate_forward", "tap_combine_forward", "sphere_heads_forward"}
    want.add("gather_rotate_split" if rotate["split_rotation"] else "gather_rotate")
    want |= {"tap_ordered": {"tap_split"}, "row_blocked": {"tap_blocked_forward"}}.get(
        proj["gemm"], set()
    )
    saved = p["grid_projection"].variant["saved_activations"]
    want.add("grid_mlp_forward_saving" if saved else "grid_mlp_forward")
    return want


@pytest.mark.parametrize("split", [True, False], ids=["split", "general"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_the_model_runs_what_its_plan_names(monkeypatch, split, training):
    from scn_fast import extension

    ext = extension.load_extension()
    rec = _Recorder(ext)
    monkeypatch.setattr(extension, "load_extension", lambda: rec)
    monkeypatch.setattr(planning, "SPLIT_ROTATION", split)
    torch.manual_seed(0)
    model = SphericalChannelNetwork(**preset("tiny"), use_fused=True, deterministic_frames=True)
    data = AtomsBatch.from_ase([pt_bulk()])
    with torch.set_grad_enabled(training):
        out = model(data)
    p = model.dispatcher.plan
    assert p.explain() == model.explain()
    ran = rec.calls - {"cached_empty"}
    assert ran == _expected_forward(p), (ran, p.explain())
    assert p["edge_rotation"].variant["split_rotation"] == split
    planned = scn_fast.plan(preset("tiny"), "cpu", training=training)
    if split:
        assert planned.explain() == p.explain()
    if training:
        rec.calls.clear()
        (out["energy"].sum() + out["forces"].pow(2).sum()).backward()
        back = rec.calls - {"cached_empty"}
        assert {"tap_gate_backward", "tap_combine_backward", "sphere_heads_backward"} <= back
        assert "grid_mlp_backward_saved" in back and "grid_mlp_backward" not in back
        assert "tap_assemble" in back  # the split's adjoint, in both forms


def test_gemm_precision_reaches_launchers_that_take_it():
    from scn_fast.ops.grid_projection import launcher_precision

    def takes(x, tile_atoms, precision="fp32"):
        return precision

    def ignores(x, tile_atoms):
        return None

    assert launcher_precision(takes, "tf32") == {"precision": "tf32"}
    assert launcher_precision(ignores, "tf32") == {}
    p = scn_fast.plan(preset("tiny"), device="cpu", precision="tf32")
    for op in ("gated_tap_projection", "tap_combine", "grid_projection"):
        assert p[op].variant["precision"] == "tf32", op
    assert p["output_heads"].variant["precision"] == "fp32"
