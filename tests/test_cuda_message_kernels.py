"""csrc/cuda/message_kernels.cu (the CUDA tap_gate / tap_combine kernels) compiles for A100 and H100
with torch's nvcc defines and without register spills (gpu_compile: no GPU needed). The kernels
are launched from the extension's CUDA glue once it registers them (docs/gpu.md)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .cuda_compile import compile_sm80_sm90, spill_stores

SRC = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "message_kernels.cu"


@pytest.mark.gpu_compile
def test_message_kernels_compile_for_sm80_sm90(tmp_path):
    obj = tmp_path / "message_kernels.o"
    log = compile_sm80_sm90(SRC, obj)
    # 2 archs x (gate fwd/bwd x 2 types x 2 tap counts + combine fwd/bwd x 3 types + bias x 2)
    spills = spill_stores(log)
    assert len(spills) == 2 * (8 + 6 + 2) and all(s == "0" for s in spills), log
    for name in ("launch_tap_gate_forward", "launch_tap_combine_backward"):
        assert name in subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
