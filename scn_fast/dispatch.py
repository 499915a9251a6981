"""Choosing a backend per fused op from the declared support (``scn_fast.ops.support``).

``Dispatcher.choose(request)`` walks the backends in priority order (``backend="auto"``) or takes
the one named (raising :class:`BackendUnavailableError` with the reasons when it refuses) and says
why the others were not taken. The model does not call it op by op: ``scn_fast.planning`` asks it once
per op when it builds a forward's plan, and ``explain()`` reports that plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .ops.support import refusal

BACKENDS = ("reference", "triton", "extension")
BACKEND_CHOICES = ("auto", *BACKENDS)
OPS = (
    "edge_rotation",
    "scatter_aggregation",
    "gated_tap_projection",
    "tap_combine",
    "grid_projection",
    "output_heads",
)
ENV_BACKEND = "SCN_FAST_BACKEND"
# backend="auto" tries these in order, per device type.
AUTO_ORDER = {
    "cuda": ("triton", "extension", "reference"),
    "cpu": ("extension", "triton", "reference"),
}
AUTO_SKIPS_INTERPRETER = (
    "on CPU Triton runs only in its interpreter, a testing tool: backend='auto' never picks it"
)


@dataclass(frozen=True)
class OpRequest:
    """What an op call needs: device, dtype and the shape parameters implementations may restrict."""

    op: str
    device: torch.device
    dtype: torch.dtype
    lmax: int
    mmax: int
    num_taps: int
    channels: int


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run a request; the message lists the reasons."""


def check_backend(backend: str) -> str:
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    return backend


@dataclass
class Dispatcher:
    """Picks a backend per op from the declared support.

    use_fused=False always runs the reference. backend: "auto" (the first fused backend that accepts,
    else the reference) or an explicit name; the environment variable SCN_FAST_BACKEND overrides it.
    ``plan``: the last plan built for this dispatcher's model (``scn_fast.planning``), what ``explain``
    reports; ``plans``: the plans built so far, by their request (a model's scratch of decisions).
    """

    use_fused: bool = False
    backend: str = "auto"
    plan: object | None = None
    plans: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_backend(self.backend)

    @property
    def effective_backend(self) -> str:
        env = os.environ.get(ENV_BACKEND)
        if env:
            if env not in BACKEND_CHOICES:
                raise ValueError(f"{ENV_BACKEND}={env!r} is not one of {BACKEND_CHOICES}")
            return env
        return self.backend

    def decide(self, request: OpRequest) -> tuple[str, dict[str, str]]:
        """(backend, {refused backend: reason}) for ``request``; raises BackendUnavailableError when
        an explicitly requested backend refuses it."""
        wanted = self.effective_backend
        dev = torch.device(request.device).type
        args = (dev, request.dtype, request.lmax, request.mmax)
        refused: dict[str, str] = {}
        if not self.use_fused:
            return "reference", {b: "use_fused=False" for b in BACKENDS if b != "reference"}
        if wanted == "auto":
            order = list(AUTO_ORDER.get(dev, ("extension", "triton", "reference")))
            if dev == "cpu":
                refused["triton"] = AUTO_SKIPS_INTERPRETER
                order.remove("triton")
        else:
            order = [wanted]
        chosen = None
        for name in order:
            reason = refusal(request.op, name, *args)
            if reason is None and chosen is None:
                chosen = name
            elif reason is not None:
                refused[name] = reason
        if chosen is None:
            raise BackendUnavailableError(
                f"backend {wanted!r} cannot run {request.op}: "
                + "; ".join(f"{k}: {v}" for k, v in refused.items())
            )
        if wanted != "auto":
            for b in BACKENDS:
                if b != chosen and b not in refused:
                    refused[b] = f"backend={wanted!r} was requested"
        refused.pop(chosen, None)
        return chosen, dict(sorted(refused.items()))

    def choose(self, request: OpRequest) -> str:
        """The backend that runs ``request`` (see :meth:`decide`)."""
        return self.decide(request)[0]

    def explain(self) -> dict[str, dict]:
        """{op: {"ran": backend or None, "variant": {...}, "refused": {backend: reason}}} of the
        last plan (every op of ``OPS``; "ran" None before the first forward)."""
        if self.plan is None:
            return {op: {"ran": None, "variant": {}, "refused": {}} for op in OPS}
        return self.plan.explain()
