"""Edge frames: a 3x3 rotation per edge whose second row is the edge direction.

The roll of each frame about its edge is free. Upstream fixes it with a random vector per edge (one
``torch.rand_like`` over the (E, 3) edge vectors, its only RNG draw in a forward); ``deterministic``
frames take a vector that is a pure function of the edge direction instead.
"""

from __future__ import annotations

import torch


def _roll_vectors_random(edge_vec: torch.Tensor) -> torch.Tensor:
    """(E, 3) draws in float32 from the global RNG (as upstream draws them), cast to edge_vec's dtype."""
    draw = torch.rand(edge_vec.shape, dtype=torch.float32, device=edge_vec.device)
    return draw.to(edge_vec.dtype) - 0.5


def _roll_vectors_deterministic(direction: torch.Tensor) -> torch.Tensor:
    """(E, 3): the unit axis least aligned with each direction (first one on ties).

    Exact selection (an argmin over |components|, no arithmetic), so identical on every device,
    batch order, process and under torch.compile.
    """
    axis = direction.abs().argmin(dim=1)
    return torch.nn.functional.one_hot(axis, 3).to(direction.dtype)


def edge_frames(edge_vec: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
    """Rotation matrices (E, 3, 3), detached, for edge vectors edge_vec (E, 3).

    With x = edge_vec / |edge_vec| and v a roll vector (random or deterministic, normalised, then
    replaced by one of two 90-degree-rotated copies when those are less aligned with x):
    z = normalise(x cross v), y = -normalise(x cross z); the frame's rows are (z, x, y).
    """
    edge_vec = edge_vec.detach()
    if edge_vec.shape[0] == 0:
        return edge_vec.new_zeros((0, 3, 3))
    dist = torch.sqrt(torch.sum(edge_vec**2, dim=1))
    norm_x = edge_vec / dist.view(-1, 1)
    v = _roll_vectors_deterministic(norm_x) if deterministic else _roll_vectors_random(edge_vec)
    v = v / torch.sqrt(torch.sum(v**2, dim=1)).view(-1, 1)

    # Two copies rotated by 90 degrees (about z, about x); keep the least aligned of the three.
    v_b = torch.stack([-v[:, 1], v[:, 0], v[:, 2]], dim=1)
    v_c = torch.stack([v[:, 0], -v[:, 2], v[:, 1]], dim=1)

    def alignment(u: torch.Tensor) -> torch.Tensor:
        return torch.abs(torch.sum(u * norm_x, dim=1)).view(-1, 1)

    v = torch.where(torch.gt(alignment(v), alignment(v_b)), v_b, v)
    v = torch.where(torch.gt(alignment(v), alignment(v_c)), v_c, v)
    if bool((alignment(v) >= 0.99).any()):
        raise RuntimeError("edge frame construction failed: roll vector aligned with an edge")

    norm_z = torch.cross(norm_x, v, dim=1)
    norm_z = norm_z / torch.sqrt(torch.sum(norm_z**2, dim=1, keepdim=True))
    norm_z = norm_z / torch.sqrt(torch.sum(norm_z**2, dim=1)).view(-1, 1)
    norm_y = torch.cross(norm_x, norm_z, dim=1)
    norm_y = norm_y / torch.sqrt(torch.sum(norm_y**2, dim=1, keepdim=True))
    return torch.stack([norm_z, norm_x, -norm_y], dim=1)
