"""Upstream's energy and force heads on sphere samples: the ``reference`` backend of
``output_heads``.

    y_zp = sum_s sh[p, s] x[z, s]                       (P sample points, sh (P, S))
    energy[z] = (1/P) sum_p e(y_zp),  forces[z] = (1/P) sum_p f(y_zp) pts[p]

e and f 3-layer MLPs with SiLU; x (N, S, C) -> node energies (N,), forces (N, 3) or None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn import functional as F

Layer = Callable[[torch.Tensor], torch.Tensor]


def heads(
    x: torch.Tensor,
    sh: torch.Tensor,
    pts: torch.Tensor,
    energy: Sequence[Layer],
    forces: Sequence[Layer] | None,
    act: Layer = F.silu,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(node energies (N,), forces (N, 3) or None) of x (N, S, C) (module doc)."""
    p, c = sh.shape[0], x.shape[2]
    on_sphere = torch.einsum("abc,pb->apc", x, sh).contiguous().view(-1, c)

    def mlp(layers: Sequence[Layer]) -> torch.Tensor:
        h = act(layers[0](on_sphere))
        h = act(layers[1](h))
        return layers[2](h).view(-1, p, 1)

    node_energy = (torch.sum(mlp(energy), dim=1) / p).view(-1)
    if forces is None:
        return node_energy, None
    return node_energy, torch.sum(mlp(forces) * pts.view(1, p, 3), dim=1) / p
