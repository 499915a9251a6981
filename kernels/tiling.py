"""Atoms per tile of the grid MLP and output-head tile loops, from a scratch-memory budget.

Pure functions (no Triton, no device): the plan calls them with the problem's sizes. Each tile
loop (``kernels/grid_mlp.py``, ``kernels/sphere_heads.py``, ``csrc/grid_ops.cpp``) allocates its
scratch buffers once per call for ``n`` atoms and reuses them across tiles, so a tile of ``n`` atoms
holds ``n * per_atom`` numbers. On a GPU the number of launches per call is proportional to the
number of tiles, so tiles should be as large as the budget allows: with the default 2 GiB budget
a scn-t4-b2 training tile holds ~1,350 atoms (float32), against 78 for a fixed 16,384 grid rows.

Per-atom scratch, in numbers, with S = (L+1)^2 coefficients, G = 2(L+1)(2L+3) grid points, b bands,
C channels, H1 = 2bC, H2 = 2C, C3 = C (the grid MLP's widths):

    triton    forward  b*S*H1 + G*H1 + G*H2 + S*H2                      (Q, H1, H2, U)
              backward b*S*H1 + 2*G*H1 + 2*G*H2 + 2*S*H2                (+ A1, A2, dU)
    extension forward  2*S*C + b*S*H1 + G*H1 + G*H2 + S*H2 + S*C3       (+ X, O)
              backward 4*S*C + b*S*H1 + 2*G*H1 + 2*G*H2 + 2*S*H2 + S*C3 (+ X, dX, dO)

and for the heads (P sample points, D1 = sum of the heads' first widths, d2 the largest second
width, d the largest output width): ``S*D1 + P*D1 + P*d2 + d*d2`` forward, ``S*D1 + 3*P*D1 +
2*P*d2 + d*d2`` backward (+ ``S*C``, and ``S*C`` more backward, for the extension).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "grid_scratch_per_atom",
    "grid_tile_atoms",
    "heads_scratch_per_atom",
    "heads_tile_atoms",
    "tile_atoms_for_budget",
]

# Scratch budget of one tile loop on a GPU (bytes): ~2.5% of an 80 GB device (a 1,000-atom
# scn-t4-b2 training step keeps ~23 GB of activations), ~1,350 atoms per scn-t4-b2 training tile in
# float32, so a 1,000-atom step runs one tile per block (each tile is ~20 launches of a training
# step). CPU tiles stay small (cache-sized) and are chosen elsewhere.
DEFAULT_BUDGET_BYTES = 2 << 30


def _grid_sizes(lmax: int, num_bands: int, channels: int) -> tuple[int, int, int, int, int]:
    s = (lmax + 1) ** 2
    g = 2 * (lmax + 1) * (2 * lmax + 3)
    h1 = 2 * num_bands * channels
    return s, g, h1, 2 * channels, channels


def grid_scratch_per_atom(
    lmax: int, num_bands: int, channels: int, *, backend: str = "triton", training: bool = True
) -> int:
    """Scratch numbers per atom of one grid-MLP tile (module doc); ``training``: the backward's."""
    s, g, h1, h2, c3 = _grid_sizes(lmax, num_bands, channels)
    b, c = num_bands, channels
    if backend == "triton":
        fwd = b * s * h1 + g * h1 + g * h2 + s * h2
        bwd = b * s * h1 + 2 * g * h1 + 2 * g * h2 + 2 * s * h2
    elif backend == "extension":
        fwd = 2 * s * c + b * s * h1 + g * h1 + g * h2 + s * h2 + s * c3
        bwd = 4 * s * c + b * s * h1 + 2 * g * h1 + 2 * g * h2 + 2 * s * h2 + s * c3
    else:
        raise ValueError(f"backend must be 'triton' or 'extension', got {backend!r}")
    return max(fwd, bwd) if training else fwd


def heads_scratch_per_atom(
    lmax: int,
    channels: int,
    num_points: int,
    first_widths: list[int],
    second_widths: list[int],
    out_widths: list[int],
    *,
    backend: str = "triton",
    training: bool = True,
) -> int:
    """Scratch numbers per atom of one output-heads tile (module doc)."""
    s, p = (lmax + 1) ** 2, num_points
    d1, d2, d = sum(first_widths), max(second_widths), max(out_widths)
    fwd = s * d1 + p * d1 + p * d2 + d * d2
    bwd = s * d1 + 3 * p * d1 + 2 * p * d2 + d * d2
    if backend == "extension":
        fwd, bwd = fwd + s * channels, bwd + 2 * s * channels
    elif backend != "triton":
        raise ValueError(f"backend must be 'triton' or 'extension', got {backend!r}")
    return max(fwd, bwd) if training else fwd


def tile_atoms_for_budget(
    budget_bytes: int, per_atom: int, itemsize: int = 4, num_atoms: int | None = None
) -> int:
    """The most atoms whose ``per_atom`` scratch numbers of ``itemsize`` bytes fit in
    ``budget_bytes`` (at least 1; at most ``num_atoms`` when given)."""
    if budget_bytes <= 0 or per_atom <= 0 or itemsize <= 0:
        raise ValueError(
            f"budget_bytes, per_atom and itemsize must be positive, got {budget_bytes}, "
            f"{per_atom}, {itemsize}"
        )
    atoms = max(1, budget_bytes // (per_atom * itemsize))
    return atoms if num_atoms is None else max(1, min(atoms, num_atoms))


def grid_tile_atoms(
    lmax: int,
    num_bands: int,
    channels: int,
    *,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    itemsize: int = 4,
    backend: str = "triton",
    training: bool = True,
    num_atoms: int | None = None,
) -> int:
    """Atoms per grid-MLP tile within ``budget_bytes`` of scratch (scn-t4-b2, float32, training,
    2 GiB: 1,349 atoms with the Triton backend)."""
    per_atom = grid_scratch_per_atom(lmax, num_bands, channels, backend=backend, training=training)
    return tile_atoms_for_budget(budget_bytes, per_atom, itemsize, num_atoms)


def heads_tile_atoms(
    lmax: int,
    channels: int,
    num_points: int,
    first_widths: list[int],
    second_widths: list[int],
    out_widths: list[int],
    *,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    itemsize: int = 4,
    backend: str = "triton",
    training: bool = True,
    num_atoms: int | None = None,
) -> int:
    """Atoms per output-heads tile within ``budget_bytes`` of scratch."""
    per_atom = heads_scratch_per_atom(
        lmax, channels, num_points, first_widths, second_widths, out_widths,
        backend=backend, training=training,
    )  # fmt: skip
    return tile_atoms_for_budget(budget_bytes, per_atom, itemsize, num_atoms)
