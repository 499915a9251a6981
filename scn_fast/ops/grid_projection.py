"""``scn_fast::grid_projection``: the spherical grid MLP of an EdgeBlock, fused per tile of atoms.

Upstream (``EdgeBlock`` with ``use_grid``) projects ``x_down`` and the aggregated messages ``x_new``
(N, S, C) onto a ``2(L+1) x (2L+3)`` grid (G points) with ``num_bands`` band-limited projections each,
runs ``fc1 -> SiLU -> fc2 -> SiLU -> fc3`` at every point and projects back, writing the whole
(N*G, 2*bands*C) grid tensor and every activation to memory. Here:

* ToGrid of band k is one constant matrix T_k (G x S) (upstream's ``to_grid_sha`` and
  ``to_grid_shb`` contracted, float64), FromGrid one constant F (S x G). fc1's input at grid point g is
  ``[T_0 x_down, ..., T_{b-1} x_down, T_0 x_new, ...][g]`` (columns side, band, channel), so with
  W1_k the (H1, 2C) columns of band k of both sides and X = [x_down | x_new] (S, 2C) per atom:

      fc1(u)_g = sum_k T_k (X W1_k^T) [g] + b1        (channel mixing in coefficient space: S < G)

  ``to_grid`` = [T_0 | T_1 | ...] (G, b*S) multiplies the stacked Q_k = X W1_k^T (b*S, H1).
* fc3 commutes with F (both linear): ``F (H2 w3^T + 1 b3^T) = (F H2) w3^T + (F 1) b3^T``.
* Per tile of n atoms the grid rows are ordered (grid point, atom), so every projection is one 2-D
  GEMM; tile-sized buffers are reused and nothing of size (N*G, .) is allocated. Backward recomputes
  a tile's forward (nothing is saved across tiles but the inputs).

FLOPs per atom at L=6, C=128, 2 bands (G=210, S=49): upstream 195 M (fc1 110 M, fc2 55 M, fc3 14 M,
projections 16 M); here 110 M (Q 26 M, to-grid 21 M, fc2 55 M, back-projection 5 M, fc3 3 M).

x_down, x_new (N, S, C); fc1 (2bC -> 2bC), fc2 (2bC -> H2), fc3 (H2 -> C3)  ->  out (N, S, C3).
Backends: "extension" (``csrc/grid_ops.cpp``: ATen GEMMs, CPU and CUDA), "triton"
(``kernels/grid_projection.py``), and "reference" (upstream's einsums and ``nn.Linear``, in
:func:`grid_projection` only).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from .. import so3
from ..precision import linear_operands
from .support import refusal

FUSED_BACKENDS = ("extension", "triton")
# Default tile: grid rows (points x atoms) per tile, per device type: large enough for GEMM
# efficiency (CPU: ~9 atoms at L=6, timings flat from 2 to 19 atoms; a tile's buffers stay a few MB,
# which the allocator reuses without page faults), small next to N*G for large N.
TILE_ROWS = {"cpu": 2048, "cuda": 16384}


# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------


@functools.cache
def _grid_constants_f64(lmax: int, num_bands: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = so3.grid_matrices(lmax, num_bands)
    a, b, s = m.res_alpha, m.res_beta, (lmax + 1) ** 2
    # T_k[(beta, alpha), i] = sum_m sha[alpha * bands + k, m] shb[m, beta, i]
    t = torch.einsum("akm,mbi->kbai", m.to_grid_sha.view(a, num_bands, -1), m.to_grid_shb)
    to_grid = t.reshape(num_bands, b * a, s).permute(1, 0, 2).reshape(b * a, num_bands * s)
    # F[i, (beta, alpha)] = sum_m from_sha[alpha, m] from_shb[m, beta, i]
    from_grid = torch.einsum("am,mbi->iba", m.from_grid_sha, m.from_grid_shb).reshape(s, b * a)
    return to_grid.contiguous(), from_grid.contiguous()


_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def grid_constants(
    lmax: int, num_bands: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(to_grid (G, bands*S), from_grid (S, G)) in dtype on device, built once in float64 from
    upstream's ToGrid / FromGrid matrices (``so3.grid_matrices``); cached."""
    key = (lmax, num_bands, dtype, torch.device(device))

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        to_grid, from_grid = _grid_constants_f64(lmax, num_bands)
        return to_grid.to(dtype=dtype, device=device), from_grid.to(dtype=dtype, device=device)

    return so3.cached_constant(_CONSTANTS, key, build)


def default_tile_atoms(points: int, device: torch.device | str) -> int:
    """Atoms per tile so that a tile has about TILE_ROWS[device type] grid rows."""
    rows = TILE_ROWS.get(torch.device(device).type, TILE_ROWS["cpu"])
    return max(1, rows // max(points, 1))


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridBackend:
    """The four tile-loop entry points of one backend (same signatures as the C++ schema)."""

    name: str
    module: Callable[[], ModuleType | object]

    def refusal(self, request) -> str | None:
        """Why this backend cannot run ``request`` (a ``dispatch.OpRequest``), or None."""
        dev = torch.device(request.device).type
        return refusal(request.op, self.name, dev, request.dtype, request.lmax, request.mmax)

    def __getattr__(self, fn: str):
        return getattr(self.module(), fn)


def _ext_module():
    from ..extension import load_extension

    return load_extension()


def _triton_module():
    from ..kernels import grid_projection

    return grid_projection


BACKENDS: dict[str, GridBackend] = {
    "extension": GridBackend("extension", _ext_module),
    "triton": GridBackend("triton", _triton_module),
}


def launcher_precision(launcher: Callable, precision: str) -> dict[str, object]:
    """The one place a GEMM precision reaches a tile launcher.

    A Triton launcher takes ``precision=`` ("fp32" | "tf32" | "bf16") and picks its tensor-core
    mode from it. An extension op takes ``tf32=``: its float32 GEMMs (the projections in bf16 mode,
    every GEMM in tf32 mode) run on tf32 tensor cores for that call only on CUDA; CPU ignores it.
    fp32 is exact IEEE float32 on both. Anything else gets ``{}``."""
    kind = _precision_keyword(launcher)
    if kind == "precision":
        return {"precision": precision}
    if kind == "tf32":
        return {"tf32": precision in ("tf32", "bf16")}
    return {}


@functools.lru_cache(maxsize=64)
def _precision_keyword(launcher: Callable) -> str | None:
    schemas = getattr(launcher, "_schemas", None)  # a torch.ops packet (the extension)
    if schemas is not None:
        names = {a.name for schema in schemas.values() for a in schema.arguments}
        return "tf32" if "tf32" in names else None
    try:
        return "precision" if "precision" in inspect.signature(launcher).parameters else None
    except (TypeError, ValueError):
        return None


def get_backend(name: str) -> GridBackend:
    if name not in BACKENDS:
        raise ValueError(f"grid ops have no fused backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name]


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


# The tensors every grid op takes (the inputs, the two projections and the three layers), in schema
# order; the backward ops return the gradients of _GRAD_OF. The schemas are spelled out from these
# names (the ones ``torch.library`` would infer from annotated signatures), so each list is written
# once.
_GRID_TENSORS = ("x_down", "x_new", "to_grid", "from_grid", "w1", "b1", "w2", "b2", "w3", "b3")
_GRAD_OF = ("x_down", "x_new", "w1", "b1", "w2", "b2", "w3", "b3")
_SAVED = ("a1", "a2")  # fc1's and fc2's pre-activations (the saving variant)
_RECOMPUTE = 'SymInt tile_atoms, str backend, bool bf16_gemms=False, str precision="fp32"'
_EXTENSION_ONLY = "SymInt tile_atoms, bool bf16_gemms"


def _schema(tensors: tuple[str, ...], scalars: str, returns: str) -> str:
    return f"({', '.join(f'Tensor {t}' for t in tensors)}, {scalars}) -> {returns}"


def _named(args: tuple, names: tuple[str, ...] = _GRID_TENSORS) -> dict[str, torch.Tensor]:
    return dict(zip(names, args, strict=False))


def _run_tiles(entry: str, tensors, tile_atoms, backend, bf16_gemms=False, precision="fp32"):
    """``entry`` of ``backend`` on the contiguous ``tensors`` and the tile size; bf16 GEMMs only on
    the extension (checked by :func:`grid_projection`), the GEMM precision in the launcher's own
    keyword (:func:`launcher_precision`)."""
    args = [t.contiguous() for t in tensors]
    extra = (True,) if bf16_gemms else ()
    fn = getattr(get_backend(backend), entry)
    return fn(*args, tile_atoms, *extra, **launcher_precision(fn, precision))


@torch.library.custom_op(
    "scn_fast::grid_projection",
    mutates_args=(),
    schema=_schema(_GRID_TENSORS, _RECOMPUTE, "Tensor"),
)
def _grid_projection(*args) -> torch.Tensor:
    """args: the ``_GRID_TENSORS``, tile_atoms, backend[, bf16_gemms[, precision]]."""
    return _run_tiles("grid_mlp_forward", args[:10], *args[10:])


@_grid_projection.register_fake
def _(*args):
    t = _named(args)
    return t["x_down"].new_empty((*t["x_down"].shape[:2], t["w3"].shape[0]))


@torch.library.custom_op(
    "scn_fast::grid_projection_backward",
    mutates_args=(),
    schema=_schema(("grad_out", *_GRID_TENSORS), _RECOMPUTE, "Tensor[]"),
)
def _grid_projection_backward(*args) -> list[torch.Tensor]:
    """args: grad_out, then as :func:`_grid_projection`; the gradients of ``_GRAD_OF``."""
    return list(_run_tiles("grid_mlp_backward", args[:11], *args[11:]))


@_grid_projection_backward.register_fake
def _(grad_out, *args):
    t = _named(args)
    return [torch.empty_like(t[n]) for n in _GRAD_OF]


def _setup_context(ctx, inputs, output):
    *tensors, tile_atoms, backend, bf16_gemms, precision = inputs
    ctx.save_for_backward(*tensors)
    ctx.meta = (tile_atoms, backend, bf16_gemms, precision)


def _backward(ctx, grad_out):
    x_down, x_new, to_grid, from_grid, w1, b1, w2, b2, w3, b3 = ctx.saved_tensors
    dx_down, dx_new, dw1, db1, dw2, db2, dw3, db3 = _grid_projection_backward(
        grad_out, x_down, x_new, to_grid, from_grid, w1, b1, w2, b2, w3, b3, *ctx.meta
    )
    return dx_down, dx_new, None, None, dw1, db1, dw2, db2, dw3, db3, None, None, None, None


_grid_projection.register_autograd(_backward, setup_context=_setup_context)


# The saving variant (extension, CPU): fc1's and fc2's pre-activations kept for the backward.


_SAVED_ORDER = (*_GRID_TENSORS[:2], *_SAVED, *_GRID_TENSORS[2:])


@torch.library.custom_op(
    "scn_fast::grid_projection_saving",
    mutates_args=(),
    schema=_schema(_GRID_TENSORS, _EXTENSION_ONLY, "(Tensor, Tensor, Tensor)"),
)
def _grid_projection_saving(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, A1 (N*G*H1,), A2 (N*G*H2,)): the forward and the pre-activations its backward reads.
    args: the ``_GRID_TENSORS``, tile_atoms, bf16_gemms."""
    tensors = [t.contiguous() for t in args[:10]]
    out, a1, a2 = get_backend("extension").grid_mlp_forward_saving(*tensors, *args[10:])
    return out, a1, a2


@_grid_projection_saving.register_fake
def _(*args):
    t = _named(args)
    x_down, rows = t["x_down"], t["x_down"].shape[0] * t["to_grid"].shape[0]
    return (
        x_down.new_empty((x_down.shape[0], x_down.shape[1], t["w3"].shape[0])),
        x_down.new_empty(rows * t["w1"].shape[0]),
        x_down.new_empty(rows * t["w2"].shape[0]),
    )


@torch.library.custom_op(
    "scn_fast::grid_projection_backward_saved",
    mutates_args=(),
    schema=_schema(("grad_out", *_SAVED_ORDER), _EXTENSION_ONLY, "Tensor[]"),
)
def _grid_projection_backward_saved(*args) -> list[torch.Tensor]:
    """args: grad_out, x_down, x_new, a1, a2, the other ``_GRID_TENSORS``, tile_atoms, bf16_gemms;
    the gradients of ``_GRAD_OF``."""
    tensors = [t.contiguous() for t in args[:13]]
    return list(get_backend("extension").grid_mlp_backward_saved(*tensors, *args[13:]))


@_grid_projection_backward_saved.register_fake
def _(grad_out, *args):
    t = _named(args, _SAVED_ORDER)
    return [torch.empty_like(t[n]) for n in _GRAD_OF]


def _saving_setup_context(ctx, inputs, output):
    x_down, x_new, to_grid, from_grid, w1, b1, w2, b2, w3, b3, tile_atoms, bf16_gemms = inputs
    _, a1, a2 = output
    ctx.save_for_backward(x_down, x_new, a1, a2, to_grid, from_grid, w1, b1, w2, b2, w3, b3)
    ctx.meta = (tile_atoms, bf16_gemms)
    # a1 and a2 are outputs only to be saved: no zero-filled gradients of their size for them
    ctx.set_materialize_grads(False)


def _saving_backward(ctx, grad_out, _da1, _da2):
    if grad_out is None:  # the output took no part in the loss
        return (None,) * 12
    grads = _grid_projection_backward_saved(grad_out, *ctx.saved_tensors, *ctx.meta)
    dx_down, dx_new, dw1, db1, dw2, db2, dw3, db3 = grads
    return dx_down, dx_new, None, None, dw1, db1, dw2, db2, dw3, db3, None, None


_grid_projection_saving.register_autograd(_saving_backward, setup_context=_saving_setup_context)


def saves_activations(backend: str, device_type: str, grad: bool) -> bool:
    """Whether :func:`grid_projection` keeps fc1's and fc2's pre-activations for its backward
    rather than recomputing each tile's forward there: on CPU with the extension, when a gradient
    will be taken (``grad``). G * (H1 + H2) numbers per atom (645 KB at L = 6, 2 bands, C = 128,
    float32) buy a backward without forward GEMMs (~45% fewer GEMM FLOPs); on GPUs, where memory
    is the scarcer resource and the recompute is cheap, the backward recomputes."""
    return backend == "extension" and device_type == "cpu" and grad


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def grid_projection_reference(
    x_down: torch.Tensor,
    x_new: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    lmax: int,
    num_bands: int,
) -> torch.Tensor:
    """Upstream's computation (``ops.reference.grid``) with ``weights`` = (w1, b1, w2, b2, w3, b3),
    for comparison."""
    from .reference import Grid, grid_mlp

    def layer(i: int):
        return lambda t: F.linear(t, weights[2 * i], weights[2 * i + 1])

    grid = Grid(lmax, num_bands)
    return grid_mlp(grid, x_down, x_new, layer(0), layer(1), layer(2), F.silu)


def grid_projection(
    x_down: torch.Tensor,
    x_new: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
    *,
    lmax: int,
    num_bands: int,
    backend: str,
    tile_atoms: int | None = None,
    bf16_gemms: bool = False,
    save_activations: bool | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """FromGrid(fc3(silu(fc2(silu(fc1([ToGrid(x_down) | ToGrid(x_new)])))))) -> (N, S, C3).

    x_down, x_new (N, S, C) with S = (lmax+1)^2; w1 (2bC, 2bC), b1 (2bC,), w2 (H2, 2bC), b2 (H2,),
    w3 (C3, H2), b3 (C3,) (the weights of EdgeBlock's fc1_sphere, fc2_sphere, fc3_sphere);
    backend "extension" | "triton" | "reference" (upstream's einsums); tile_atoms: atoms per tile
    (default :func:`default_tile_atoms`); bf16_gemms (extension, float32 inputs): the GEMMs with
    w1, w2, w3 take bf16 operands (native bf16 GEMMs; precision="bf16"), projections stay float32;
    save_activations (extension on CPU): keep fc1's and fc2's pre-activations for the backward
    (True) or recompute each tile there (False); None chooses (:func:`saves_activations`);
    precision: the GEMM precision, passed to launchers that take it (:func:`launcher_precision`).
    Differentiable w.r.t. x_down, x_new and all weights.
    """
    if bf16_gemms and (backend != "extension" or x_down.dtype != torch.float32):
        raise ValueError(
            f"bf16_gemms needs the extension backend and float32 inputs, got backend={backend!r}, "
            f"{x_down.dtype}"
        )
    if backend == "reference":
        weights = (w1, b1, w2, b2, w3, b3)
        return grid_projection_reference(x_down, x_new, weights, lmax, num_bands)
    to_grid, from_grid = grid_constants(lmax, num_bands, x_down.dtype, x_down.device)
    if tile_atoms is None:
        tile_atoms = default_tile_atoms(to_grid.shape[0], x_down.device)
    tensors = (x_down, x_new, w1, b1, w2, b2, w3, b3)
    if save_activations and (backend != "extension" or x_down.device.type != "cpu"):
        raise ValueError(
            f"save_activations needs the extension backend on CPU, got backend={backend!r} on "
            f"{x_down.device.type}"
        )
    args = (x_down, x_new, to_grid, from_grid, w1, b1, w2, b2, w3, b3)
    if save_activations is None:
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        save_activations = saves_activations(backend, x_down.device.type, grad)
    if save_activations:
        return _grid_projection_saving(*args, int(tile_atoms), bool(bf16_gemms))[0]
    return _grid_projection(*args, int(tile_atoms), backend, bool(bf16_gemms), precision)


def grid_mlp(
    x_down: torch.Tensor,
    x_new: torch.Tensor,
    fc1: torch.nn.Linear,
    fc2: torch.nn.Linear,
    fc3: torch.nn.Linear,
    *,
    lmax: int,
    num_bands: int,
    backend: str,
    tile_atoms: int | None = None,
    save_activations: bool | None = None,
) -> torch.Tensor:
    """:func:`grid_projection` with EdgeBlock's ``fc1_sphere``, ``fc2_sphere``, ``fc3_sphere``."""
    return grid_projection(
        x_down,
        x_new,
        *linear_operands("fp32", fc1, fc2, fc3),
        lmax=lmax,
        num_bands=num_bands,
        backend=backend,
        tile_atoms=tile_atoms,
        save_activations=save_activations,
    )
