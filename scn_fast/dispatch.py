"""Choosing an implementation per fused op, and saying why the others were refused.

Each implementation declares what it supports through ``refusal(request)``: ``None`` when it can run
the request, else the reason it cannot. The dispatcher walks the backends in priority order, runs the
first that accepts (``backend="auto"``) or the one named (raising with the reasons if it refuses), and
remembers, per op, what ran last and why the others did not: ``explain()``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

BACKENDS = ("reference", "triton", "extension")
BACKEND_CHOICES = ("auto", *BACKENDS)
OPS = ("edge_rotation", "scatter_aggregation", "grid_projection", "output_heads")
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


@dataclass
class Implementation:
    """One backend of one op: ``refusal(request)`` is None when it supports the request.

    ``implemented=False`` marks a backend that has no code for the op in this version: an explicit
    request for that backend then runs the op on the reference (and says so) instead of raising.
    """

    op: str
    backend: str
    refusal: Callable[[OpRequest], str | None]
    implemented: bool = True


def _reference_refusal(request: OpRequest) -> str | None:
    return None


def _not_built(request: OpRequest) -> str | None:
    return f"no fused kernel for {request.op} in this version of scn_fast (not implemented yet)"


_REGISTRY: dict[str, dict[str, Implementation]] = {
    op: {
        "reference": Implementation(op, "reference", _reference_refusal),
        "triton": Implementation(op, "triton", _not_built, implemented=False),
        "extension": Implementation(op, "extension", _not_built, implemented=False),
    }
    for op in OPS
}


def register(impl: Implementation) -> None:
    """Add or replace the implementation of ``impl.backend`` for ``impl.op``."""
    if impl.op not in OPS or impl.backend not in BACKENDS:
        raise ValueError(f"unknown op/backend {impl.op!r}/{impl.backend!r}")
    _REGISTRY[impl.op][impl.backend] = impl


@torch.compiler.disable(
    reason="scn_fast: a backend choice that was not planned before the compiled region"
)
def _choose_eagerly(dispatcher: Dispatcher, request: OpRequest) -> str:
    return dispatcher.choose(request)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run a request; the message lists the reasons."""


@dataclass
class Dispatcher:
    """Picks a backend per op call and records the choice.

    use_fused=False always runs the reference. backend: "auto" (the first fused backend that accepts,
    else the reference) or an explicit name; the environment variable SCN_FAST_BACKEND overrides it.
    """

    use_fused: bool = False
    backend: str = "auto"
    _last: dict[str, dict] = field(default_factory=dict)
    _decided: dict[OpRequest, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {self.backend!r}")

    @property
    def effective_backend(self) -> str:
        env = os.environ.get(ENV_BACKEND)
        if env:
            if env not in BACKEND_CHOICES:
                raise ValueError(f"{ENV_BACKEND}={env!r} is not one of {BACKEND_CHOICES}")
            return env
        return self.backend

    def choose(self, request: OpRequest) -> str:
        """The backend to run ``request`` with; records what ran and why the others were refused.

        Inside a ``torch.compile`` trace it returns the decision taken eagerly for the same request
        (the model plans every request of a forward before its compiled region), with no side
        effect, so choosing never breaks the graph."""
        if torch.compiler.is_compiling():
            if request in self._decided:
                return self._decided[request]
            return _choose_eagerly(self, request)
        impls = _REGISTRY[request.op]
        refused: dict[str, str] = {}
        wanted = self.effective_backend
        if not self.use_fused:
            order = ["reference"]
            refused = {b: "use_fused=False" for b in BACKENDS if b != "reference"}
        elif wanted == "auto":
            order = list(AUTO_ORDER.get(request.device.type, ("extension", "triton", "reference")))
            if request.device.type == "cpu":
                refused["triton"] = AUTO_SKIPS_INTERPRETER
                order.remove("triton")
        elif impls[wanted].implemented:
            order = [wanted]
        else:
            order = [wanted, "reference"]
        chosen = None
        for name in order:
            reason = impls[name].refusal(request)
            if reason is None and chosen is None:
                chosen = name
            elif reason is not None:
                refused[name] = reason
        if chosen is None:
            raise BackendUnavailableError(
                f"backend {wanted!r} cannot run {request.op}: "
                + "; ".join(f"{k}: {v}" for k, v in refused.items())
            )
        if self.use_fused and wanted != "auto":
            for b in BACKENDS:
                if b != chosen and b not in refused:
                    refused[b] = f"backend={wanted!r} was requested"
        if chosen in refused:
            del refused[chosen]
        self._last[request.op] = {"ran": chosen, "refused": dict(sorted(refused.items()))}
        self._decided[request] = chosen
        return chosen

    def fall_back(self, op: str, why: str) -> str:
        """Override the last choice for ``op`` with the reference, recording ``why`` (no record
        inside a torch.compile trace: the eager plan recorded it)."""
        if torch.compiler.is_compiling():
            return "reference"
        rec = self._last[op]
        if rec["ran"] != "reference":
            rec["refused"] = dict(sorted({**rec["refused"], rec["ran"]: why}.items()))
            rec["ran"] = "reference"
        return "reference"

    def explain(self) -> dict[str, dict]:
        """{op: {"ran": backend or None, "refused": {backend: reason}}} for the last forward/backward."""
        out = {}
        for op in OPS:
            rec = self._last.get(op)
            out[op] = (
                {"ran": rec["ran"], "refused": dict(rec["refused"])}
                if rec
                else {"ran": None, "refused": {}}
            )
        return out
