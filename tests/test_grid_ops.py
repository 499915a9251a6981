"""The fused grid MLP (``scn_fast::grid_projection``) and output heads (``scn_fast::output_heads``).

* Each fused backend ("extension": csrc/grid_ops.cpp; "triton": kernels/grid_projection.py, in
  Triton's interpreter on CPU tensors) against the reference backend (``scn_fast.ops.reference``:
  ``Grid.to_grid`` / ``Grid.from_grid`` with ``nn.Linear`` layers and SiLU, and the heads), what
  the model's reference path runs; forward and every gradient, float32 (1e-5) and float64
  (1e-12), relative to the max abs of the reference (docs/tolerances.md). Every test checks that
  the named backend actually ran (a recording wrapper around the backend's entry points).
* gradcheck in float64 on tiny shapes; a memory check (no (N*G, .)-sized allocation in the forward
  or backward, via torch.profiler's allocation records); the constants against upstream's matrices.
* gpu_compile: every Triton specialisation the launchers use, compiled for sm_80 and sm_90 in a
  subprocess without TRITON_INTERPRET. gpu: both backends on CUDA at scn-t4-b2 shapes.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from scn_fast import so3
from scn_fast.dispatch import Dispatcher, OpRequest
from scn_fast.ops import grid_projection as gp
from scn_fast.ops import output_heads as oh
from scn_fast.ops import reference
from scn_fast.ops.reference import Grid

from .conftest import TOL, rel_max_error
from .cuda_compile import triton_compile_main

BACKENDS = ["extension", "triton"]
TOLS = {torch.float32: TOL["op_fp32"], torch.float64: TOL["op_fp64"]}


def _triton_device() -> str | None:
    from scn_fast.kernels import grid_projection as kg

    if kg.is_interpreted():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def device_for(backend: str) -> str:
    """Where a backend's CPU-suite tests run: the extension on CPU; Triton on CPU when interpreted."""
    if backend == "extension":
        return "cpu"
    dev = _triton_device()
    if dev is None:
        pytest.skip(
            "Triton kernels are compiled (TRITON_INTERPRET unset) and no CUDA device is visible"
        )
    return dev


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one thread (on a busy 2-core machine an OpenMP barrier per small GEMM costs a
    scheduler quantum, ~15 ms, so two threads make these tests 100x slower, not faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ran(monkeypatch):
    """Counts the calls of each backend's entry points, so a test fails if its backend did not run."""
    calls: Counter = Counter()

    class Recording:
        def __init__(self, name, inner):
            self._name, self._inner = name, inner

        def __getattr__(self, fn):
            target = getattr(self._inner(), fn)

            def wrapped(*args, **kwargs):
                calls[(self._name, fn)] += 1
                return target(*args, **kwargs)

            return wrapped

    for name, be in list(gp.BACKENDS.items()):
        rec = Recording(name, be.module)
        monkeypatch.setitem(gp.BACKENDS, name, gp.GridBackend(name, lambda rec=rec: rec))
    return calls


# ----------------------------------------------------------------------------------------------
# References (the model's own code paths)
# ----------------------------------------------------------------------------------------------


def make_grid_problem(lmax, bands, channels, n_atoms, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = (lmax + 1) ** 2
    width = 2 * bands * channels
    torch.manual_seed(seed)
    fc1, fc2 = nn.Linear(width, width), nn.Linear(width, 2 * channels)
    fc3 = nn.Linear(2 * channels, channels)
    layers = [m.to(dtype=dtype, device=device) for m in (fc1, fc2, fc3)]
    xd = torch.randn(n_atoms, s, channels, generator=gen, dtype=torch.float64)
    xn = torch.randn(n_atoms, s, channels, generator=gen, dtype=torch.float64)
    xd, xn = (t.to(dtype=dtype, device=device).requires_grad_() for t in (xd, xn))
    return xd, xn, layers


def reference_grid(grid: Grid, xd, xn, fc1, fc2, fc3):
    """The reference backend (``ops.reference.grid_mlp``): what the model's reference path runs."""
    return reference.grid_mlp(grid, xd, xn, fc1, fc2, fc3, nn.SiLU())


def saved_by_default(backend: str, xd: torch.Tensor) -> bool:
    """Whether the op, left to choose (save_activations=None), keeps its activations."""
    return gp.saves_activations(backend, xd.device.type, xd.requires_grad)


def grid_params(layers):
    return [t for m in layers for t in (m.weight, m.bias)]


def forward_ran(ran, backend: str, saved: bool) -> int:
    """Calls of the forward entry point the saving mode uses (``saved``) or the recompute one."""
    return ran[(backend, "grid_mlp_forward_saving" if saved else "grid_mlp_forward")]


def backward_ran(ran, backend: str, saved: bool) -> int:
    return ran[(backend, "grid_mlp_backward_saved" if saved else "grid_mlp_backward")]


def check_grid(backend, lmax, bands, channels, n_atoms, dtype, tile_atoms, ran, save=None):
    """The op against upstream's computation, forward and every gradient. save: the
    save_activations argument (None: the op chooses; on CPU the extension saves)."""
    device = device_for(backend)
    xd, xn, layers = make_grid_problem(lmax, bands, channels, n_atoms, dtype, device)
    params = grid_params(layers)
    ref = reference_grid(Grid(lmax, bands), xd, xn, *layers)
    out = gp.grid_mlp(
        xd,
        xn,
        *layers,
        lmax=lmax,
        num_bands=bands,
        backend=backend,
        tile_atoms=tile_atoms,
        save_activations=save,
    )
    saved = save if save is not None else saved_by_default(backend, xd)
    assert out.shape == ref.shape and out.dtype == dtype and out.device == ref.device
    assert forward_ran(ran, backend, saved) >= 1
    tol = TOLS[dtype]
    assert rel_max_error(out, ref) <= tol
    if n_atoms == 0:
        return
    gout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(
        device
    )
    inputs = [xd, xn, *params]
    want = torch.autograd.grad(ref, inputs, gout)
    got = torch.autograd.grad(out, inputs, gout)
    assert backward_ran(ran, backend, saved) >= 1
    names = ["x_down", "x_new", "w1", "b1", "w2", "b2", "w3", "b3"]
    for name, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape, name
        assert rel_max_error(a, b) <= tol, (name, rel_max_error(a, b))


# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lmax", "bands"), [(1, 1), (1, 2), (2, 2), (4, 1), (6, 2), (10, 1), (10, 3)]
)
def test_constants_equal_upstream_matrices(lmax, bands):
    """to_grid (G, b*S) and from_grid (S, G) reproduce Grid.to_grid / from_grid to 1e-12 (float64)."""
    grid = Grid(lmax, bands)
    to_grid, from_grid = gp.grid_constants(lmax, bands, torch.float64, "cpu")
    s = (lmax + 1) ** 2
    g = grid.mats.res_beta * grid.mats.res_alpha
    assert to_grid.shape == (g, bands * s) and from_grid.shape == (s, g)
    x = torch.randn(3, s, 5, dtype=torch.float64)
    up = grid.to_grid(x, 5).view(3, g, bands, 5)
    mine = torch.einsum("gki,zic->zgkc", to_grid.view(g, bands, s), x)
    assert rel_max_error(mine, up) <= 1e-12
    y = torch.randn(3 * g, 5, dtype=torch.float64)
    up = grid.from_grid(y, 5).view(3, s, 5)
    assert rel_max_error(torch.einsum("ig,zgc->zic", from_grid, y.view(3, g, 5)), up) <= 1e-12
    f32 = gp.grid_constants(lmax, bands, torch.float32, "cpu")[0]
    assert f32.dtype == torch.float32 and torch.equal(f32, to_grid.float())


# ----------------------------------------------------------------------------------------------
# Grid MLP against the reference
# ----------------------------------------------------------------------------------------------

GRID_CASES = [
    # lmax, bands, channels, atoms, tile_atoms
    (1, 1, 3, 5, 2),
    (1, 2, 4, 3, 8),
    (2, 2, 5, 7, 3),
    (4, 1, 3, 4, 3),
    (6, 2, 3, 5, 2),
    (6, 1, 8, 3, 2),
    (10, 1, 3, 2, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("lmax", "bands", "channels", "atoms", "tile"), GRID_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grid_matches_reference(backend, lmax, bands, channels, atoms, tile, dtype, ran):
    check_grid(backend, lmax, bands, channels, atoms, dtype, tile, ran)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("lmax", "bands", "channels", "atoms", "tile"), GRID_CASES[::2])
@pytest.mark.parametrize("save", [False, True], ids=["recompute", "saved"])
def test_grid_extension_both_backward_modes(save, lmax, bands, channels, atoms, tile, dtype, ran):
    """The extension's backward that recomputes each tile (GPUs, inference-only callers) and the one
    that reads the forward's saved pre-activations (CPU training), both against upstream."""
    check_grid("extension", lmax, bands, channels, atoms, dtype, tile, ran, save=save)


def test_grid_save_activations_refused_off_cpu_extension():
    xd, xn, layers = make_grid_problem(1, 1, 2, 2, torch.float64, "cpu")
    with pytest.raises(ValueError, match="save_activations needs the extension"):
        gp.grid_mlp(xd, xn, *layers, lmax=1, num_bands=1, backend="triton", save_activations=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("atoms", [0, 1])
def test_grid_edge_sizes(backend, atoms, ran):
    """N = 0 (empty output, zero weight gradients) and a single atom."""
    check_grid(backend, 2, 2, 3, atoms, torch.float64, 4, ran)
    if atoms == 0:
        device = device_for(backend)
        xd, xn, layers = make_grid_problem(2, 2, 3, 0, torch.float64, device)
        out = gp.grid_mlp(xd, xn, *layers, lmax=2, num_bands=2, backend=backend)
        out.sum().backward()
        assert out.shape == (0, 9, 3)
        assert all(torch.count_nonzero(p.grad) == 0 for p in grid_params(layers))


def assert_fp32_grid_matches(out, ref, xd, xn, layers, ran, backend: str) -> None:
    """The fused grid output ``out`` and the gradients of x_down, x_new and every layer parameter
    (for one random output gradient) within the float32 op tolerance of the reference ``ref``; the
    backend's backward ran."""
    assert rel_max_error(out, ref) <= TOL["op_fp32"]
    gout = torch.randn_like(ref)
    inputs = [xd, xn, *grid_params(layers)]
    for a, b in zip(
        torch.autograd.grad(out, inputs, gout), torch.autograd.grad(ref, inputs, gout), strict=True
    ):
        assert rel_max_error(a, b) <= TOL["op_fp32"]
    assert backward_ran(ran, backend, saved_by_default(backend, xd)) >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_grid_large_activations(backend, ran):
    """Pre-activations far beyond +-87 (the clamp of the extension's float32 exp) and channel
    counts with vector bodies and scalar tails (2bC = 36, 2C = 18)."""
    device = device_for(backend)
    xd, xn, layers = make_grid_problem(2, 2, 9, 4, torch.float32, device)
    with torch.no_grad():
        for m in layers:
            m.weight.mul_(40.0)
    ref = reference_grid(Grid(2, 2), xd, xn, *layers)
    out = gp.grid_mlp(xd, xn, *layers, lmax=2, num_bands=2, backend=backend, tile_atoms=3)
    assert_fp32_grid_matches(out, ref, xd, xn, layers, ran, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grid_tile_independent(backend, ran):
    """The result does not depend on the tile size beyond rounding (1, ragged, all atoms)."""
    device = device_for(backend)
    xd, xn, layers = make_grid_problem(2, 2, 5, 7, torch.float64, device)
    outs = [
        gp.grid_mlp(xd, xn, *layers, lmax=2, num_bands=2, backend=backend, tile_atoms=t)
        for t in (1, 3, 7, 100)
    ]
    for o in outs[1:]:
        assert rel_max_error(o, outs[0]) <= 1e-13


@pytest.mark.parametrize(
    ("backend", "save"), [("extension", False), ("extension", True), ("triton", False)]
)
def test_grid_gradcheck(backend, save, ran):
    """float64 gradcheck w.r.t. x_down, x_new and every weight and bias (two tiles, ragged), for
    each backward (recomputing, and the extension's from saved pre-activations)."""
    device = device_for(backend)
    xd, xn, layers = make_grid_problem(1, 2, 2, 3, torch.float64, device)
    params = [p.detach().clone().requires_grad_() for p in grid_params(layers)]

    def fn(xd, xn, *ps):
        return gp.grid_projection(
            xd,
            xn,
            *ps,
            lmax=1,
            num_bands=2,
            backend=backend,
            tile_atoms=2,
            save_activations=save,
        )

    assert torch.autograd.gradcheck(fn, (xd, xn, *params), fast_mode=True)
    assert backward_ran(ran, backend, save) >= 1


def test_grid_reference_backend_is_upstream():
    xd, xn, layers = make_grid_problem(4, 2, 3, 3, torch.float64, "cpu")
    ref = reference_grid(Grid(4, 2), xd, xn, *layers)
    out = gp.grid_mlp(xd, xn, *layers, lmax=4, num_bands=2, backend="reference")
    assert torch.equal(out, ref)


def test_grid_bf16_gemms():
    """bf16_gemms (native bf16 GEMMs with w1, w2, w3; runs on any CPU, fast only with bf16 units):
    outputs and every gradient move by about bf16's rounding from float32, not more, and not 0."""
    xd, xn, layers = make_grid_problem(6, 2, 16, 5, torch.float32, "cpu", seed=3)
    g = torch.randn(5, 49, 16, generator=torch.Generator().manual_seed(4))
    results = {}
    for bf16 in (False, True):
        for t in (xd, xn, *grid_params(layers)):
            t.grad = None
        out = gp.grid_projection(
            xd, xn, *grid_params(layers), lmax=6, num_bands=2, backend="extension", bf16_gemms=bf16
        )
        out.backward(g)
        results[bf16] = [out.detach(), *(t.grad.clone() for t in (xd, xn, *grid_params(layers)))]
    names = ["out", "x_down", "x_new", "w1", "b1", "w2", "b2", "w3", "b3"]
    for name, exact, low in zip(names, results[False], results[True], strict=True):
        if name == "b3":  # fc3's bias gradient is a sum of grad_out (no GEMM): exact
            assert torch.equal(low, exact)
            continue
        err = (low - exact).abs().max() / exact.abs().max()
        assert 1e-5 < err < 3e-2, (name, err.item())
        cos = torch.nn.functional.cosine_similarity(low.flatten(), exact.flatten(), dim=0)
        assert cos > 0.9995, (name, cos.item())


def test_grid_bf16_gemms_needs_the_extension_and_float32():
    xd, xn, layers = make_grid_problem(2, 1, 3, 2, torch.float64, "cpu")
    with pytest.raises(ValueError, match="bf16_gemms"):
        gp.grid_projection(
            xd, xn, *grid_params(layers), lmax=2, num_bands=1, backend="extension", bf16_gemms=True
        )
    xd, xn, layers = make_grid_problem(2, 1, 3, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="bf16_gemms"):
        gp.grid_projection(
            xd, xn, *grid_params(layers), lmax=2, num_bands=1, backend="triton", bf16_gemms=True
        )


def test_grid_fake_and_schema():
    """torch.library.opcheck: schema, fake (meta) implementation and autograd registration."""
    xd, xn, layers = make_grid_problem(1, 1, 3, 3, torch.float64, "cpu")
    to_grid, from_grid = gp.grid_constants(1, 1, torch.float64, "cpu")
    args = (xd, xn, to_grid, from_grid, *grid_params(layers), 2, "extension")
    torch.library.opcheck(
        gp._grid_projection,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


# ----------------------------------------------------------------------------------------------
# Output heads against the reference
# ----------------------------------------------------------------------------------------------


def make_heads_problem(lmax, channels, reduce, n_atoms, dtype, device, forces=True, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    def head():
        ls = [nn.Linear(channels, channels), nn.Linear(channels, reduce), nn.Linear(reduce, 1)]
        return [m.to(dtype=dtype, device=device) for m in ls]

    x = torch.randn(n_atoms, (lmax + 1) ** 2, channels, generator=gen, dtype=torch.float64)
    return x.to(dtype=dtype, device=device).requires_grad_(), head(), (head() if forces else None)


def reference_heads(x, num_points, lmax, energy, forces):
    """The reference backend (``ops.reference.heads``): what the model's reference path runs."""
    sh = so3.sphere_harmonics_at_points(num_points, lmax).to(dtype=x.dtype, device=x.device)
    pts = so3.sphere_points(num_points).to(dtype=x.dtype, device=x.device)
    return reference.heads(x, sh, pts, energy, forces, nn.SiLU())


def _hw(layers):
    return None if layers is None else oh.head_weights(*layers)


HEADS_CASES = [
    # lmax, channels, reduce, atoms, points, tile, forces
    (1, 3, 2, 5, 16, 2, True),
    (2, 5, 3, 4, 20, 3, True),
    (4, 4, 4, 3, 16, 8, False),
    (6, 3, 5, 5, 128, 2, True),
    (10, 3, 2, 2, 24, 1, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    ("lmax", "channels", "reduce", "atoms", "points", "tile", "forces"), HEADS_CASES
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_heads_match_reference(
    backend, lmax, channels, reduce, atoms, points, tile, forces, dtype, ran
):
    device = device_for(backend)
    x, energy, force = make_heads_problem(lmax, channels, reduce, atoms, dtype, device, forces)
    re, rf = reference_heads(x, points, lmax, energy, force)
    e, f = oh.output_heads(
        x,
        num_points=points,
        lmax=lmax,
        energy=_hw(energy),
        forces=_hw(force),
        backend=backend,
        tile_atoms=tile,
    )
    assert ran[(backend, "sphere_heads_forward")] >= 1
    tol = TOLS[dtype]
    assert e.shape == (atoms,) and rel_max_error(e, re) <= tol
    if not forces:
        assert f is None
    else:
        assert f.shape == (atoms, 3) and rel_max_error(f, rf) <= tol
    gen = torch.Generator().manual_seed(3)
    ge = torch.randn(atoms, generator=gen, dtype=dtype).to(device)
    gf = torch.randn(atoms, 3, generator=gen, dtype=dtype).to(device)
    layers = energy + (force or [])
    inputs = [x, *(t for m in layers for t in (m.weight, m.bias))]

    def loss(e, f):
        return (e * ge).sum() + ((f * gf).sum() if f is not None else 0)

    want = torch.autograd.grad(loss(re, rf), inputs)
    got = torch.autograd.grad(loss(e, f), inputs)
    assert ran[(backend, "sphere_heads_backward")] >= 1
    pts = so3.sphere_points(points)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        scale = b.abs().max().item()
        if i == len(inputs) - 1 and forces:
            # the force head's b3: sum_z,j g[z, j] mean_p pts[p, j] cancels (mean pts ~ 0); scale by
            # the terms it sums, not by the near-zero result
            scale = max(scale, (gf.abs().sum() * pts.abs().mean()).item())
        err = (a.double() - b.double()).abs().max().item()
        assert err <= tol * scale, (i, err, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("atoms", [0, 1])
def test_heads_edge_sizes(backend, atoms, ran):
    device = device_for(backend)
    x, energy, force = make_heads_problem(2, 3, 2, atoms, torch.float64, device)
    e, f = oh.output_heads(
        x,
        num_points=16,
        lmax=2,
        energy=_hw(energy),
        forces=_hw(force),
        backend=backend,
        tile_atoms=4,
    )
    re, rf = reference_heads(x, 16, 2, energy, force)
    assert e.shape == (atoms,) and f.shape == (atoms, 3)
    assert rel_max_error(e, re) <= 1e-12 and rel_max_error(f, rf) <= 1e-12
    (e.sum() + f.sum()).backward()
    assert x.grad.shape == x.shape
    assert ran[(backend, "sphere_heads_backward")] >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_heads_gradcheck(backend, ran):
    device = device_for(backend)
    x, energy, force = make_heads_problem(1, 2, 3, 3, torch.float64, device)
    ws = [t.detach().clone().requires_grad_() for m in energy + force for t in (m.weight, m.bias)]

    def fn(x, *ws):
        return oh.output_heads(
            x,
            num_points=8,
            lmax=1,
            energy=tuple(ws[:6]),
            forces=tuple(ws[6:]),
            backend=backend,
            tile_atoms=3,
        )

    assert torch.autograd.gradcheck(fn, (x, *ws), fast_mode=True)
    assert ran[(backend, "sphere_heads_backward")] >= 1


def test_heads_reference_backend_is_upstream():
    x, energy, force = make_heads_problem(3, 4, 3, 3, torch.float64, "cpu")
    want = reference_heads(x, 16, 3, energy, force)
    got = oh.output_heads(
        x, num_points=16, lmax=3, energy=_hw(energy), forces=_hw(force), backend="reference"
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ----------------------------------------------------------------------------------------------
# Memory: nothing of size (N*G, .) is allocated
# ----------------------------------------------------------------------------------------------


def allocations(fn) -> tuple[int, int]:
    """(largest single allocation, peak of live allocations) in bytes during fn(), from
    torch.profiler's CPU allocator records (C++ internals of the extension included). An op's net
    self allocation counts at its start when positive, at its end when negative (frees at the end
    of an enclosing op, e.g. of its scratch buffers)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = [
        (
            e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end,
            e.self_cpu_memory_usage,
        )
        for e in prof.events()
        if e.self_cpu_memory_usage
    ]
    largest = max((d for _, d in deltas), default=0)
    live = peak = 0
    for _, d in sorted(deltas, key=lambda t: (t[0], -t[1])):
        live += d
        peak = max(peak, live)
    return largest, peak


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grid_sized_allocation(backend, ran):
    device = device_for(backend)
    if device != "cpu":
        pytest.skip("CPU allocator records")
    lmax, bands, channels, atoms = 2, 2, 4, 32
    xd, xn, layers = make_grid_problem(lmax, bands, channels, atoms, torch.float32, device)
    g = 2 * (lmax + 1) * (2 * lmax + 3)
    grid_bytes = atoms * g * 2 * bands * channels * 4  # upstream's (N*G, 2bC) fc1 input
    with torch.no_grad():
        ref_largest, _ = allocations(lambda: reference_grid(Grid(lmax, bands), xd, xn, *layers))
    assert ref_largest >= grid_bytes  # the instrument sees the reference's grid tensor

    def fused():  # the recomputing backward (what GPUs run): nothing of grid size is kept
        return gp.grid_mlp(
            xd,
            xn,
            *layers,
            lmax=lmax,
            num_bands=bands,
            backend=backend,
            tile_atoms=2,
            save_activations=False,
        )

    with torch.no_grad():
        largest, peak = allocations(fused)
    assert ran[(backend, "grid_mlp_forward")] >= 1
    assert largest <= grid_bytes // 8 and peak <= grid_bytes // 2, (largest, peak, grid_bytes)
    out = fused()
    largest, peak = allocations(lambda: out.backward(torch.ones_like(out)))
    assert ran[(backend, "grid_mlp_backward")] >= 1
    # (the reference's backward holds its six (N*G, .) activations, each >= grid_bytes / 2)
    assert largest <= grid_bytes // 8 and peak <= grid_bytes, (largest, peak, grid_bytes)

    # heads: no (N*P, C) sample tensor
    x, energy, force = make_heads_problem(lmax, 8, 8, atoms, torch.float32, device)
    samples_bytes = atoms * 128 * 8 * 4

    def heads():
        return oh.output_heads(
            x,
            num_points=128,
            lmax=lmax,
            energy=_hw(energy),
            forces=_hw(force),
            backend=backend,
            tile_atoms=2,
        )

    e, f = heads()  # builds the cached constants (sphere points: a (P, P, 3) temporary, once)
    with torch.no_grad():
        largest, peak = allocations(heads)
    assert largest <= samples_bytes // 8 and peak <= samples_bytes // 4, (largest, peak)
    largest, peak = allocations(lambda: (e.sum() + f.sum()).backward())
    assert ran[(backend, "sphere_heads_backward")] >= 1
    assert largest <= samples_bytes // 8 and peak <= samples_bytes, (largest, peak)


# ----------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------


def test_dispatcher_picks_fused_grid_backend():
    req = OpRequest("grid_projection", torch.device("cpu"), torch.float32, 6, 0, 1, 128)
    d = Dispatcher(use_fused=True)
    assert d.choose(req) == "extension"
    if _triton_device() == "cpu":
        assert Dispatcher(use_fused=True, backend="triton").choose(req) == "triton"
    bf16 = OpRequest("grid_projection", torch.device("cpu"), torch.bfloat16, 6, 0, 1, 128)
    ran, refused = d.decide(bf16)
    assert ran == "reference"
    assert "float32 and float64" in refused["extension"]


# ----------------------------------------------------------------------------------------------
# Compilation for real GPUs (no GPU needed)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu_compile
def test_triton_kernels_compile_for_sm80_sm90(tmp_path):
    """Every specialisation of the grid/heads GEMM kernel that the launchers use compiles to a cubin
    for sm_80 and sm_90 (kernels/grid_projection.py compile_main, TRITON_INTERPRET unset)."""
    results = triton_compile_main("grid_projection", tmp_path, timeout=1200)
    kinds = {r["kernel"] for r in results}
    assert any("HAS_A2=True" in k for k in kinds) and any("EPI=2" in k for k in kinds)
    assert any("BIAS=2" in k for k in kinds) and any("STORE_PRE=True" in k for k in kinds)


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("bands", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_grid_scn_t4_b2(backend, bands, ran):
    if backend == "triton" and _triton_device() != "cuda":
        pytest.skip("Triton kernels are interpreted in this process")
    xd, xn, layers = make_grid_problem(6, bands, 128, 200, torch.float32, "cuda")
    ref = reference_grid(Grid(6, bands), xd, xn, *layers)
    out = gp.grid_mlp(xd, xn, *layers, lmax=6, num_bands=bands, backend=backend, tile_atoms=64)
    assert_fp32_grid_matches(out, ref, xd, xn, layers, ran, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_heads(backend, ran):
    if backend == "triton" and _triton_device() != "cuda":
        pytest.skip("Triton kernels are interpreted in this process")
    x, energy, force = make_heads_problem(6, 128, 128, 200, torch.float32, "cuda")
    re, rf = reference_heads(x, 128, 6, energy, force)
    e, f = oh.output_heads(
        x, num_points=128, lmax=6, energy=_hw(energy), forces=_hw(force), backend=backend
    )
    assert rel_max_error(e, re) <= TOL["op_fp32"] and rel_max_error(f, rf) <= 1e-4
    assert ran[(backend, "sphere_heads_forward")] >= 1
