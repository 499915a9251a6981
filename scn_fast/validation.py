"""Construction-time checks of a model configuration: every argument that cannot work is
rejected by the constructor with a ``ValueError`` naming it, instead of failing later (an empty
tensor in the first forward) or not at all (a NaN energy).

``check_model_config`` takes the upstream keyword arguments (``SphericalChannelNetwork``'s
``model_config`` dict). The checks that need more than one argument:

* with ``num_resolutions == 2`` the far resolution has ``hidden_channels // 4`` hidden channels,
  so ``hidden_channels >= 4``;
* ``int(cutoff / distance_resolution) >= 2`` distance basis functions (checked in model.py).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

__all__ = ["check_model_config"]

#: Arguments that must be integers >= 1.
POSITIVE_INTEGERS = (
    "max_num_neighbors",
    "max_num_elements",
    "num_interactions",
    "sphere_channels",
    "sphere_channels_reduce",
    "hidden_channels",
    "num_sphere_samples",
    "num_basis_functions",
)
#: Arguments that must be integers of any sign.
INTEGERS = ("lmax", "mmax", "num_resolutions", "num_taps", "num_bands")
#: Arguments that must be finite floats > 0.
POSITIVE_FINITE = ("cutoff", "distance_resolution", "basis_width_scalar")


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_model_config(config: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first argument of ``config`` that cannot work.

    Args:
        config: upstream constructor keyword arguments; keys that are absent are not checked.

    Raises:
        ValueError: a non-integer where an integer is needed (``max_num_neighbors=20.5``, also
            ``True``), a count below 1 (0 channels, ``num_sphere_samples=0``), a non-finite or
            non-positive length (``cutoff=nan`` / ``inf``), or ``hidden_channels < 4`` with two
            resolutions.
    """
    for name in POSITIVE_INTEGERS + INTEGERS:
        if name in config and not _is_integer(config[name]):
            raise ValueError(f"{name} must be an integer, got {config[name]!r}")
    for name in POSITIVE_INTEGERS:
        if name in config and config[name] < 1:
            raise ValueError(f"{name} must be at least 1, got {config[name]}")
    for name in POSITIVE_FINITE:
        if name not in config:
            continue
        value = config[name]
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not (math.isfinite(float(value)) and float(value) > 0.0):
            raise ValueError(f"{name} must be a positive finite number, got {value}")
    if config.get("num_resolutions") == 2 and config.get("hidden_channels", 4) < 4:
        raise ValueError(
            f"hidden_channels must be at least 4 with num_resolutions=2 (the far resolution "
            f"has hidden_channels // 4 channels), got {config['hidden_channels']}"
        )
