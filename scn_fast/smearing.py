"""Distance expansions (radial bases) of SCN: Gaussian, sigmoid, linear+sigmoid and learned SiLU.

Each maps distances d (E,) to a basis (E, K). State-dict entries (``offset`` buffer, or ``fc1`` for
SiLU) and their values match upstream, so checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def _offsets(start: float, stop: float, num: int) -> torch.Tensor:
    """Float32 centres ``linspace(start, stop, num)``; coefficients derive from their float32 spacing."""
    if num < 2:
        raise ValueError(f"a distance basis needs at least 2 functions, got {num}")
    return torch.linspace(start, stop, num, dtype=torch.float32, device="cpu")


def _on_default_device(t: torch.Tensor) -> torch.Tensor:
    """t moved to the current default device (so ``with torch.device("meta")`` construction works)."""
    return t.to(torch.empty(0).device)


class GaussianSmearing(nn.Module):
    """exp(coeff * (d - mu_k)^2) with coeff = -1 / (2 (width * spacing)^2)."""

    def __init__(self, start: float, stop: float, num: int, width: float = 1.0) -> None:
        super().__init__()
        offset = _offsets(start, stop, num)
        self.num_output = num
        # width * spacing is rounded to float32 before squaring, as upstream does.
        self.coeff = -0.5 / (width * (offset[1] - offset[0])).item() ** 2
        self.register_buffer("offset", _on_default_device(offset))

    def forward(self, dist: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.coeff * (dist.view(-1, 1) - self.offset.view(1, -1)) ** 2)


class SigmoidSmearing(nn.Module):
    """sigmoid(coeff * (d - mu_k)) with coeff = width / spacing."""

    def __init__(self, start: float, stop: float, num: int, width: float = 1.0) -> None:
        super().__init__()
        offset = _offsets(start, stop, num)
        self.num_output = num
        self.coeff = (width / (offset[1] - offset[0])).item()  # a float32 quotient, as upstream
        self.register_buffer("offset", _on_default_device(offset))

    def forward(self, dist: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.coeff * (dist.view(-1, 1) - self.offset.view(1, -1)))


class LinearSigmoidSmearing(SigmoidSmearing):
    """sigmoid(z) + 0.001 z with z = coeff * (d - mu_k)."""

    def forward(self, dist: torch.Tensor) -> torch.Tensor:
        z = self.coeff * (dist.view(-1, 1) - self.offset.view(1, -1))
        return torch.sigmoid(z) + 0.001 * z


class SiLUSmearing(nn.Module):
    """silu(fc1([d, 1])): a learned basis (``start``/``stop``/``width`` unused, as upstream)."""

    def __init__(self, start: float, stop: float, num: int, width: float = 1.0) -> None:
        super().__init__()
        self.num_output = num
        self.fc1 = nn.Linear(2, num)
        self.act = nn.SiLU()

    def forward(self, dist: torch.Tensor) -> torch.Tensor:
        d = dist.view(-1, 1)
        return self.act(self.fc1(torch.cat([d, torch.ones_like(d)], dim=1)))


DISTANCE_FUNCTIONS: dict[str, type[nn.Module]] = {
    "gaussian": GaussianSmearing,
    "sigmoid": SigmoidSmearing,
    "linearsigmoid": LinearSigmoidSmearing,
    "silu": SiLUSmearing,
}


def make_distance_expansion(name: str, cutoff: float, num: int, width: float) -> nn.Module:
    """The basis ``name`` with ``num`` functions over [0, cutoff]."""
    if name not in DISTANCE_FUNCTIONS:
        raise ValueError(
            f"distance_function must be one of {sorted(DISTANCE_FUNCTIONS)}, got {name!r}"
        )
    return DISTANCE_FUNCTIONS[name](0.0, cutoff, num, width)
