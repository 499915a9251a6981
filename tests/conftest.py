"""Shared fixtures: golden files (upstream's own outputs, tests/golden) and tolerances."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. It must be switched on
# before any kernel module is imported, hence here, at conftest import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN_FILES = sorted(p.name for p in GOLDEN_DIR.glob("*__*.pt"))

# docs/tolerances.md, the one tolerance table (the benchmark's copy: scn_fast/benchmark/tolerance.py).
TOL = {
    "reference_fp32": {"energy": 1e-5, "force_u_factor": 3.0, "force_floor": 2e-5},
    "reference_fp64": {"energy": 1e-9, "force": 1e-8},
    "fused_fp32": {"energy": 1e-5, "force_u_factor": 5.0, "force_floor": 5e-5, "grad_rel": 1e-3},
    "fused_fp64": {"energy": 1e-9, "force": 1e-8},
    "tf32": {"energy": 5e-4, "force_cos": 0.999, "force_max": 0.05},
    "bf16": {"energy": 2e-3, "force_cos": 0.99, "force_max": 0.20},
    # torch.compile vs eager, same path, deterministic frames (grad_rel: this project's choice for
    # parameter gradients, relative L2 per tensor, as the fused row's)
    "compile": {"energy": 1e-5, "force": 2e-4, "grad_rel": 1e-3},
    "op_fp32": 1e-5,
    "op_fp64": 1e-12,
}


def rel_max_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (the op-level tolerance measure)."""
    scale = ref.abs().max().item() if ref.numel() else 1.0
    return ((a.double() - ref.double()).abs().max().item() if a.numel() else 0.0) / max(
        scale, 1e-300
    )


def energy_forces_grads(model: torch.nn.Module, data) -> tuple:
    """One forward + backward of ``model`` on ``data`` with the loss sum(E^2) + sum(F^2):
    (energy [n_structures], forces [n_atoms, 3], {parameter name: gradient in upstream's layout}),
    all detached. The comparison quantities of the fused-vs-reference model tests."""
    from scn_fast.tap_order import to_upstream_layout

    model.zero_grad(set_to_none=True)
    out = model(data)
    (out["energy"].pow(2).sum() + out["forces"].pow(2).sum()).backward()
    grads = {
        n: to_upstream_layout(model, n, p.grad.detach())
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return out["energy"].detach(), out["forces"].detach(), grads


def elementwise_backend(name: str) -> str:
    """``name``, after skipping the test when it is "triton" and Triton can run neither here (its
    interpreter) nor on a CUDA device: the backend argument of the message MLP's fused ops."""
    if name == "triton":
        from scn_fast.kernels import tap_elementwise

        if not tap_elementwise.is_interpreted() and not torch.cuda.is_available():
            pytest.skip("Triton compiled for a GPU and no CUDA device is visible")
    return name


def load_golden(name: str) -> dict:
    return torch.load(GOLDEN_DIR / name, weights_only=True)


@pytest.fixture(params=GOLDEN_FILES)
def golden(request) -> dict:
    return load_golden(request.param)


def golden_inputs(g: dict, precomputed: bool = False) -> types.SimpleNamespace:
    data = types.SimpleNamespace(**{k: v.clone() for k, v in g["inputs"].items()})
    if precomputed:
        data.edge_index = g["graph"]["precomputed_edge_index"].clone()
        data.cell_offsets = g["graph"]["cell_offsets"].clone()
        data.neighbors = g["graph"]["precomputed_neighbors"].clone()
    return data


def energy_error(e: torch.Tensor, truth: torch.Tensor) -> float:
    """max |dE| / max(1, |E|) over structures."""
    return ((e.double() - truth).abs() / truth.abs().clamp(min=1.0)).max().item()


def force_error(f: torch.Tensor, truth: torch.Tensor) -> float:
    """max |dF| / max |F_truth|."""
    return ((f.double() - truth).abs().max() / truth.abs().max()).item()


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device; none is visible"))


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose backends explicitly; a developer's SCN_FAST_BACKEND must not leak in."""
    if "SCN_FAST_BACKEND" in os.environ:
        monkeypatch.delenv("SCN_FAST_BACKEND")


@pytest.fixture
def isa_cap():
    """The extension's CPU ISA cap setter (2 = AVX-512, 1 = AVX2, 0 = baseline; a width the CPU
    lacks falls back to the next), restored after the test: runs every CPU clone on one machine."""
    from scn_fast.extension import load_extension

    ext = load_extension()
    old = ext._set_isa_cap(2)
    yield ext._set_isa_cap
    ext._set_isa_cap(old)
