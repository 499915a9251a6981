"""The compiled scn_fast_ext ops against an independent pure-torch reference of scn_fast/ops/SPEC.md.

The reference expands the compact Wigner rows into a dense (E, R, (L+1)^2) matrix and contracts with
einsum in float64; scatters use index_add_ on the destination indices (not the CSR the op is given).
The extension is built once per test module (module fixture); the CUDA checks compare against the CPU twin.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from scn_fast import extension
from scn_fast.extension import csrc_dir, extension_status, load_extension
from scn_fast.ops import edge_layout, reference

from .cuda_compile import compile_sm80_sm90, spill_stores

# ------------------------------------------------------------------------------------------------
# Reference: the ops' reference backend (scn_fast.ops.reference), in float64


def layout_sizes(lmax: int, mmax: int) -> tuple[int, int]:
    """(R, K)."""
    lay = edge_layout(lmax, mmax)
    return lay.R, lay.K


def reference_gather_rotate(x, wig, idx, lmax, mmax) -> torch.Tensor:
    """y (E, P, R, C) float64."""
    return reference.gather_rotate(x, wig, idx, lmax, mmax, dtype=torch.float64)


def reference_rotate_scatter(m, wig, dest, lmax, mmax, num_nodes) -> torch.Tensor:
    """out (num_nodes, (L+1)^2, C) float64; dest (E, P) the destination node of each edge side."""
    return reference.rotate_scatter(m, wig, dest, lmax, mmax, num_nodes, dtype=torch.float64)


def csr_of(dest: torch.Tensor, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per side p: perm[p] = stable argsort of dest[:, p], ptr[p] = [0, cumsum(counts)]."""
    perms, ptrs = [], []
    for p in range(dest.shape[1]):
        perms.append(torch.argsort(dest[:, p], stable=True))
        counts = torch.bincount(dest[:, p], minlength=num_nodes)
        ptrs.append(torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
    return torch.stack(perms).contiguous(), torch.stack(ptrs).contiguous()


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (0 for empty or all-zero references with exact zeros out)."""
    if ref.numel() == 0:
        return 0.0
    err = (out.double() - ref).abs().max().item()
    return err / max(ref.abs().max().item(), 1e-300)


# ------------------------------------------------------------------------------------------------
# Random problems


def make_problem(lmax, mmax, P, C, N, E, extra_coeffs, dtype, wig_dtype=None, seed=0):
    """x (N, S_x, C), wig (E, K), dest (E, P) leaving the last node without edges, m (E, P, R, C)."""
    g = torch.Generator().manual_seed(seed)
    R, K = layout_sizes(lmax, mmax)
    S_x = (lmax + 1) ** 2 + extra_coeffs
    x = torch.randn(N, S_x, C, generator=g).to(dtype)
    wig = torch.randn(E, K, generator=g).to(wig_dtype or dtype)
    dest = torch.randint(0, max(N - 1, 1), (E, P), generator=g)
    m = torch.randn(E, P, R, C, generator=g).to(dtype)
    return x, wig, dest, m


# lmax 0..10 x mmax {0, 1}, with channel counts (odd, vector-sized, tails), sides and extra x rows.
CHANNELS = (1, 3, 17, 16, 33, 8, 5, 40)
CASES = [
    (lmax, mmax, 1 + (lmax + mmax) % 2, CHANNELS[(2 * lmax + mmax) % len(CHANNELS)], lmax % 3)
    for lmax in range(11)
    for mmax in (0, 1)
]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture(scope="module")
def ext():
    return load_extension()


def test_status_after_build(ext):
    assert extension_status() == (True, None)
    assert hasattr(ext, "gather_rotate") and hasattr(ext, "rotate_scatter")


def test_build_failure_raises_with_compiler_output(ext, tmp_path, monkeypatch):
    """A compile error surfaces from load_extension() (not at import) with the compiler's output, and
    the failure is cached for the process. Runs after the real build (ext) and restores its state."""
    broken = tmp_path / "csrc"
    (broken / "cpu").mkdir(parents=True)
    for rel in extension._COMMON_SOURCES:
        (broken / rel).write_text('#error "scn_fast_test_broken_source"\n')
    monkeypatch.setattr(extension, "csrc_dir", lambda: broken)
    monkeypatch.setattr(extension, "_cuda_toolkit_available", lambda: False)
    monkeypatch.setattr(extension, "_state", SimpleNamespace(ops=None, error=None))
    monkeypatch.setenv(extension.ENV_BUILD_DIR, str(tmp_path / "build"))
    with pytest.raises(RuntimeError, match="scn_fast_test_broken_source") as first:
        extension.load_extension()
    ok, reason = extension.extension_status()
    assert not ok and reason is not None and "scn_fast_test_broken_source" in reason
    with pytest.raises(RuntimeError) as again:  # cached: same error, no rebuild
        extension.load_extension()
    assert str(again.value) == str(first.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("lmax", "mmax", "P", "C", "extra"), CASES)
def test_gather_rotate_matches_reference(ext, lmax, mmax, P, C, extra, dtype):
    x, wig, dest, _ = make_problem(lmax, mmax, P, C, N=7, E=23, extra_coeffs=extra, dtype=dtype)
    y = ext.gather_rotate(x, wig, dest, lmax, mmax)
    R, _ = layout_sizes(lmax, mmax)
    assert y.shape == (23, P, R, C) and y.dtype == dtype
    assert max_rel_error(y, reference_gather_rotate(x, wig, dest, lmax, mmax)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("lmax", "mmax", "P", "C", "extra"), CASES)
def test_rotate_scatter_matches_reference(ext, lmax, mmax, P, C, extra, dtype):
    N, E = 7, 23
    _, wig, dest, m = make_problem(lmax, mmax, P, C, N, E, extra_coeffs=0, dtype=dtype)
    perm, ptr = csr_of(dest, N)
    out = ext.rotate_scatter(m, wig, perm, ptr, lmax, mmax, N)
    assert out.shape == (N, (lmax + 1) ** 2, C) and out.dtype == dtype
    assert torch.all(out[N - 1] == 0)  # the node without edges
    ref = reference_rotate_scatter(m, wig, dest, lmax, mmax, N)
    assert max_rel_error(out, ref) <= TOL[dtype]


def test_production_shape_float32(ext):
    """L=6, M=1, P=2, C=128 (the production resolution) on a 38-atom-sized graph."""
    N, E = 38, 300
    x, wig, dest, m = make_problem(6, 1, 2, 128, N, E, extra_coeffs=0, dtype=torch.float32, seed=3)
    y = ext.gather_rotate(x, wig, dest, 6, 1)
    assert max_rel_error(y, reference_gather_rotate(x, wig, dest, 6, 1)) <= 1e-5
    perm, ptr = csr_of(dest, N)
    out = ext.rotate_scatter(m, wig, perm, ptr, 6, 1, N)
    assert max_rel_error(out, reference_rotate_scatter(m, wig, dest, 6, 1, N)) <= 1e-5


@pytest.mark.parametrize("P", [1, 2])
def test_zero_edges(ext, P):
    x, wig, dest, m = make_problem(3, 1, P, 5, N=4, E=0, extra_coeffs=0, dtype=torch.float32)
    y = ext.gather_rotate(x, wig, dest, 3, 1)
    assert y.shape == (0, P, 10, 5)
    perm, ptr = csr_of(dest, 4)
    out = ext.rotate_scatter(m, wig, perm, ptr, 3, 1, 4)
    assert out.shape == (4, 16, 5) and torch.all(out == 0)


def test_zero_nodes_and_channels(ext):
    _, wig, dest, m = make_problem(2, 1, 2, 0, N=3, E=5, extra_coeffs=0, dtype=torch.float32)
    perm, ptr = csr_of(dest, 3)
    assert ext.rotate_scatter(m, wig, perm, ptr, 2, 1, 3).shape == (3, 9, 0)
    empty_m = m[:0]
    perm0, ptr0 = csr_of(dest[:0], 0)
    assert ext.rotate_scatter(empty_m, wig[:0], perm0, ptr0, 2, 1, 0).shape == (0, 9, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("wig_dtype", [None, torch.float32], ids=["wig_same", "wig_f32"])
def test_half_types(ext, dtype, wig_dtype):
    """Half features (wig the same dtype or float32), float accumulation: error ~ output rounding."""
    N, E, lmax, mmax = 6, 40, 4, 1
    x, wig, dest, m = make_problem(lmax, mmax, 2, 19, N, E, 1, dtype, wig_dtype, seed=5)
    y = ext.gather_rotate(x, wig, dest, lmax, mmax)
    assert y.dtype == dtype
    assert max_rel_error(y, reference_gather_rotate(x, wig, dest, lmax, mmax)) <= 1e-2
    perm, ptr = csr_of(dest, N)
    out = ext.rotate_scatter(m, wig, perm, ptr, lmax, mmax, N)
    assert out.dtype == dtype
    assert max_rel_error(out, reference_rotate_scatter(m, wig, dest, lmax, mmax, N)) <= 1e-2


def test_rotate_scatter_bit_identical(ext):
    """Repeat runs, and runs on 1 or more threads, give the same bits (fixed summation order)."""
    N, E = 30, 2000
    _, wig, dest, m = make_problem(6, 1, 2, 37, N, E, 0, torch.float32, seed=11)
    perm, ptr = csr_of(dest, N)
    first = ext.rotate_scatter(m, wig, perm, ptr, 6, 1, N)
    assert all(torch.equal(first, ext.rotate_scatter(m, wig, perm, ptr, 6, 1, N)) for _ in range(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(first, ext.rotate_scatter(m, wig, perm, ptr, 6, 1, N))
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# Bad inputs: RuntimeError with a message naming the problem


def _good_gather():
    x, wig, dest, _ = make_problem(6, 1, 2, 4, N=5, E=6, extra_coeffs=0, dtype=torch.float32)
    return {"x": x, "wig": wig, "idx": dest, "lmax": 6, "mmax": 1}


def _good_scatter():
    _, wig, dest, m = make_problem(6, 1, 2, 4, N=5, E=6, extra_coeffs=0, dtype=torch.float32)
    perm, ptr = csr_of(dest, 5)
    return {"m": m, "wig": wig, "perm": perm, "ptr": ptr, "lmax": 6, "mmax": 1, "num_nodes": 5}


GATHER_ERRORS = [
    ("idx_int32", lambda a: a.update(idx=a["idx"].int()), r"idx must be int64"),
    ("wrong_K", lambda a: a.update(wig=a["wig"][:, :100].contiguous()), r"K = 145"),
    ("mmax_2", lambda a: a.update(mmax=2), r"mmax must be 0 or 1"),
    ("lmax_11", lambda a: a.update(lmax=11), r"lmax must be in \[0, 10\]"),
    (
        "few_coeffs",
        lambda a: a.update(x=a["x"][:, :36].contiguous()),
        r"fewer than \(lmax \+ 1\)\^2 = 49",
    ),
    ("wig_f64", lambda a: a.update(wig=a["wig"].double()), r"wig dtype .* does not match"),
    (
        "x_noncontig",
        lambda a: a.update(x=a["x"].transpose(0, 2).contiguous().transpose(0, 2)),
        r"x .* must be contiguous",
    ),
    (
        "x_int",
        lambda a: a.update(x=a["x"].long()),
        r"must be float32, float64, bfloat16 or float16",
    ),
    ("idx_range", lambda a: a["idx"].__setitem__((0, 1), 5), r"idx value 5 .* out of range"),
    (
        "wig_rows",
        lambda a: a.update(wig=a["wig"][:4].contiguous()),
        r"wig has 4 rows but idx has E = 6",
    ),
]

SCATTER_ERRORS = [
    ("perm_int32", lambda a: a.update(perm=a["perm"].int()), r"perm must be int64"),
    ("wrong_K", lambda a: a.update(wig=torch.zeros(6, 144)), r"K = 145"),
    ("wrong_R", lambda a: a.update(m=a["m"][:, :, :18].contiguous()), r"R = 19 rows"),
    ("ptr_shape", lambda a: a.update(num_nodes=6), r"ptr must have shape \(P, num_nodes \+ 1\)"),
    ("ptr_end", lambda a: a["ptr"].__setitem__((1, 5), 5), r"end at E = 6"),
    ("perm_range", lambda a: a["perm"].__setitem__((0, 0), -1), r"perm value -1 .* out of range"),
    ("wig_f64", lambda a: a.update(wig=a["wig"].double()), r"wig dtype .* does not match"),
]


BAD_INPUTS = [
    *(("gather_rotate", _good_gather, *case) for case in GATHER_ERRORS),
    *(("rotate_scatter", _good_scatter, *case) for case in SCATTER_ERRORS),
]


@pytest.mark.parametrize(
    ("op", "good", "name", "mutate", "message"),
    BAD_INPUTS,
    ids=[f"{c[0]}-{c[2]}" for c in BAD_INPUTS],
)
def test_bad_input_is_named(ext, op, good, name, mutate, message):
    """Each op's good arguments with one thing broken: a RuntimeError naming the problem."""
    args = good()
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        getattr(ext, op)(**args)


# ------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu_compile
def test_cuda_kernels_compile_for_sm80_sm90(tmp_path):
    """edge_ops_kernels.cu compiles for A100 and H100 with torch's nvcc defines, without spills."""
    src = csrc_dir()
    assert src is not None
    log = compile_sm80_sm90(src / "cuda" / "edge_ops_kernels.cu", tmp_path / "edge_ops_kernels.o")
    spills = spill_stores(log)
    assert spills and all(s == "0" for s in spills), "register spills:\n" + log


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    ("lmax", "mmax", "P", "C"), [(6, 1, 2, 128), (3, 0, 1, 17), (10, 1, 2, 33), (2, 1, 2, 1)]
)
def test_cuda_matches_cpu(ext, lmax, mmax, P, C, dtype):
    if not extension.cuda_twin_expected():
        pytest.skip("torch has CUDA but no CUDA toolkit was found: the extension has no CUDA twin")
    N, E = 11, 300
    x, wig, dest, m = make_problem(lmax, mmax, P, C, N, E, extra_coeffs=1, dtype=dtype, seed=7)
    perm, ptr = csr_of(dest, N)
    cuda = [t.cuda() for t in (x, wig, dest, m, perm, ptr)]
    xc, wc, dc, mc, pc, qc = cuda
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    y_cpu = ext.gather_rotate(x, wig, dest, lmax, mmax)
    y_gpu = ext.gather_rotate(xc, wc, dc, lmax, mmax)
    assert y_gpu.is_cuda and y_gpu.dtype == dtype
    assert max_rel_error(y_gpu.cpu(), y_cpu.double()) <= tol
    o_cpu = ext.rotate_scatter(m, wig, perm, ptr, lmax, mmax, N)
    o_gpu = ext.rotate_scatter(mc, wc, pc, qc, lmax, mmax, N)
    assert max_rel_error(o_gpu.cpu(), o_cpu.double()) <= tol
    assert torch.equal(o_gpu, ext.rotate_scatter(mc, wc, pc, qc, lmax, mmax, N))  # deterministic
    if dtype == torch.bfloat16:  # float32 wig with bfloat16 features
        y_mixed = ext.gather_rotate(xc, wc.float(), dc, lmax, mmax)
        assert max_rel_error(y_mixed.cpu(), y_cpu.double()) <= tol
