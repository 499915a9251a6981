"""The model's configuration: checks of the constructor arguments, and the resolutions they imply.

Shared by the model and by ``scn_fast.planning`` (which plans a configuration without building it).
"""

from __future__ import annotations

import math
from typing import Any

from .precision import check_precision


def resolution_specs(
    lmax: int, num_resolutions: int, hidden_channels: int, max_num_neighbors: int
) -> list[tuple[int, int, float]]:
    """(lmax, hidden channels, rank cutoff) per message resolution, as upstream: one resolution, or
    the 12 nearest edges per target at lmax and the rest at max(4, lmax - 2) with a quarter of the
    hidden channels."""
    if num_resolutions == 1:
        return [(lmax, hidden_channels, max_num_neighbors - 0.01)]
    return [
        (lmax, hidden_channels, 12 - 0.01),
        (max(4, lmax - 2), hidden_channels // 4, max_num_neighbors - 0.01),
    ]


# Upstream's constructor defaults, for the keys a configuration may leave out.
DEFAULTS: dict[str, Any] = {
    "use_pbc": True,
    "regress_forces": True,
    "otf_graph": False,
    "max_num_neighbors": 20,
    "cutoff": 8.0,
    "max_num_elements": 90,
    "num_interactions": 8,
    "lmax": 6,
    "mmax": 1,
    "num_resolutions": 2,
    "sphere_channels": 128,
    "sphere_channels_reduce": 128,
    "hidden_channels": 256,
    "num_taps": -1,
    "use_grid": True,
    "num_bands": 1,
    "num_sphere_samples": 128,
    "num_basis_functions": 128,
    "distance_function": "gaussian",
    "basis_width_scalar": 1.0,
    "distance_resolution": 0.02,
}


def _check_config(
    lmax: int,
    mmax: int,
    num_resolutions: int,
    num_bands: int,
    cutoff: float,
    distance_resolution: float,
    max_num_neighbors: int,
    direct_forces: bool,
    precision: str,
) -> None:
    if not 1 <= lmax <= 10:
        raise ValueError(f"lmax must be in 1..10, got {lmax}")
    if mmax not in (0, 1):
        raise ValueError(f"mmax must be 0 or 1, got {mmax}")
    if num_resolutions not in (1, 2):
        raise ValueError(f"num_resolutions must be 1 or 2, got {num_resolutions}")
    if num_resolutions == 2 and lmax < 4:
        raise ValueError(
            f"num_resolutions=2 uses lmax max(4, lmax-2) for far edges, which needs lmax >= 4; got {lmax}"
        )
    if not 1 <= num_bands <= lmax + 1:
        raise ValueError(f"num_bands must be in 1..lmax+1, got {num_bands}")
    if cutoff <= 0 or distance_resolution <= 0 or int(cutoff / distance_resolution) < 2:
        raise ValueError(
            f"cutoff ({cutoff}) / distance_resolution ({distance_resolution}) must give >= 2 basis functions"
        )
    if max_num_neighbors <= 0:
        raise ValueError(f"max_num_neighbors must be positive, got {max_num_neighbors}")
    if not direct_forces:
        raise ValueError(
            "direct_forces=False (forces as -dE/dx) is not supported: SCN predicts forces directly, "
            "and upstream SCN ignores this flag"
        )
    check_precision(precision)
    if not math.isfinite(cutoff):
        raise ValueError("cutoff must be finite")
