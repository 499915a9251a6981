"""The models of one benchmark point: each path's model built once, with the float32 reference's
weights (its state_dict), at the path's precision, with deterministic frames."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..model import SphericalChannelNetwork
from ..presets import preset
from ..tap_order import to_upstream_layout
from .paths import PathSpec, path_spec


def new_model(
    preset_name: str, *, fused: bool, backend: str, precision: str
) -> SphericalChannelNetwork:
    return SphericalChannelNetwork(
        **preset(preset_name),
        use_fused=fused,
        backend=backend,
        precision=precision,
        deterministic_frames=True,
    )


@dataclass
class Entry:
    """A built path: ``call`` runs it, ``module`` is the scn model behind it (for explain/params)."""

    call: Callable[[Any], dict[str, torch.Tensor]]
    module: SphericalChannelNetwork
    requested_backend: str
    note: str | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.module.parameters())


class Models:
    """Builds each path's model once (same weights as the float32 reference) and keeps it."""

    def __init__(self, preset_name: str, reference: SphericalChannelNetwork, device: torch.device):
        self.preset, self.device = preset_name, device
        self.state = reference.state_dict()
        self.built: dict[tuple[str, str], Entry | BaseException] = {
            ("reference", "fp32"): Entry(reference, reference, "reference")
        }

    def _load(self, model: SphericalChannelNetwork) -> SphericalChannelNetwork:
        model.load_state_dict(self.state)
        return model.to(self.device)

    def get(self, spec: PathSpec, *, backend: str | None = None) -> Entry:
        key = (spec.name if backend is None else f"{spec.name}@{backend}", spec.precision)
        if key not in self.built:
            try:
                self.built[key] = self._build(spec, backend)
            except Exception as exc:
                self.built[key] = exc.with_traceback(None)  # frames would pin tensors
        got = self.built[key]
        if isinstance(got, BaseException):
            raise got
        return got

    def _build(self, spec: PathSpec, backend: str | None) -> Entry:
        if spec.kind == "reference":
            m = new_model(self.preset, fused=False, backend="auto", precision=spec.precision)
            m = self._load(m)
            return Entry(m, m, "reference")
        if spec.kind == "compile":
            base = self.get(path_spec("reference", spec.precision)).module
            return Entry(torch.compile(base), base, "reference")
        want = backend or spec.name
        m = new_model(self.preset, fused=True, backend=want, precision=spec.precision)
        m = self._load(m)
        return Entry(m, m, want)

    def replace(self, spec: PathSpec, entry: Entry | BaseException) -> None:
        """Use ``entry`` (or raise this error) for ``spec`` from now on; its old model is released."""
        self.built[(spec.name, spec.precision)] = entry
        self.built.pop((f"{spec.name}@auto", spec.precision), None)


def grads_of(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """Parameter gradients by name, in upstream's layout (comparable across paths)."""
    return {
        n: None if p.grad is None else to_upstream_layout(module, n, p.grad)
        for n, p in module.named_parameters()
    }
