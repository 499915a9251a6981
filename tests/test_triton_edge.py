"""Triton edge kernels (scn_fast.kernels.edge_rotation) against the contract in scn_fast/ops/SPEC.md.

* Logic: both ops against a pure-torch float64 reference written here from the spec (a dense
  (E, R, S) Wigner matrix assembled from the compact rows, then einsum / index_add). These run on
  CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py where no CUDA device
  is visible, before triton is imported), or on CUDA when the kernels are compiled for a GPU.
* gpu_compile: every kernel compiled for sm_80 and sm_90 at the launchers' configurations, in a
  subprocess without TRITON_INTERPRET (tests/triton_compile.py); needs no GPU.
* gpu: the ops on CUDA in float32 and bfloat16, including 50k edges.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from scn_fast.kernels import edge_rotation as er

from scn_fast.ops import reference

from . import triton_compile

HERE = Path(__file__).resolve().parent

if er.is_interpreted():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None
needs_runner = pytest.mark.skipif(
    DEVICE is None,
    reason="the Triton kernels were compiled for a GPU (TRITON_INTERPRET was not set when triton "
    "was imported) and no CUDA device is visible",
)
needs_compiled_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or er.is_interpreted(),
    reason="needs CUDA and kernels compiled for it (not interpreted)",
)

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


# ----------------------------------------------------------------------------------------------
# Reference (from SPEC.md, independent of the kernels' closed forms)
# ----------------------------------------------------------------------------------------------


def compact_layout(lmax: int, mmax: int):
    """(row, coefficient, compact index) of every compact Wigner entry, and R, K."""
    rows, coeffs, entries = [], [], []
    row_off = off = 0
    for l in range(lmax + 1):
        n_l, width = 2 * min(l, mmax) + 1, 2 * l + 1
        for a in range(n_l):
            for b in range(width):
                rows.append(row_off + a)
                coeffs.append(l * l + b)
                entries.append(off + a * width + b)
        row_off += n_l
        off += n_l * width
    return torch.tensor(rows), torch.tensor(coeffs), torch.tensor(entries), row_off, off


def ref_gather_rotate(x, wig, idx, lmax, mmax):
    """The reference backend (``scn_fast.ops.reference``) in float64."""
    return reference.gather_rotate(x, wig, idx, lmax, mmax, dtype=torch.float64)


def ref_rotate_scatter(m, wig, dest, lmax, mmax, num_nodes):
    """dest (E, P): destination node of each edge side (what perm/ptr encode)."""
    return reference.rotate_scatter(m, wig, dest, lmax, mmax, num_nodes, dtype=torch.float64)


def csr(dest: torch.Tensor, num_nodes: int):
    """perm (P, E) and ptr (P, N+1) of each side's destinations (stable argsort, counts cumsum)."""
    perms, ptrs = [], []
    for p in range(dest.shape[1]):
        perms.append(torch.argsort(dest[:, p], stable=True))
        counts = torch.bincount(dest[:, p], minlength=num_nodes)
        ptrs.append(torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]))
    return torch.stack(perms).contiguous(), torch.stack(ptrs).contiguous()


def make_problem(lmax, mmax, channels, sides, num_edges=11, num_nodes=6, dtype=torch.float32,
                 wig_dtype=None, extra_coeffs=3, device=None, seed=0):  # fmt: skip
    """Random inputs; nodes 2 and num_nodes-1 get no edges (for num_nodes > 3)."""
    device = DEVICE if device is None else device
    gen = torch.Generator().manual_seed(seed)
    rows, entries = er.compact_sizes(lmax, mmax)
    used = [n for n in range(num_nodes) if num_nodes <= 3 or n not in (2, num_nodes - 1)]
    idx = torch.tensor(used)[torch.randint(len(used), (num_edges, sides), generator=gen)]
    s_x = (lmax + 1) ** 2 + extra_coeffs
    x = torch.randn(num_nodes, s_x, channels, generator=gen)
    wig = torch.randn(num_edges, entries, generator=gen)
    m = torch.randn(num_edges, sides, rows, channels, generator=gen)
    perm, ptr = csr(idx, num_nodes)
    wig_dtype = dtype if wig_dtype is None else wig_dtype
    return {
        "x": x.to(device, dtype), "wig": wig.to(device, wig_dtype), "m": m.to(device, dtype),
        "idx": idx.to(device), "perm": perm.to(device), "ptr": ptr.to(device),
        "lmax": lmax, "mmax": mmax, "num_nodes": num_nodes,
    }  # fmt: skip


def run_gather(pb):
    return er.gather_rotate(pb["x"], pb["wig"], pb["idx"], pb["lmax"], pb["mmax"])


def run_scatter(pb):
    return er.rotate_scatter(
        pb["m"], pb["wig"], pb["perm"], pb["ptr"], pb["lmax"], pb["mmax"], pb["num_nodes"]
    )


def check_gather(pb, tol):
    y = run_gather(pb)
    ref = ref_gather_rotate(pb["x"], pb["wig"], pb["idx"], pb["lmax"], pb["mmax"])
    assert y.dtype == pb["x"].dtype and y.shape == ref.shape
    assert_close(y, ref, tol)
    return y


def check_scatter(pb, tol):
    out = run_scatter(pb)
    ref = ref_rotate_scatter(pb["m"], pb["wig"], pb["idx"], pb["lmax"], pb["mmax"], pb["num_nodes"])
    assert out.dtype == pb["m"].dtype and out.shape == ref.shape
    assert_close(out, ref, tol)
    isolated = torch.ones(pb["num_nodes"], dtype=torch.bool, device=out.device)
    isolated[pb["idx"].flatten()] = False
    assert (out[isolated] == 0).all()
    return out


def assert_close(out, ref, tol):
    ref = ref.to(out.device)
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (out.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), (
        f"max abs error {err:.3e} > {tol} x max |ref| {scale:.3e}"
    )


# ----------------------------------------------------------------------------------------------
# Layout and configuration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lmax", "mmax", "rows", "entries"),
    [(6, 1, 19, 145), (4, 1, 13, 73), (6, 0, 7, 49), (3, 0, 4, 16), (10, 1, 31, 361), (0, 1, 1, 1)],
)
def test_compact_sizes(lmax, mmax, rows, entries):
    assert er.compact_sizes(lmax, mmax) == (rows, entries)
    assert compact_layout(lmax, mmax)[3:] == (rows, entries)


@pytest.mark.parametrize("channels", [1, 3, 17, 64, 128, 130, 256])
@pytest.mark.parametrize(("lmax", "mmax"), [(6, 1), (4, 1), (6, 0), (10, 1)])
def test_launch_configs_match_kernels(lmax, mmax, channels):
    configs = {c.name: c for c in er.launch_configs(lmax, mmax, channels, sides=2)}
    assert set(configs) == {"gather_rotate", "rotate_scatter"}
    for cfg in configs.values():
        assert list(cfg.signature) == list(cfg.kernel.arg_names)
        assert {k for k, v in cfg.signature.items() if v == "constexpr"} == set(cfg.constexprs)
        assert cfg.options["num_warps"] == cfg.num_warps
        block_c = cfg.constexprs["BLOCK_C"]
        assert block_c & (block_c - 1) == 0 and block_c <= 128
        assert block_c >= min(channels, 128) or cfg.name == "rotate_scatter"
    rows, entries = er.compact_sizes(lmax, mmax)
    g = configs["gather_rotate"].constexprs
    assert (g["LMAX"], g["MMAX"], g["P"], g["R"], g["K"]) == (lmax, mmax, 2, rows, entries)
    s = configs["rotate_scatter"].constexprs
    assert s["S_PAD"] >= (lmax + 1) ** 2
    assert s["S_PAD"] * s["BLOCK_C"] <= 2048 or s["BLOCK_C"] == 1


# ----------------------------------------------------------------------------------------------
# Logic (interpreter on CPU, or CUDA)
# ----------------------------------------------------------------------------------------------

# lmax 1, 4, 6 x mmax 0, 1 x (C, P) in {(1, 2), (3, 1), (17, 2)}, and two lmax = 10 cases.
CASES = [
    (lmax, mmax, channels, sides)
    for lmax in (1, 4, 6)
    for mmax in (0, 1)
    for channels, sides in ((1, 2), (3, 1), (17, 2))
] + [(10, 0, 17, 1), (10, 1, 3, 2)]


@needs_runner
@pytest.mark.parametrize(("lmax", "mmax", "channels", "sides"), CASES)
def test_gather_rotate_float32(lmax, mmax, channels, sides):
    check_gather(make_problem(lmax, mmax, channels, sides), TOL[torch.float32])


@needs_runner
@pytest.mark.parametrize(("lmax", "mmax", "channels", "sides"), CASES)
def test_rotate_scatter_float32(lmax, mmax, channels, sides):
    check_scatter(make_problem(lmax, mmax, channels, sides), TOL[torch.float32])


@needs_runner
@pytest.mark.parametrize(
    ("dtype", "wig_dtype"),
    [
        (torch.float64, torch.float64),
        (torch.float64, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
    ],
    ids=["f64", "f64-wig32", "bf16-wig32", "bf16", "f16"],
)
@pytest.mark.parametrize(("lmax", "mmax", "channels"), [(6, 1, 17), (4, 0, 3)])
def test_dtypes(dtype, wig_dtype, lmax, mmax, channels):
    pb = make_problem(lmax, mmax, channels, 2, dtype=dtype, wig_dtype=wig_dtype)
    check_gather(pb, TOL[dtype])
    check_scatter(pb, TOL[dtype])


@needs_runner
@pytest.mark.parametrize(("lmax", "mmax", "channels"), [(2, 1, 130), (6, 1, 70)])
def test_several_channel_blocks(lmax, mmax, channels):
    """C above the channel block (128 for gather_rotate, 64 for rotate_scatter at lmax 6)."""
    pb = make_problem(lmax, mmax, channels, 2, num_edges=5, num_nodes=4)
    check_gather(pb, TOL[torch.float32])
    check_scatter(pb, TOL[torch.float32])


@needs_runner
@pytest.mark.parametrize("num_nodes", [0, 3])
def test_no_edges(num_nodes):
    pb = make_problem(4, 1, 3, 2, num_edges=0, num_nodes=max(num_nodes, 1))
    pb["num_nodes"] = num_nodes
    pb["x"] = pb["x"][:num_nodes].contiguous()
    pb["ptr"] = torch.zeros(2, num_nodes + 1, dtype=torch.int64, device=DEVICE)
    y = run_gather(pb)
    assert y.shape == (0, 2, 13, 3) and y.dtype == torch.float32
    out = run_scatter(pb)
    assert out.shape == (num_nodes, 25, 3)
    assert (out == 0).all()


@needs_runner
def test_single_node_many_edges_deterministic():
    """One hub node receiving every edge on both sides: long segments, fixed order, bit-identical."""
    pb = make_problem(6, 1, 3, 2, num_edges=24, num_nodes=3, seed=3)
    pb["idx"][:, 1] = 1
    pb["perm"], pb["ptr"] = (t.to(DEVICE) for t in csr(pb["idx"].cpu(), 3))
    first_out = check_scatter(pb, TOL[torch.float32])
    first_y = check_gather(pb, TOL[torch.float32])
    for _ in range(2):
        assert torch.equal(run_scatter(pb), first_out)
        assert torch.equal(run_gather(pb), first_y)


@needs_runner
@pytest.mark.parametrize(("lmax", "mmax"), [(4, 1), (3, 0)])
def test_adjoint(lmax, mmax):
    """<gather_rotate(x), m> == <x, rotate_scatter(m)>: the transposes the op layer relies on."""
    pb = make_problem(lmax, mmax, 5, 2, dtype=torch.float64, extra_coeffs=0, seed=1)
    lhs = (run_gather(pb) * pb["m"]).sum()
    rhs = (pb["x"] * run_scatter(pb)).sum()
    assert abs(lhs.item() - rhs.item()) <= 1e-12 * max(abs(lhs.item()), 1.0)


@needs_runner
def test_validation_errors():
    pb = make_problem(4, 1, 3, 2)
    x, wig, idx, m, perm, ptr = (pb[k] for k in ("x", "wig", "idx", "m", "perm", "ptr"))
    bad_gather = [
        ((x[:, :24].contiguous(), wig, idx, 4, 1), "coefficients"),
        ((x.to(torch.int32), wig, idx, 4, 1), "dtype"),
        ((x[..., :1], wig, idx, 4, 1), "contiguous"),
        ((x, wig[:, :-1].contiguous(), idx, 4, 1), "wig must have shape"),
        ((x, wig.to(torch.float64), idx, 4, 1), "dtype"),
        ((x, wig, idx.to(torch.int32), 4, 1), "dtype"),
        ((x, wig, idx[:, 0], 4, 1), "dimensions"),
        ((x, wig, idx, 4, 2), "mmax"),
        ((x, wig, idx, -1, 1), "lmax"),
    ]
    for args, match in bad_gather:
        with pytest.raises(ValueError, match=match):
            er.gather_rotate(*args)
    bad_scatter = [
        ((m[:, :, :-1].contiguous(), wig, perm, ptr, 4, 1, 6), "m must have shape"),
        ((m, wig, perm[:1].contiguous(), ptr, 4, 1, 6), "perm must have shape"),
        ((m, wig, perm, ptr, 4, 1, 5), "ptr must have shape"),
        ((m, wig, perm, ptr.to(torch.int32), 4, 1, 6), "dtype"),
        ((m, wig, perm, ptr, 4, 1, -1), "num_nodes"),
        ((m, wig, perm, ptr, 6, 1, 6), "m must have shape"),
    ]
    for args, match in bad_scatter:
        with pytest.raises(ValueError, match=match):
            er.rotate_scatter(*args)


@pytest.mark.skipif(er.is_interpreted(), reason="the kernels are interpreted: CPU tensors are fine")
def test_cpu_tensors_rejected_when_compiled():
    pb = make_problem(1, 0, 3, 1, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        run_gather(pb)


# ----------------------------------------------------------------------------------------------
# Compilation for real GPUs (no GPU needed)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu_compile
def test_kernels_compile_for_sm80_sm90(tmp_path):
    """Every kernel at the launchers' configurations compiles to a cubin for sm_80 and sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "compile.json"
    proc = subprocess.run(
        [sys.executable, str(HERE / "triton_compile.py"), "--family", "edge", "--json", str(report)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    print(proc.stdout)
    assert proc.returncode == 0, f"compilation failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    results = json.loads(report.read_text())
    expected = {
        (kernel, f"sm_{arch}", case)
        for kernel in ("gather_rotate", "rotate_scatter")
        for arch in triton_compile.ARCHS
        for case in triton_compile.CASES
    }
    got = {
        (r["kernel"], r["arch"], (r["lmax"], r["mmax"], r["channels"], r["dtype"], r["wig_dtype"]))
        for r in results
        if r["ok"] and r["cubin_bytes"] > 0
    }
    assert got == expected
    required = {(6, 1), (4, 1), (6, 0)}
    assert required <= {(c[0], c[1]) for c in triton_compile.CASES}
    assert {128, 17} <= {c[2] for c in triton_compile.CASES}
    assert {"float32", "bfloat16"} <= {c[3] for c in triton_compile.CASES}


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_compiled_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    ("lmax", "mmax", "channels", "num_edges", "num_nodes"),
    [(6, 1, 128, 50_000, 2_500), (4, 1, 128, 20_000, 1_000), (6, 0, 17, 20_000, 1_000)],
)
def test_cuda_against_reference(dtype, lmax, mmax, channels, num_edges, num_nodes):
    pb = make_problem(
        lmax, mmax, channels, 2, num_edges=num_edges, num_nodes=num_nodes, dtype=dtype,
        wig_dtype=torch.float32, device="cuda",
    )  # fmt: skip
    check_gather(pb, TOL[dtype])
    out = check_scatter(pb, TOL[dtype])
    assert torch.equal(run_scatter(pb), out)
