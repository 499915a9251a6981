"""Upstream's message block with dense rotations: the ``reference`` backend of the message path.

Per edge e and tap t, with W_{e,t} the dense (R, S_L) rotation rows of tap t:

    a_{e,t} = [W_{e,t} x[src e] | W_{e,t} x[tgt e]]                     (R*C' each side)
    m_{e,t} = silu(fc2_edge(silu(fc1_edge(silu(fc1_edge_proj(a_{e,t})) * silu(fc1_dist(x_edge_e))))))
    msg_e   = W_{e,0}^T  sum_t mapping_t^T m_{e,t}                      (S_L, C')

x (N, S_L, C'), x_edge (E, K), edge_index (2, E), wigner (E*T, R, S_L) edge-major,
wigner_inv (E, S_L, R) -> msg (E, S_L, C'). The layers are called as modules (their own precision).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ... import so3


class MessageLayers(Protocol):
    """The layers of one message block (upstream's names)."""

    act: nn.Module
    hidden_channels: int
    sphere_channels_reduce: int
    fc1_dist: nn.Module
    fc1_edge_proj: nn.Module
    fc1_edge: nn.Module
    fc2_edge: nn.Module


def tap_wigner(
    frames: torch.Tensor, lmax: int, mmax: int, angles: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotations for edge frames (E, 3, 3): wigner (E*T, R, S_L) per (edge, tap), edge-major, and
    wigner_inv (E, S_L, R), the transpose of tap 0's (tap t: the frame turned by angles[t] about y)."""
    e = frames.shape[0]
    r, s = so3.sphere_basis_reduce(lmax, mmax), (lmax + 1) ** 2
    per_tap = []
    for angle in angles:
        y_rot = so3.y_rotation_matrix(angle).to(dtype=frames.dtype, device=frames.device)
        blocks = so3.wigner_d_blocks(y_rot @ frames, lmax)
        w = frames.new_zeros((e, r, s))
        row = 0
        for l, block in enumerate(blocks):
            mm = min(l, mmax)
            w[:, row : row + 2 * mm + 1, l * l : (l + 1) ** 2] = block[:, l - mm : l + mm + 1, :]
            row += 2 * mm + 1
        per_tap.append(w)
    wigner = torch.stack(per_tap, dim=1).view(e * len(angles), r, s)
    return wigner, per_tap[0].transpose(1, 2).contiguous()


def messages(
    layers: MessageLayers,
    x: torch.Tensor,
    x_edge: torch.Tensor,
    edge_index: torch.Tensor,
    wigner: torch.Tensor,
    wigner_inv: torch.Tensor,
    mapping: torch.Tensor,
) -> torch.Tensor:
    """Upstream's per-edge messages (module doc); mapping (T*R, R) the tap combination."""
    act, c, h = layers.act, layers.sphere_channels_reduce, layers.hidden_channels
    s, r = wigner.shape[2], wigner.shape[1]
    t = mapping.shape[0] // r
    gate = act(layers.fc1_dist(x_edge))
    rotated = []
    for side in (0, 1):
        xs = x[edge_index[side]]
        xs = xs.view(-1, 1, s, c).repeat(1, t, 1, 1).view(-1, s, c)
        rotated.append(torch.bmm(wigner, xs).view(-1, r * c))
    m = act(layers.fc1_edge_proj(torch.cat(rotated, dim=1)))
    m = m.view(-1, t, h) * gate.view(-1, 1, h)
    m = act(layers.fc1_edge(m.view(-1, h)))
    m = act(layers.fc2_edge(m))
    m = m.view(-1, t * r, c)
    m = torch.einsum("abc,bd->adc", m, mapping).contiguous()
    return torch.bmm(wigner_inv, m)
