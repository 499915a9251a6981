"""``torch.compile(model)`` (default Inductor backend, CPU): compiled vs eager on the same path within
the compile row of the tolerance table (docs/tolerances.md; deterministic frames), in inference
(``torch.no_grad``) and training (parameter gradients of an energy + force loss); no graph break
inside the interaction blocks, heads or fused ops; one graph for every atom and edge count.

What is compiled: ``forward_context`` (interaction blocks, heads, the ``scn_fast::*`` custom ops as
opaque graph nodes). ``prepare`` (input checks, radius graph, edge ranking, frames, rotations,
backend choices: data-dependent shapes) runs eagerly behind ``torch.compiler.disable``; that one
skipped call is the only graph break of a compiled forward.

Cost: Inductor compiles each path for 30-70 s on 2 cores with a cold cache (its on-disk cache makes
later runs much faster), so the compiled runs are module-scoped fixtures shared by the tests, over
four single structures of different sizes.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch._dynamo.utils import counters

from scn_fast import AtomsBatch, SphericalChannelNetwork, preset, systems
from scn_fast.dispatch import OPS

from .conftest import TOL, energy_error, force_error

EDGE_OPS = ("edge_rotation", "scatter_aggregation")
FUSED_OPS = OPS  # every op the plan names
# Atom counts 4, 14, 18, 32 and, with them, edge counts per resolution that all differ.
SYSTEMS = {
    "pt_bulk": lambda: systems.pt_bulk(),
    "cu111_co_223": lambda: systems.cu111_co(size=(2, 2, 3)),
    "cu111_co_224": lambda: systems.cu111_co(size=(2, 2, 4)),
    "pt_bulk_x2": lambda: systems.pt_bulk(2, seed=1),
}
# (backend, mode): the reference and the C++ extension's fused path; Triton (in its interpreter)
# is covered, in inference on one system, by test_triton_compiled_matches_eager.
RUNS = [
    ("reference", "inference"),
    ("reference", "training"),
    ("extension", "inference"),
    ("extension", "training"),
]


def make_model(backend: str) -> SphericalChannelNetwork:
    torch.manual_seed(0)
    return SphericalChannelNetwork(
        **preset("tiny"),
        use_fused=backend != "reference",
        backend=backend,
        deterministic_frames=True,
    )


def batch(name: str) -> AtomsBatch:
    return AtomsBatch.from_ase([SYSTEMS[name]()])


def step(model, data: AtomsBatch, training: bool, params: dict) -> tuple[dict, dict]:
    """Outputs and, in training, the parameter gradients of energy^2 + 1e4 * forces^2."""
    for p in params.values():
        p.grad = None
    with torch.set_grad_enabled(training):
        out = model(data)
        if not training:
            return out, {}
        loss = out["energy"].pow(2).sum() + 1e4 * out["forces"].pow(2).sum()
        loss.backward()
    return out, {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


def graph_breaks() -> list[str]:
    """Graph-break reasons recorded since the last counters.clear(), minus the intended one (the
    torch.compiler.disable'd ``prepare``)."""
    return [r for r in counters["graph_break"] if "prepare" not in r]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-300)).item()


@pytest.fixture(scope="module", params=RUNS, ids=["-".join(r) for r in RUNS])
def compiled_run(request) -> dict:
    """One model compiled once and run on every system next to its eager self."""
    backend, mode = request.param
    training = mode == "training"
    torch._dynamo.reset()
    counters.clear()
    model = make_model(backend)
    compiled = torch.compile(model)
    params = dict(model.named_parameters())
    results, seconds = {}, []
    for name in SYSTEMS:
        data = batch(name)
        eager = step(model, data, training, params)
        start = time.perf_counter()
        comp = step(compiled, data, training, params)
        seconds.append(time.perf_counter() - start)
        results[name] = (eager, comp, model.explain())
    print(f"\ntorch.compile {backend} {mode}: first call {seconds[0]:.1f} s, then {seconds[1:]}")
    return {
        "backend": backend,
        "training": training,
        "results": results,
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": graph_breaks(),
        "seconds": seconds,
    }


def test_compiled_matches_eager(compiled_run):
    tol = TOL["compile"]
    for name, ((eager, eager_grads), (comp, comp_grads), report) in compiled_run["results"].items():
        if compiled_run["backend"] != "reference":
            assert all(report[op]["ran"] == compiled_run["backend"] for op in EDGE_OPS), report
        e_err = energy_error(comp["energy"], eager["energy"].double())
        f_err = force_error(comp["forces"], eager["forces"].double())
        assert e_err <= tol["energy"], (name, e_err)
        assert f_err <= tol["force"], (name, f_err)
        assert set(comp_grads) == set(eager_grads), name
        assert bool(eager_grads) == compiled_run["training"]
        for key, g in eager_grads.items():
            assert rel_l2(comp_grads[key], g) <= tol["grad_rel"], (name, key)


def test_one_graph_for_every_size(compiled_run):
    """Four atom counts and edge counts, one compiled graph (no recompile), and no graph break but
    the eager ``prepare``."""
    assert compiled_run["graph_breaks"] == []
    assert compiled_run["unique_graphs"] == 1


@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_no_graph_break_inside_blocks(backend):
    """Dynamo captures the whole compiled region as one graph, backend choices included, with the
    fused ops in it as scn_fast custom ops (traced only: no Inductor)."""
    model = make_model(backend)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(batch("pt_bulk"))
    reasons = [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1
    code = explained.graphs[0].code
    for op in FUSED_OPS:
        assert (f"scn_fast.{op}" in code) == (backend != "reference"), op
    if backend != "reference":
        assert all(model.explain()[op]["ran"] == backend for op in EDGE_OPS)


def test_triton_compiled_matches_eager():
    """Triton's kernels (run by its CPU interpreter here) inside the compiled graph, which has no
    break but the eager ``prepare``."""
    model = make_model("triton")
    data = batch("pt_bulk")
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        eager = model(data)
        comp = torch.compile(model)(data)
    assert all(model.explain()[op]["ran"] == "triton" for op in EDGE_OPS)
    assert graph_breaks() == []
    assert counters["stats"]["unique_graphs"] == 1
    assert energy_error(comp["energy"], eager["energy"].double()) <= TOL["compile"]["energy"]
    assert force_error(comp["forces"], eager["forces"].double()) <= TOL["compile"]["force"]
