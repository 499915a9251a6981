"""Op microbenchmarks (pytest-benchmark): ``python -m pytest bench -q --benchmark-only``.

Files here are named ``bench_<op>.py``; this conftest makes pytest collect them (the project's normal
test run, testpaths = tests, never looks here). Shapes are scn-t4-b2's on the 38-atom Cu(111)+CO slab:
E = 1520 edges (40 per target atom, N = 38), C = 128 channels, H = 1024 hidden, resolutions L = 6 and
L = 4 with mmax = 1 (R = 19 / 13 rotated rows, S = 49 / 25 coefficients), 4 taps, float32.

Each benchmark runs its callable (synchronised on CUDA) with ``benchmark.pedantic`` after a warm-up
call, and records the activation memory of one call (``scn_fast.benchmark.measure.activation_memory``:
CUDA allocator peak, or CPU peak RSS, above what was held before) in ``benchmark.extra_info``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from scn_fast.benchmark import measure

E_EDGES, N_ATOMS, CHANNELS, HIDDEN, NUM_TAPS = 1520, 38, 128, 1024, -1
LMAXES = (6, 4)
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def pytest_collect_file(parent, file_path):
    """Collect ``bench_*.py`` (pytest's own collector already takes files named on the command line)."""
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@dataclass
class EdgeInputs:
    """One resolution's inputs: x (N, S, C) node features, edge_index (2, E) grouped by target,
    frames (E, 3, 3); the reference's dense Wigner rows wigner (E*T, R, S) and wigner_inv (E, S, R);
    the fused path's compact rows wig (E, K) and CSRs (both sides, and targets only)."""

    lmax: int
    mmax: int
    res: Any
    x: torch.Tensor
    edge_index: torch.Tensor
    frames: torch.Tensor
    wigner: torch.Tensor
    wigner_inv: torch.Tensor
    wig: torch.Tensor
    csr_both: Any
    csr_target: Any

    @property
    def R(self) -> int:
        return self.res.sphere_basis_reduce

    @property
    def S(self) -> int:
        return self.res.sphere_basis

    @property
    def T(self) -> int:
        return self.res.num_taps


def edge_inputs(lmax: int, device: str, mmax: int = 1, seed: int = 0) -> EdgeInputs:
    """Deterministic random inputs at the shapes of the module doc."""
    from scn_fast.frames import edge_frames
    from scn_fast.model import Resolution
    from scn_fast.ops import compact_wigner, edge_csr

    gen = torch.Generator().manual_seed(seed)
    per = E_EDGES // N_ATOMS
    target = torch.arange(N_ATOMS).repeat_interleave(per)
    source = (target + 1 + torch.randint(0, N_ATOMS - 1, (E_EDGES,), generator=gen)) % N_ATOMS
    edge_index = torch.stack([source, target]).to(device)
    vec = torch.randn(E_EDGES, 3, generator=gen, dtype=torch.float64).float().to(device)
    frames = edge_frames(vec, True)
    res = Resolution(lmax, mmax, NUM_TAPS, HIDDEN, 0.0)
    wigner, wigner_inv = res.wigner(frames)
    s = (lmax + 1) ** 2
    x = torch.randn(N_ATOMS, s, CHANNELS, generator=gen).to(device)
    both = edge_csr(edge_index.t(), N_ATOMS)
    return EdgeInputs(
        lmax,
        mmax,
        res,
        x,
        edge_index,
        frames,
        wigner,
        wigner_inv,
        compact_wigner(frames, lmax, mmax),
        both,
        both.side(1),
    )


def backend_params() -> list[Any]:
    """(device, backend) pairs; unavailable ones are skipped with the dispatcher's reason."""
    from scn_fast.benchmark.paths import backend_refusal

    out = []
    for device in ["cpu", "cuda"]:
        for b in ("extension", "triton"):
            if device == "cuda" and not torch.cuda.is_available():
                why = "no CUDA device"
            elif b == "triton" and device == "cpu":
                why = "Triton runs on CUDA only (its CPU interpreter is a testing tool)"
            else:
                why = backend_refusal(b, device)
            marks = [pytest.mark.skip(reason=why)] if why else []
            out.append(pytest.param(device, b, id=f"{device}-{b}", marks=marks))
    return out


def op_step(
    direction: str,
    forward: Callable[[], Any],
    inputs: Sequence[torch.Tensor],
    wrt: torch.Tensor,
    grad: torch.Tensor | None = None,
    loss: Callable[[Any], torch.Tensor] | None = None,
) -> Callable[[], Any]:
    """The benchmarked call of one op. ``direction`` "fwd": ``forward()`` without autograd, its
    output returned. "fwd+bwd": the ``inputs``' gradients cleared, then ``forward().backward(grad)``
    (or ``loss(forward()).backward()`` when ``loss`` is given, for ops with several outputs), and
    ``wrt.grad`` returned."""

    def step() -> Any:
        if direction == "fwd":
            with torch.no_grad():
                return forward()
        for t in inputs:
            t.grad = None
        out = forward()
        if loss is None:
            out.backward(grad)
        else:
            loss(out).backward()
        return wrt.grad

    return step


@pytest.fixture
def run_op(benchmark):
    """``run_op(fn, device, group, rounds=5)``: memory of one call into extra_info, then time it."""

    def run(fn: Callable[[], Any], device: str, group: str, rounds: int = 5) -> Any:
        def call() -> Any:
            out = fn()
            measure.synchronize(device)
            return out

        call()  # warm-up (first-call set-up, extension load, kernel compile)
        benchmark.group = group
        benchmark.extra_info["device"] = device
        benchmark.extra_info["peak_mem_bytes"] = measure.activation_memory(call, device)
        return benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)

    return run
