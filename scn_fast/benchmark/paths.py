"""The compared paths and their steps.

A path is a way to run the same model with the same weights: ``reference`` (``use_fused=False``, plain
PyTorch, upstream's algorithm), a fused backend by name (``use_fused=True, backend=name``), or
``reference+compile`` (``torch.compile`` of the reference model). Each is built at one precision.

Steps (``mode``):

* ``inference``: ``model(data)`` under ``torch.no_grad()``.
* ``training``: gradients zeroed in place (so they count as held memory, not activations), forward,
  loss = energy MAE + force L2 (mean over atoms of |F|) against zero targets, backward w.r.t. the
  parameters (positions do not require grad: SCN predicts forces directly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..dispatch import BACKENDS, BackendUnavailableError, Dispatcher, OpRequest

COMPILE = "reference+compile"
EDGE_OPS = ("edge_rotation", "scatter_aggregation")


@dataclass(frozen=True)
class PathSpec:
    """``name`` (record's backend), ``kind`` (reference | fused | compile), ``precision``."""

    name: str
    kind: str
    precision: str

    @property
    def requested_backend(self) -> str:
        return self.name if self.kind == "fused" else "reference"


def path_spec(name: str, precision: str) -> PathSpec:
    """The spec of path ``name`` ("reference", a fused backend name, or "reference+compile")."""
    if name == "reference":
        return PathSpec(name, "reference", precision)
    if name == COMPILE:
        return PathSpec(name, "compile", precision)
    if name in BACKENDS:
        return PathSpec(name, "fused", precision)
    raise ValueError(f"unknown path {name!r}: reference, {COMPILE}, or one of {BACKENDS}")


def fused_backends() -> tuple[str, ...]:
    """Every fused backend name the dispatcher knows (its registry, minus the reference)."""
    from .. import ops  # noqa: F401  (registers the fused implementations)

    return tuple(b for b in BACKENDS if b != "reference")


def backend_refusal(backend: str, device: torch.device | str) -> str | None:
    """Why the dispatcher would refuse ``backend`` for the edge ops on ``device`` (float32, the OC20
    shapes), or None if it accepts it."""
    from .. import ops  # noqa: F401

    if backend == "triton" and torch.device(device).type != "cuda":
        return (
            "Triton runs on CUDA devices; its CPU interpreter (TRITON_INTERPRET=1) is a testing "
            "tool and is never benchmarked"
        )
    dispatcher = Dispatcher(use_fused=True, backend=backend)
    for op in EDGE_OPS:
        try:
            dispatcher.choose(OpRequest(op, torch.device(device), torch.float32, 6, 1, 4, 128))
        except BackendUnavailableError as exc:
            return str(exc)
    return None


def loss_of(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Energy MAE + force L2 against zero targets."""
    loss = out["energy"].abs().mean()
    if "forces" in out:
        loss = loss + out["forces"].norm(dim=-1).mean()
    return loss


def _detached(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in out.items()}


def make_step(
    model: Callable[[Any], dict],
    params: list[nn.Parameter],
    mode: str,
    data: Any,
    zero_grads: str = "set_to_none",
) -> Callable[[], dict[str, torch.Tensor]]:
    """A zero-argument callable running one ``mode`` step of ``model`` on ``data``; returns outputs.

    A training step first clears the parameters' gradients, then runs forward and backward (no
    optimizer step). ``zero_grads``: "set_to_none" drops them, as ``torch.optim.Optimizer.zero_grad()``
    and ``nn.Module.zero_grad()`` do by default (what a training loop runs: the backward's gradients
    become ``.grad``; used for timing); "in_place" zeroes them where they lie and the backward adds into
    them, so the gradients stay allocated across the step (used for activation memory, which
    docs/measurement.md measures above the weights and gradients held before the step)."""
    if zero_grads not in ("set_to_none", "in_place"):
        raise ValueError(f"zero_grads must be 'set_to_none' or 'in_place', got {zero_grads!r}")
    if mode == "inference":

        def inference() -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return model(data)

        return inference
    if mode == "training":
        in_place = zero_grads == "in_place"

        def training() -> dict[str, torch.Tensor]:
            for p in params:
                if not in_place:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()
            out = model(data)
            loss_of(out).backward()
            return _detached(out)

        return training
    raise ValueError(f"unknown mode {mode!r}: inference or training")


def _ran(entry: Any) -> Any:
    """What ran according to one entry of ``model.explain()``: its "ran" field (a backend name), or
    the entry itself when it is not a dict."""
    return entry.get("ran") if isinstance(entry, dict) else entry


def edge_backends_ran(explain: dict[str, Any]) -> dict[str, Any]:
    """What ran for each edge op according to ``model.explain()``.

    Read loosely, so that a changed report layout does not fail every fused record: the edge ops
    that the report names; when it names none of them, every entry that says what ran (other than
    ``gemm_precision``, which names a precision mode, not a backend)."""
    named = {op: _ran(explain[op]) for op in EDGE_OPS if op in explain}
    if named:
        return named
    return {
        op: _ran(v)
        for op, v in explain.items()
        if op != "gemm_precision" and isinstance(v, dict) and "ran" in v
    }


def backend_mismatch(spec: PathSpec, explain: dict[str, Any]) -> str | None:
    """Why ``explain`` shows that ``spec``'s backend did not run its edge ops, or None."""
    want = spec.name if spec.kind == "fused" else "reference"
    ran = edge_backends_ran(explain)
    if not ran:
        return f"model.explain() reports no op that ran, so backend {want!r} cannot be confirmed"
    wrong = {op: b for op, b in ran.items() if b != want}
    if not wrong:
        return None

    def refusal(op: str) -> Any:
        entry = explain.get(op)
        refused = entry.get("refused") if isinstance(entry, dict) else None
        return refused.get(want) if isinstance(refused, dict) else None

    detail = "; ".join(
        f"{op} ran {b!r}" + (f" ({refusal(op)})" if refusal(op) else "") for op, b in wrong.items()
    )
    return f"requested backend {want!r} did not run: {detail}"
