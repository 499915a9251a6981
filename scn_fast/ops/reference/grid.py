"""Upstream's ToGrid / FromGrid and the grid MLP of an EdgeBlock: the ``reference`` backend of
``grid_projection``.

    out = FromGrid(fc3(silu(fc2(silu(fc1([ToGrid(x_down) | ToGrid(x_new)]))))))

x_down, x_new (N, S, C) -> (N, S, C3); ToGrid gives (N * res_beta * res_alpha, bands * C).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ... import so3


class Grid:
    """ToGrid / FromGrid of upstream for one lmax and band count, constants kept in float64."""

    def __init__(self, lmax: int, num_bands: int) -> None:
        self.lmax, self.num_bands = lmax, num_bands
        self.sphere_basis = (lmax + 1) ** 2
        self.mats = so3.grid_matrices(lmax, num_bands)
        self._cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _mats(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (like.dtype, like.device)
        m = self.mats
        return so3.cached_constant(
            self._cache,
            key,
            lambda: tuple(
                t.to(dtype=like.dtype, device=like.device)
                for t in (m.to_grid_shb, m.to_grid_sha, m.from_grid_sha, m.from_grid_shb)
            ),
        )

    def to_grid(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        """x (N, S, C) -> grid values (N * res_beta * res_alpha, bands * C)."""
        shb, sha, _, _ = self._mats(x)
        x = x.view(-1, self.sphere_basis, channels)
        g = torch.einsum("mbi,zic->zbmc", shb, x)
        g = torch.einsum("am,zbmc->zbac", sha, g).contiguous()
        return g.view(-1, self.num_bands * channels)

    def from_grid(self, g: torch.Tensor, channels: int) -> torch.Tensor:
        """grid values (N * res_beta * res_alpha, C) -> coefficients (N * S, C)."""
        _, _, sha, shb = self._mats(g)
        g = g.view(-1, self.mats.res_beta, self.mats.res_alpha, channels)
        x = torch.einsum("am,zbac->zbmc", sha, g)
        x = torch.einsum("mbi,zbmc->zic", shb, x).contiguous()
        return x.view(-1, channels)


Layer = Callable[[torch.Tensor], torch.Tensor]


def grid_mlp(
    grid: Grid,
    x_down: torch.Tensor,
    x_new: torch.Tensor,
    fc1: Layer,
    fc2: Layer,
    fc3: Layer,
    act: Layer,
) -> torch.Tensor:
    """Upstream's grid MLP (module doc) -> (N, S, C3)."""
    n, s, c = x_down.shape
    g = torch.cat([grid.to_grid(x_down, c), grid.to_grid(x_new, c)], dim=1)
    g = act(fc1(g))
    g = act(fc2(g))
    g = fc3(g)
    return grid.from_grid(g, g.shape[1]).view(n, s, g.shape[1])
