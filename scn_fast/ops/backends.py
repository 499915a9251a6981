"""The backends of the edge primitives (``SPEC.md``): ``gather_rotate`` and ``rotate_scatter`` of the
C++ extension and of the Triton kernels. What each supports is declared in ``ops/support.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class EdgeBackend:
    name: str
    gather_rotate: Callable[..., object]
    rotate_scatter: Callable[..., object]


# ----------------------------------------------------------------------------- C++ extension
def _ext():
    from ..extension import load_extension

    return load_extension()


def _ext_gather_rotate(x, wig, idx, lmax, mmax):
    return _ext().gather_rotate(x, wig, idx, lmax, mmax)


def _ext_rotate_scatter(m, wig, perm, ptr, lmax, mmax, num_nodes):
    return _ext().rotate_scatter(m, wig, perm, ptr, lmax, mmax, num_nodes)


# ----------------------------------------------------------------------------- Triton
def _triton_module():
    from ..kernels import edge_rotation

    return edge_rotation


def _triton_gather_rotate(x, wig, idx, lmax, mmax):
    return _triton_module().gather_rotate(x, wig, idx, lmax, mmax)


def _triton_rotate_scatter(m, wig, perm, ptr, lmax, mmax, num_nodes):
    return _triton_module().rotate_scatter(m, wig, perm, ptr, lmax, mmax, num_nodes)


BACKENDS: dict[str, EdgeBackend] = {
    "extension": EdgeBackend("extension", _ext_gather_rotate, _ext_rotate_scatter),
    "triton": EdgeBackend("triton", _triton_gather_rotate, _triton_rotate_scatter),
}


def get_backend(name: str) -> EdgeBackend:
    if name not in BACKENDS:
        raise ValueError(f"edge ops have no backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name]
