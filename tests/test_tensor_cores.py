"""Precision of the Triton GEMM (kernels/gemm.py) and of the grid / heads tile loops that use it.

* gpu_compile (tensor_core): every distinct GEMM specialisation the grid and heads launchers use at
  scn-t4-b2 in tf32 and bf16, compiled for sm_90 and sm_80 (a subprocess without TRITON_INTERPRET):
  tensor-core instructions (wgmma or mma) in every PTX; in fp32 one kernel per tile shape for sm_90
  (whether a dot uses tensor cores depends on its tile and operand types, not on the epilogue; every
  fp32 variant is compiled for both archs by tests/test_grid_ops.py): none. Plus the Hopper tile
  shapes of docs/gpu.md and the shared-memory limits.
* Numerics in Triton's interpreter: fp32 matches torch to float32 rounding; bf16 equals the float32
  product of bf16-rounded operands (float32 accumulation) and stays within the bf16 tolerance of
  the fp32 result, for the GEMM and for the grid MLP and heads forward and backward. (The
  interpreter runs tf32 as float32: tf32 is checked by compiling, and on a GPU.)
* The precision is an argument: the global ``allow_tf32`` flag changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from scn_fast.kernels import gemm, grid_mlp, sphere_heads

from .conftest import TOL, rel_max_error

needs_interpreter = pytest.mark.skipif(
    not gemm.is_interpreted(), reason="CPU tensors need Triton's interpreter"
)
# bf16 operands (8-bit mantissas): relative max error of a K-term GEMM or of the grid MLP.
BF16_TOL = 2e-2


def _rnd(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------------------------
# The GEMM
# ----------------------------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize(("m", "n", "k"), [(200, 150, 300), (17, 5, 3), (1, 130, 40)])
def test_mm_fp32_is_ieee_float32(m, n, k):
    a, b = _rnd(m, k, seed=1), _rnd(k, n, seed=2)
    out = gemm.mm(a, b, torch.empty(m, n))
    assert rel_max_error(out, a.double() @ b.double()) <= 1e-6
    assert rel_max_error(out, a @ b) <= TOL["op_fp32"]


@needs_interpreter
def test_mm_bf16_rounds_operands_and_accumulates_in_float32():
    a, b = 4 * _rnd(96, 200, seed=3), _rnd(200, 70, seed=4)
    exact = a.double() @ b.double()
    rounded = a.bfloat16().double() @ b.bfloat16().double()
    for bb in (b, b.bfloat16()):  # B as float32 (converted in registers) or already bf16
        out = gemm.mm(a, bb, torch.empty(96, 70), precision="bf16")
        assert rel_max_error(out, rounded) <= 1e-6  # bf16 operands, float32 sums
        err = rel_max_error(out, exact)
        assert 1e-5 < err <= BF16_TOL  # visibly bf16, within its tolerance


@needs_interpreter
def test_mm_precision_is_an_argument_not_the_global_flag():
    a, b = _rnd(64, 64, seed=5), _rnd(64, 64, seed=6)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        out_flag = gemm.mm(a, b, torch.empty(64, 64))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert torch.equal(out_flag, gemm.mm(a, b, torch.empty(64, 64), precision="fp32"))


def test_mm_rejects_unknown_or_inexact_precisions():
    a = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="precision must be one of"):
        gemm.mm(a, a, torch.empty(4, 4), precision="fp16")
    d = torch.zeros(4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64 GEMMs are exact"):
        gemm.mm(d, d, torch.empty(4, 4, dtype=torch.float64), precision="tf32")


def test_hopper_tiles():
    """Large outputs: 128 x 128 tiles, 8 warps (two warpgroups), 3-4 stages; small ones shrink."""
    big = gemm.gemm_tiles(210 * 600, 512, torch.float32, "bf16")
    assert (big["BLOCK_M"], big["BLOCK_N"], big["num_warps"]) == (128, 128, 8)
    assert (
        big["num_stages"] == 4
        and gemm.gemm_tiles(4096, 512, torch.float32, "tf32")["num_stages"] == 3
    )
    small = gemm.gemm_tiles(3, 40, torch.float32, "fp32")
    assert (small["BLOCK_M"], small["BLOCK_N"], small["num_warps"]) == (16, 64, 4)


# ----------------------------------------------------------------------------------------------
# The tile loops in bf16 against fp32
# ----------------------------------------------------------------------------------------------


def _grid_problem(lmax=2, bands=2, channels=8, atoms=7):
    s = (lmax + 1) ** 2
    g = 2 * (lmax + 1) * (2 * lmax + 3)
    h1, h2 = 2 * bands * channels, 2 * channels
    shapes = [(atoms, s, channels), (atoms, s, channels), (g, bands * s), (s, g), (h1, h1), (h1,),
              (h2, h1), (h2,), (channels, h2), (channels,)]  # fmt: skip
    return [0.5 * _rnd(*sh, seed=10 + i) for i, sh in enumerate(shapes)]


@needs_interpreter
def test_grid_mlp_bf16_within_tolerance_of_fp32():
    args = _grid_problem()
    ref = grid_mlp.grid_mlp_forward(*args, 3)
    out = grid_mlp.grid_mlp_forward(*args, 3, precision="bf16")
    assert 1e-5 < rel_max_error(out, ref) <= BF16_TOL
    gout = _rnd(*ref.shape, seed=30)
    grads = grid_mlp.grid_mlp_backward(gout, *args, 3)
    grads16 = grid_mlp.grid_mlp_backward(gout, *args, 3, precision="bf16")
    for name, a, b in zip(["dxd", "dxn", "dw1", "db1", "dw2", "db2", "dw3", "db3"], grads16, grads,
                          strict=True):  # fmt: skip
        assert rel_max_error(a, b) <= BF16_TOL, name


@needs_interpreter
def test_sphere_heads_bf16_within_tolerance_of_fp32():
    lmax, c, p, atoms = 2, 8, 24, 5
    x, sh = _rnd(atoms, (lmax + 1) ** 2, c, seed=40), _rnd(p, (lmax + 1) ** 2, seed=41)
    w = []
    for h in range(2):  # nn.Linear-sized weights (1/sqrt(fan_in))
        w += [_rnd(c, c, seed=50 + h) / c**0.5, _rnd(c, seed=52 + h) / c**0.5,
              _rnd(c, c, seed=54 + h) / c**0.5, _rnd(c, seed=56 + h) / c**0.5,
              _rnd(1, c, seed=58 + h) / c**0.5, _rnd(1, seed=60 + h)]  # fmt: skip
    v = [_rnd(p, 1, seed=62), _rnd(p, 3, seed=63)]
    ref = sphere_heads.sphere_heads_forward(x, sh, w, v, 2)
    out = sphere_heads.sphere_heads_forward(x, sh, w, v, 2, precision="bf16")
    for a, b in zip(out, ref, strict=True):
        assert 1e-5 < rel_max_error(a, b) <= BF16_TOL
    gr = [_rnd(atoms, 1, seed=70), _rnd(atoms, 3, seed=71)]
    ref_g = sphere_heads.sphere_heads_backward(gr, x, sh, w, v, 2)
    out_g = sphere_heads.sphere_heads_backward(gr, x, sh, w, v, 2, precision="bf16")
    for i, (a, b) in enumerate(zip(out_g, ref_g, strict=True)):
        assert rel_max_error(a, b) <= BF16_TOL, i


# ----------------------------------------------------------------------------------------------
# Tensor cores in the compiled kernels (no GPU needed)
# ----------------------------------------------------------------------------------------------

_COMPILE = """
import json, sys
from scn_fast.kernels import aot, grid_projection as gp
results = []
for precision, archs in (("tf32", (90, 80)), ("bf16", (90, 80)), ("fp32", (90,))):
    cfgs, seen = [], set()
    for cfg in gp.launch_configs(6, 2, 128, precision=precision):
        # tf32 / bf16: every kernel variant and tile shape (divisibility attributes aside); fp32
        # (FMA or not depends only on the tile and the operand types): one per tile shape
        key = (cfg.num_warps, cfg.num_stages, cfg.signature["b_ptr"],
               *(cfg.constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")))
        key = key if precision == "fp32" else (cfg.name, *key)
        if key not in seen:
            seen.add(key)
            cfgs.append(cfg)
    path = sys.argv[1] + "." + precision
    if aot.compile_main([({"precision": precision}, cfgs)], archs, path, 2, "tensor cores"):
        sys.exit(1)
    results += json.load(open(path))
json.dump(results, open(sys.argv[1], "w"))
"""


@pytest.mark.gpu_compile
def test_gemm_tensor_cores_sm90_sm80(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "tc.json"
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE, str(report)],
        env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    print(proc.stdout)
    assert proc.returncode == 0, f"compilation failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    results = json.loads(report.read_text())
    assert {r["precision"] for r in results} == {"fp32", "tf32", "bf16"}
    assert {r["arch"] for r in results if r["precision"] != "fp32"} == {"sm_80", "sm_90"}
    for r in results:
        tc = r["tensor_cores"]
        where = (
            f"{r['kernel']} {r['arch']} {r['constexprs']['BLOCK_M']}x{r['constexprs']['BLOCK_N']}"
        )
        if r["precision"] == "fp32":
            assert tc == {"wgmma": 0, "mma": 0}, where
        elif r["arch"] == "sm_80":
            assert tc["mma"] > 0 and tc["wgmma"] == 0, where
        else:
            assert tc["wgmma"] + tc["mma"] > 0, where
    # the big tiles of the grid MLP run Hopper's warpgroup MMA
    big = [r for r in results if r["arch"] == "sm_90" and r["precision"] != "fp32"
           and r["constexprs"]["BLOCK_M"] == "128" and r["num_warps"] == 8]  # fmt: skip
    assert big and all(r["tensor_cores"]["wgmma"] > 0 for r in big)
    assert all(r["shared"] <= 227 * 1024 for r in results if r["arch"] == "sm_90")
    assert all(r["shared"] <= 163 * 1024 for r in results if r["arch"] == "sm_80")


# ----------------------------------------------------------------------------------------------
# The extension's grid GEMMs: tf32 is an argument of each call
# ----------------------------------------------------------------------------------------------


def test_extension_grid_ops_take_tf32_per_call():
    """Every grid / heads op of the extension has ``tf32=False``; on CPU it changes nothing (CPU
    GEMMs have no tf32) and leaves the process-wide flag as it was (on CUDA it scopes cuBLAS)."""
    from scn_fast.extension import load_extension

    ext = load_extension()
    for name in ("grid_mlp_forward", "grid_mlp_backward", "grid_mlp_forward_saving",
                 "grid_mlp_backward_saved", "sphere_heads_forward", "sphere_heads_backward"):  # fmt: skip
        schema = getattr(torch.ops.scn_fast_ext, name).default._schema
        assert schema.arguments[-1].name == "tf32" and schema.arguments[-1].default_value is False
    args = _grid_problem()
    old = torch.backends.cuda.matmul.allow_tf32
    out = ext.grid_mlp_forward(*args, 3)
    assert torch.equal(ext.grid_mlp_forward(*args, 3, False, True), out)
    assert torch.backends.cuda.matmul.allow_tf32 == old


@pytest.mark.parametrize("user", [None, "legacy", "new"])
def test_cublas_scope_sets_and_restores_the_precision(user):
    """The weight-gradient GEMMs' cuBLAS precision is set for the call and restored, whichever API
    the program used (flags only: no GPU needed)."""
    from scn_fast.kernels.tile_loop import cublas_scope

    flags = torch.backends.cuda.matmul
    new_api = hasattr(flags, "fp32_precision")
    name = "fp32_precision" if new_api else "allow_tf32"
    saved = getattr(flags, name)
    try:
        if user == "legacy":
            flags.allow_tf32 = True
        elif user == "new" and new_api:
            flags.fp32_precision = "tf32"
        before = getattr(flags, name)
        for precision, tf32 in (("fp32", False), ("tf32", True), ("bf16", True)):
            with cublas_scope(torch.device("cuda"), precision):
                inside = getattr(flags, name)
                assert inside == (("tf32" if tf32 else "ieee") if new_api else tf32)
            assert getattr(flags, name) == before
        with cublas_scope(torch.device("cpu"), "tf32"):
            assert getattr(flags, name) == before
    finally:
        setattr(flags, name, saved)
