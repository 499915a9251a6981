"""The ``reference`` backend of every fused op: upstream SCN's dense math, written once.

``edges`` (gather + rotate, rotate back + sum: ``edge_rotation``, ``scatter_aggregation``),
``messages`` (the whole message block, with per-tap dense rotations: the tap ops' reference),
``grid`` (ToGrid / FromGrid and the grid MLP: ``grid_projection``), ``heads`` (``output_heads``).
The model's reference path runs these, and the fused backends are tested against them.
"""

from .edges import gather_rotate, rotate_scatter
from .grid import Grid, grid_mlp
from .heads import heads
from .messages import messages, tap_wigner

__all__ = ["Grid", "gather_rotate", "grid_mlp", "heads", "messages", "rotate_scatter", "tap_wigner"]
