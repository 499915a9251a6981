"""The gpu_compile tests' shared steps: compiling for A100 (sm_80) and H100 (sm_90) without a GPU.

- ``compile_sm80_sm90``: one CUDA source of csrc/ through nvcc, as ``torch.utils.cpp_extension``
  compiles it (its half/bfloat16 defines, relaxed constexpr, -fPIC), with nvcc's
  ``--resource-usage`` report;
- ``triton_compile_main``: a Triton kernel module's ``compile_main`` in a fresh process without
  ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` functions cannot be compiled).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def nvcc_path() -> str | None:
    """nvcc on PATH, else under torch's CUDA_HOME, $CUDA_HOME or /usr/local/cuda; None if absent."""
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [shutil.which("nvcc")]
    for home in (CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    return next((c for c in candidates if c and Path(c).exists()), None)


def compile_sm80_sm90(src: Path, obj: Path) -> str:
    """Compile ``src`` to the object file ``obj`` for sm_80 and sm_90 (skips the test when nvcc is
    not installed); asserts nvcc succeeded and wrote a non-empty object. Returns nvcc's output."""
    nvcc = nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    cmd = [
        nvcc, "-std=c++17", "-O3", "-c", str(src), "-o", str(obj),
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
    return log


def spill_stores(log: str) -> list[str]:
    """The spill-store byte counts of every kernel in nvcc's ``--resource-usage`` report."""
    return re.findall(r"(\d+) bytes spill stores", log)


def triton_compile_main(module: str, tmp_path: Path, timeout: float) -> list[dict]:
    """Run ``scn_fast.kernels.<module>.compile_main`` (TRITON_INTERPRET unset; skips the test
    without Triton) and return its JSON report, a record per compile, after asserting that it
    exited 0, covered exactly sm_80 and sm_90, and that every compile made a non-empty cubin."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "compile.json"
    code = (
        f"import sys; from scn_fast.kernels import {module} as m; "
        f"sys.exit(m.compile_main(json_path={str(report)!r}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )
    print(proc.stdout)
    assert proc.returncode == 0, f"compilation failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    results = json.loads(report.read_text())
    assert {r["arch"] for r in results} == {"sm_80", "sm_90"}
    assert all(r["ok"] and r["cubin_bytes"] > 0 for r in results)
    return results
