"""The CUDA plan of the extension path, built on a CPU machine with the extension pretended built
for CUDA: its edge kernels and grid ops run, but the message MLP's gate and combine run Triton's
fused kernels, with the reason recorded (``ops.support.PREFERRED``)."""

from __future__ import annotations

import pytest
import torch

import scn_fast
from scn_fast import preset
from scn_fast.ops import support


@pytest.fixture
def cuda_extension(monkeypatch):
    """The extension and Triton as a CUDA machine has them (the runtime checks only)."""
    real = support._runtime_refusal

    def runtime(runtime: str, device_type: str):
        if device_type == "cuda" and runtime in ("extension", "triton"):
            return None
        return real(runtime, device_type)

    monkeypatch.setattr(support, "_runtime_refusal", runtime)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_cuda_extension_plan_prefers_triton_gate_and_combine(cuda_extension, training):
    p = scn_fast.plan(preset("scn-t4-b2"), device="cuda", backend="extension", training=training)
    assert p["edge_rotation"].ran == p["scatter_aggregation"].ran == "extension"
    assert p["grid_projection"].ran == "extension"
    for op, temporaries in (("gated_tap_projection", "(E, 4, H)"), ("tap_combine", "(E, 4R, C)")):
        assert p[op].ran == "triton", p.explain()[op]
        reason = p[op].refused["extension"]
        assert "ATen composition" in reason and temporaries in reason
    assert p["gated_tap_projection"].variant["gate"] == "triton"
    assert p["tap_combine"].variant["impl"] == "triton"


def test_cuda_extension_plan_keeps_the_extension_without_triton(cuda_extension, monkeypatch):
    """Without Triton the extension's own (ATen) gate and combine run: a preference, not a need."""
    real = support._runtime_refusal
    monkeypatch.setattr(
        support,
        "_runtime_refusal",
        lambda rt, dev: "triton is not installed" if rt == "triton" else real(rt, dev),
    )
    p = scn_fast.plan(preset("scn-t4-b2"), device="cuda", backend="extension")
    assert p["gated_tap_projection"].ran == p["tap_combine"].ran == "extension"


def test_cpu_extension_plan_is_unchanged():
    p = scn_fast.plan(preset("scn-t4-b2"), device="cpu", dtype=torch.float32)
    assert p["gated_tap_projection"].ran == p["tap_combine"].ran == "extension"
    assert support.preferred("tap_combine", "extension", "cpu") is None
