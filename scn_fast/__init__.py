"""scn_fast: a faithful and fast Spherical Channel Network (SCN).

``SphericalChannelNetwork`` is a drop-in for fairchem's / ocpmodels' SCN (same constructor, same
state_dict, same outputs), with fused kernels selected by a dispatcher (``use_fused=True``).
"""

from . import _checkout  # noqa: F401  (first: mounts ``scn_fast.kernels`` in a plain checkout)
from .checkpoint import load_checkpoint, save_checkpoint
from .data import AtomsBatch
from .extension import cpu_cache_bytes, release_cpu_cache
from .model import GraphData, SphericalChannelNetwork
from .planning import plan
from .presets import PRESETS, preset

__all__ = [
    "PRESETS",
    "AtomsBatch",
    "GraphData",
    "SphericalChannelNetwork",
    "cpu_cache_bytes",
    "load_checkpoint",
    "plan",
    "preset",
    "release_cpu_cache",
    "save_checkpoint",
]
__version__ = "0.1.0"
