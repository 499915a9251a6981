"""Kernel launches of a scn-t4-b2 step on CUDA, recorded on a CPU machine (``scn_fast.launches``):
the CUDA plan, the model's forward and backward and the Triton launchers' tile loops run on meta
tensors; every Triton launch and every ATen op that would launch a kernel is recorded."""

from __future__ import annotations

import pytest
import torch
from scn_fast.kernels import aot

from scn_fast import AtomsBatch, SphericalChannelNetwork, preset
from scn_fast.launches import LaunchRecorder, record_step
from scn_fast.systems import slab_of_size

# The target for a scn-t4-b2 training step at 1,000 atoms, and the count recorded at
# commit time (docs/gpu.md, "Launches recorded"): a regression guard until the target is met.
TARGET = 1500
RECORDED_LIMIT = 2450


@pytest.fixture(scope="module")
def t4b2():
    with torch.device("meta"):  # weights are never read: shapes only
        return SphericalChannelNetwork(
            **preset("scn-t4-b2"), use_fused=True, deterministic_frames=True
        )


@pytest.fixture(scope="module")
def records(t4b2):
    return {
        n: record_step(t4b2, AtomsBatch.from_ase([slab_of_size(n)]), "cuda", training=True)
        for n in (250, 1000)
    }


def test_launch_recorder_counts_kernels_not_views():
    a = torch.empty(64, 32, device="meta")
    w = torch.empty(16, 32, device="meta")
    with LaunchRecorder() as rec:
        y = torch.nn.functional.silu(a.reshape(64, 32) @ w.t()).view(-1)  # mm, silu
        y.unsqueeze(0).expand(2, -1).contiguous()  # a copy
        torch.zeros(3, device="meta")  # a fill
    assert [op for _, op in rec.record.aten] == ["mm", "silu", "clone", "zeros"]
    assert rec.record.host_ops == []


def test_launch_recorder_records_triton_launches_of_a_launcher():
    from scn_fast.kernels import tap_elementwise

    e, h = 300, 64
    a = torch.empty(e, h, device="meta")
    b = torch.empty(e, 2, h, device="meta")
    gate = torch.empty(e, h, device="meta")
    with aot.trace() as launches, LaunchRecorder() as rec:
        out = tap_elementwise.tap_gate_forward(a, b, gate)
    assert out.shape == (e, 4, h) and out.device.type == "meta"
    assert [launch.label for launch in launches] == ["tap_gate_fwd[T=4]"]
    assert rec.record.host_ops == []


def test_training_step_launch_count_plan_is_cuda_triton(records):
    rec = records[1000]
    assert rec.host_ops == []  # nothing computed on the host inside the step
    labels = {launch.label for launch in rec.triton}
    for kernel in ("gather_rotate", "rotate_scatter", "tap_gate_fwd[T=4]", "tap_gate_bwd[T=4]",
                   "tap_combine_fwd[J=4]", "tap_combine_bwd[J=4]"):  # fmt: skip
        assert kernel in labels
    assert any(label.startswith("mm[") for label in labels)  # the grid and heads GEMMs
    ops = set(rec.custom_ops)
    assert "scn_fast::gated_tap_projection_backward" in ops
    assert "scn_fast::grid_projection_backward" in ops
    assert rec.total == len(rec.triton) + len(rec.aten) == sum(rec.by_kernel().values())


def test_training_step_launch_count_regression(records):
    """The recorded count may only go down (RECORDED_LIMIT is the count at commit time)."""
    assert records[1000].total <= RECORDED_LIMIT, records[1000].by_kernel().most_common(20)


@pytest.mark.xfail(
    strict=True,
    reason="2,416 launches recorded (658 Triton, 1,758 ATen); 1,500 needs the fusions listed in "
    "docs/gpu.md (one grid tile per block, split/assemble kernels, fused Linear epilogues)",
)
def test_training_step_launch_count_within_target(records):
    assert records[1000].total <= TARGET


def test_training_step_launch_count_grows_sublinearly(records):
    """4x the atoms: the per-block work is one launch sequence whatever the size; only the grid
    MLP's and heads' tiles add launches."""
    small, large = records[250].total, records[1000].total
    assert small <= large < 1.25 * small
