"""Fused ops of the SCN edge path, registered under the torch.library namespace ``scn_fast``.

``edge_rotation`` (gather + rotate into edge frames), ``scatter_aggregation`` (rotate back + segment
sum into atoms), ``tap_projection`` / ``gated_tap_projection`` (fc1_edge_proj over all taps using the
tap symmetry; the gated form with upstream's SiLU and distance gate fused) and ``tap_combine``
(fc2_edge's bias, SiLU and the tap combination in one pass). Each has a fake (meta) implementation
and autograd (its backward a custom op too), and runs the backend named in its call.

The model calls three entry points that follow a forward's plan (``scn_fast.planning``): ``messages``
(one resolution's message path), ``grid`` (the grid MLP) and ``heads`` (the output heads);
``reference`` holds upstream's dense math, the reference backend of every op.
"""

from .edge_csr import EdgeCSR, edge_csr
from .edge_rotation import edge_rotation
from .layout import compact_wigner, edge_layout, tap_symmetry
from .message_path import messages, prepare_constants
from .planned import grid, heads
from .scatter_aggregation import scatter_aggregation
from .tap_combine import tap_combine
from .tap_projection import gated_tap_projection, tap_projection

__all__ = [
    "EdgeCSR",
    "compact_wigner",
    "edge_csr",
    "edge_layout",
    "edge_rotation",
    "gated_tap_projection",
    "grid",
    "heads",
    "messages",
    "prepare_constants",
    "scatter_aggregation",
    "tap_combine",
    "tap_projection",
    "tap_symmetry",
]
