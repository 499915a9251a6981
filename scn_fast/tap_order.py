"""fc1_edge_proj's weight held in tap order by the fused model, and conversions to upstream's layout.

With 4 taps (mmax = 1) the fused message path multiplies two column blocks of fc1_edge_proj's weight:
W0, the columns of the m = 0 rows of both sides, and W1, those of the m = +-1 rows
(``scn_fast.ops.tap_projection``). In upstream's column order those rows interleave (per side at
L = 6: m = 0 at rows 0, 2, 5, ...; m = +-1 at 1, 3-4, 6-7, ...), so each GEMM would be split into
28 thin ones or the 20 MB weight copied twice per step. The fused model therefore holds that weight
with its columns in tap order ([W0 | W1], :func:`~scn_fast.ops.tap_projection.to_tap_order`): the
GEMMs read the two blocks in place and write the weight gradient in place.

What stays upstream's:

* ``state_dict()`` and ``load_state_dict()`` (and so checkpoints, fairchem's included) carry the
  weight in upstream's order; :class:`TapOrderedLinear` converts on the way in and out.
* Calling the layer (``fc1_edge_proj(x)``, the reference path) computes upstream's map.
* Initialisation: upstream's init, then permuted, so the same seed gives the same numbers.

What is in tap order: the Parameter itself, its ``.grad``, and per-parameter state that optimizers
and EMAs keep (elementwise, so training is unchanged). Code that moves such state between models
converts it: :func:`to_upstream_layout` / :func:`to_model_layout` per parameter name, and
:func:`optimizer_state_to_upstream` / :func:`optimizer_state_to_model` for a ``torch.optim``
state dict; ``scn_fast.train`` and ``scn_fast.checkpoint`` write and read upstream's layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .ops.tap_projection import from_tap_order, to_tap_order
from .precision import Linear, low_precision_linear


class TapOrderedLinear(Linear):
    """A :class:`~scn_fast.precision.Linear` (in_features = 2RC) whose weight columns are held in tap
    order for resolution (lmax, mmax, num_taps); state_dict, load_state_dict and calls behave as
    upstream's ``nn.Linear`` (module doc)."""

    def __init__(
        self, in_features: int, out_features: int, lmax: int, mmax: int, num_taps: int
    ) -> None:
        super().__init__(in_features, out_features)
        self.tap_layout = (lmax, mmax, num_taps)
        with torch.no_grad():
            self.weight.copy_(self.to_tap(self.weight))

    def to_tap(self, t: torch.Tensor) -> torch.Tensor:
        """A (out, in) tensor in upstream's column order -> tap order (a copy)."""
        return to_tap_order(t, *self.tap_layout)

    def to_upstream(self, t: torch.Tensor) -> torch.Tensor:
        """A (out, in) tensor in tap order -> upstream's column order (a copy; differentiable)."""
        return from_tap_order(t, *self.tap_layout)

    def upstream_weight(self) -> torch.Tensor:
        """The weight in upstream's column order (a differentiable copy)."""
        return self.to_upstream(self.weight)

    def matmul(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, keep_bf16: bool = False
    ) -> torch.Tensor:
        """Upstream's ``x W^T (+ bias)`` for x in upstream's column order (the reference path)."""
        w = self.upstream_weight()
        if self.precision == "fp32":
            return F.linear(x, w, bias)
        return low_precision_linear(x, w, bias, self.precision, self.precision_native, keep_bf16)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        if key in destination:
            w = self.upstream_weight()
            destination[key] = w if keep_vars else w.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        w = state_dict.get(key)
        if isinstance(w, torch.Tensor) and w.shape == self.weight.shape:
            state_dict = dict(state_dict)  # never change the caller's dict
            state_dict[key] = self.to_tap(w)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        lmax, mmax, _ = self.tap_layout
        return f"{super().extra_repr()}, columns in tap order (lmax={lmax}, mmax={mmax})"


def tap_ordered_parameters(model: nn.Module) -> dict[str, TapOrderedLinear]:
    """{parameter name: its layer} for every weight held in tap order (DDP wrappers unwrapped)."""
    model = getattr(model, "module", model)
    return {
        f"{name}.weight" if name else "weight": m
        for name, m in model.named_modules()
        if isinstance(m, TapOrderedLinear)
    }


def to_upstream_layout(model: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """``t``, shaped like parameter ``name`` of ``model`` (its value, gradient or optimizer state),
    in upstream's layout: converted for tap-ordered weights, else ``t`` itself."""
    layer = tap_ordered_parameters(model).get(name)
    return t if layer is None else layer.to_upstream(t)


def to_model_layout(model: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_upstream_layout`."""
    layer = tap_ordered_parameters(model).get(name)
    return t if layer is None else layer.to_tap(t)


def _names(model: nn.Module, trainable_only: bool) -> list[str]:
    model = getattr(model, "module", model)
    return [n for n, p in model.named_parameters() if p.requires_grad or not trainable_only]


def params_to_upstream(
    model: nn.Module, tensors: Sequence[torch.Tensor], trainable_only: bool = True
) -> list[torch.Tensor]:
    """Tensors in ``model.parameters()`` order (only those requiring grad when ``trainable_only``:
    an EMA's shadow parameters) -> upstream's layout."""
    names = _names(model, trainable_only)
    if len(names) != len(tensors):
        raise ValueError(f"{len(tensors)} tensors for {len(names)} parameters")
    return [to_upstream_layout(model, n, t) for n, t in zip(names, tensors, strict=True)]


def params_to_model(
    model: nn.Module, tensors: Sequence[torch.Tensor], trainable_only: bool = True
) -> list[torch.Tensor]:
    """The inverse of :func:`params_to_upstream`."""
    names = _names(model, trainable_only)
    if len(names) != len(tensors):
        raise ValueError(f"{len(tensors)} tensors for {len(names)} parameters")
    return [to_model_layout(model, n, t) for n, t in zip(names, tensors, strict=True)]


def _optimizer_state(model: nn.Module, state: Mapping[str, Any], convert) -> dict[str, Any]:
    names = _names(model, trainable_only=False)
    layers = tap_ordered_parameters(model)
    out = {"state": dict(state["state"]), "param_groups": state["param_groups"]}
    for index, entry in state["state"].items():
        name = names[index] if isinstance(index, int) and index < len(names) else None
        if name in layers:
            shape = getattr(model, "module", model).get_parameter(name).shape
            out["state"][index] = {
                k: convert(layers[name], v)
                if isinstance(v, torch.Tensor) and v.shape == shape
                else v
                for k, v in entry.items()
            }
    return out


def optimizer_state_to_upstream(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """A ``torch.optim`` state dict of an optimizer built on ``list(model.parameters())`` with
    every per-parameter tensor (Adam's moments, ...) in upstream's layout (a shallow copy)."""
    return _optimizer_state(model, state, lambda layer, t: layer.to_upstream(t))


def optimizer_state_to_model(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_to_upstream`."""
    return _optimizer_state(model, state, lambda layer, t: layer.to_tap(t))
