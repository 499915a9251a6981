"""csrc/cuda/message_kernels.cu (the CUDA tap_gate / tap_combine kernels) compiles for A100 and H100
with torch's nvcc defines and without register spills (gpu_compile: no GPU needed). The kernels
are launched from the extension's CUDA glue once it registers them (docs/gpu.md)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "message_kernels.cu"


def _nvcc() -> str | None:
    candidates = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    return next((c for c in candidates if c and Path(c).exists()), None)


@pytest.mark.gpu_compile
def test_message_kernels_compile_for_sm80_sm90(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    obj = tmp_path / "message_kernels.o"
    cmd = [
        nvcc, "-std=c++17", "-O3", "-c", str(SRC), "-o", str(obj),
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "--resource-usage",
        # as torch.utils.cpp_extension compiles it
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr", "--compiler-options", "-fPIC",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert obj.stat().st_size > 0
    # 2 archs x (gate fwd/bwd x 2 types x 2 tap counts + combine fwd/bwd x 3 types + bias x 2)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    assert len(spills) == 2 * (8 + 6 + 2) and all(s == "0" for s in spills), log
    for name in ("launch_tap_gate_forward", "launch_tap_combine_backward"):
        assert name in subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
