"""Triton backend of the spherical grid MLP and of the sphere-sample output heads: the public names
(what ``scn_fast/ops/grid_projection.py`` and ``scn_fast/ops/output_heads.py`` call) and the
ahead-of-time compile cases of the GEMM kernel.

The work lives in one file per job:

* ``kernels/gemm.py``: the GEMM kernel with its fused prologue/epilogue, tile shapes, precision;
* ``kernels/edge_mlp.py``: the edge MLP's Linear layers on that GEMM (``scn_fast/ops/edge_linear.py``);
* ``kernels/grid_mlp.py``: the grid MLP's tile loops (:func:`grid_mlp_forward`,
  :func:`grid_mlp_backward`);
* ``kernels/sphere_heads.py``: the output heads' tile loops (:func:`sphere_heads_forward`,
  :func:`sphere_heads_backward`);
* ``kernels/tile_loop.py``: what both tile loops share; ``kernels/tiling.py``: atoms per tile from
  a memory budget;
* ``kernels/aot.py``: launching, tracing on meta tensors and compiling for sm_80 / sm_90.

:func:`launch_configs` traces the four launchers on meta tensors of one problem and returns the
distinct GEMM specialisations they launch; :func:`compile_main` compiles those of
:data:`COMPILE_CASES` (run in a process without ``TRITON_INTERPRET``).
"""

from __future__ import annotations

import sys

import torch

from . import aot, edge_mlp
from .aot import LaunchConfig
from .gemm import EPI_DSILU, EPI_NONE, EPI_SILU, PRECISIONS, is_interpreted, mm
from .grid_mlp import grid_mlp_backward, grid_mlp_forward
from .sphere_heads import sphere_heads_backward, sphere_heads_forward

__all__ = [
    "COMPILE_CASES",
    "EPI_DSILU",
    "EPI_NONE",
    "EPI_SILU",
    "PRECISIONS",
    "LaunchConfig",
    "compile_cases",
    "compile_main",
    "grid_mlp_backward",
    "grid_mlp_forward",
    "is_interpreted",
    "launch_configs",
    "mm",
    "sphere_heads_backward",
    "sphere_heads_forward",
]


def launch_configs(
    lmax: int = 6,
    num_bands: int = 2,
    channels: int = 128,
    dtype: torch.dtype = torch.float32,
    num_atoms: int = 40,
    tile_atoms: int = 16,
    num_points: int = 128,
    precision: str = "fp32",
) -> list[LaunchConfig]:
    """The distinct GEMM specialisations the grid and heads launchers use (forward and backward)
    for one problem in one precision, traced on meta tensors (sizes matter only through the
    JIT's specialisation and the tile shapes), and in fp32 / tf32 those of the edge MLP's
    launchers (``kernels/edge_mlp.py``, scn-t4-b2's edge layer widths; the plan runs them in those
    precisions)."""
    s = (lmax + 1) ** 2
    g = 2 * (lmax + 1) * (2 * lmax + 3)
    h1w, h2w = 2 * num_bands * channels, 2 * channels

    def t(*shape):
        return torch.empty(shape, dtype=dtype, device="meta")

    grid_args = [
        t(num_atoms, s, channels), t(num_atoms, s, channels), t(g, num_bands * s), t(s, g),
        t(h1w, h1w), t(h1w), t(h2w, h1w), t(h2w), t(channels, h2w), t(channels),
    ]  # fmt: skip
    heads_w = [t(channels, channels), t(channels), t(channels, channels), t(channels), t(1, channels), t(1)] * 2  # fmt: skip
    heads_v = [t(num_points, 1), t(num_points, 3)]
    x, sh = t(num_atoms, s, channels), t(num_points, s)
    with aot.trace() as launches:
        grid_mlp_forward(*grid_args, tile_atoms, precision=precision)
        grid_mlp_backward(t(num_atoms, s, channels), *grid_args, tile_atoms, precision=precision)
        sphere_heads_forward(x, sh, heads_w, heads_v, tile_atoms, precision=precision)
        sphere_heads_backward(
            [t(num_atoms, 1), t(num_atoms, 3)], x, sh, heads_w, heads_v, tile_atoms,
            precision=precision,
        )  # fmt: skip
    configs = aot.configs_of(launches)
    if precision in ("fp32", "tf32"):
        seen = {c.key() for c in configs}
        edge = edge_mlp.launch_configs(dtype=dtype, precision=precision)
        configs += [c for c in edge if c.key() not in seen]
    return configs


# The problems compiled by compile_main: scn-t4-b2 (L=6, C=128, 2 bands) in float32 and float64, and
# a small odd case (L=2, C=17, 1 band) for the unaligned / non-multiple-of-16 specialisations, all
# in precision fp32; tests/test_tensor_cores.py compiles the tf32 and bf16 variants.
COMPILE_CASES = [
    (6, 2, 128, torch.float32, "fp32"),
    (2, 1, 17, torch.float32, "fp32"),
    (6, 2, 128, torch.float64, "fp32"),
]


def compile_cases(cases=COMPILE_CASES) -> list[tuple[dict, list[LaunchConfig]]]:
    """(problem, configs) pairs for :func:`aot.compile_main`, each config listed once."""
    seen: set[str] = set()
    out = []
    for lmax, bands, channels, dtype, precision in cases:
        cfgs = [c for c in launch_configs(lmax, bands, channels, dtype, precision=precision)
                if c.key() not in seen]  # fmt: skip
        seen.update(c.key() for c in cfgs)
        name = f"L={lmax} b={bands} C={channels} {str(dtype).replace('torch.', '')} {precision}"
        out.append(({"case": name, "precision": precision}, cfgs))
    return out


def compile_main(
    archs: tuple[int, ...] = (80, 90), json_path: str | None = None, jobs: int | None = None
) -> int:
    """Compile every distinct launch config of :data:`COMPILE_CASES` for each arch down to a cubin
    (in ``jobs`` forked processes). Prints one line per compile; returns 1 if any failed."""
    return aot.compile_main(compile_cases(), archs, json_path, jobs, "grid_projection compile")


if __name__ == "__main__":
    sys.exit(compile_main())
