"""Named model configurations (upstream constructor keyword arguments).

``tiny`` is the golden tests' small config; ``scn-t1-b1``, ``scn-t4-b2`` and ``scn-all-md`` are
upstream's OC20 configs.
"""

from __future__ import annotations

from typing import Any

_OC20 = {
    "use_pbc": True,
    "regress_forces": True,
    "otf_graph": True,
    "max_num_neighbors": 40,
    "cutoff": 8.0,
    "max_num_elements": 90,
    "num_interactions": 12,
    "lmax": 6,
    "mmax": 1,
    "num_resolutions": 2,
    "sphere_channels": 128,
    "sphere_channels_reduce": 128,
    "hidden_channels": 1024,
    "use_grid": True,
    "num_sphere_samples": 128,
    "num_basis_functions": 128,
    "distance_function": "gaussian",
    "basis_width_scalar": 2.0,
    "distance_resolution": 0.02,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "use_pbc": True,
        "regress_forces": True,
        "otf_graph": True,
        "num_interactions": 2,
        "hidden_channels": 16,
        "sphere_channels": 8,
        "sphere_channels_reduce": 8,
        "num_sphere_samples": 8,
        "num_basis_functions": 8,
        "lmax": 4,
        "num_bands": 2,
        "cutoff": 8.0,
        "max_num_neighbors": 40,
        "basis_width_scalar": 2.0,
    },
    "scn-t1-b1": {**_OC20, "num_taps": 1, "num_bands": 1},
    "scn-t4-b2": {**_OC20, "num_taps": -1, "num_bands": 2},
    "scn-all-md": {**_OC20, "num_taps": -1, "num_bands": 2, "num_interactions": 16},
}


def preset(name: str) -> dict[str, Any]:
    """A copy of the keyword arguments of preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return dict(PRESETS[name])
