"""``scn_fast::output_heads``: SCN's energy and force heads on sphere samples, fused per tile of atoms.

Upstream evaluates x (N, S, C) at P = ``num_sphere_samples`` points (``y = sh x``, sh (P, S) the
unnormalised real spherical harmonics at ``so3.sphere_points``), runs a 3-layer MLP per point and
head, and averages over the points, writing the (N*P, C) samples and every activation to memory:

    energy[z]    = (1/P) sum_p  e(z, p),           e = fc3_e(silu(fc2_e(silu(fc1_e(y_zp)))))  (1 output)
    forces[z, :] = (1/P) sum_p  f(z, p) pts[p, :]  (pts: the density-weighted sphere points, (P, 3))

Both are ``out_k[z, j] = (1/P) sum_p V_k[p, j] mlp_k(y_zp)`` with V_energy = 1 (P, 1) and
V_forces = pts (P, 3). Here, per tile of n atoms (rows ordered (point, atom)):

* the first layers of all heads are one GEMM in coefficient space (fc1(sh x) = sh (x W1^T) + b1,
  S < P), projected to the points with one GEMM (P, S) @ (S, n*D1) and fused with bias and SiLU;
* fc3 (linear, one output) commutes with the point sum: ``out = (V^T H2 / P) w3^T + b3 V^T 1 / P``,
  so the (P*n, D2) -> (P*n, 1) GEMV becomes a (d, P) @ (P, n*D2) GEMM and a tiny GEMV.

Nothing of size (N*P, .) is allocated; backward recomputes a tile's forward.
x (N, S, C), energy weights (fc1 C -> D1, fc2 D1 -> D2, fc3 D2 -> 1), optional force weights
(same shapes)  ->  node energies (N,) (summed per structure by the caller) and forces (N, 3).
Backends as ``grid_projection`` ("extension", "triton"; "reference" in :func:`output_heads`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import so3
from ..precision import linear_operands
from .grid_projection import default_tile_atoms, get_backend, launcher_precision

_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def heads_constants(
    num_points: int, lmax: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sh (P, S), V_energy = ones (P, 1), V_forces = sphere points (P, 3)) in dtype on device, from
    the float64 constants of ``so3``; cached."""
    key = (num_points, lmax, dtype, torch.device(device))

    def build() -> tuple[torch.Tensor, ...]:
        sh = so3.sphere_harmonics_at_points(num_points, lmax)
        pts = so3.sphere_points(num_points)
        return tuple(
            t.to(dtype=dtype, device=device).contiguous()
            for t in (sh, torch.ones(num_points, 1, dtype=torch.float64), pts)
        )

    return so3.cached_constant(_CONSTANTS, key, build)


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


# The arguments both ops share, written once. ``precision`` has no default on purpose: the
# dispatcher drops a trailing argument equal to its default before autograd sees the inputs, and
# the Tensor[] autograd wrapper then counts one gradient too many.
_HEADS_ARGS = (
    "Tensor x, Tensor sh, Tensor[] weights, Tensor[] point_weights, SymInt tile_atoms, str backend, "
    "str precision"
)


def _launch(entry: str, lead: list, x, sh, weights, point_weights, tile_atoms, backend, precision):
    """``entry`` of ``backend`` on contiguous operands (``lead``: the list-of-tensors argument before
    x, if any), with the GEMM precision in the launcher's keyword (:func:`launcher_precision`)."""
    fn = getattr(get_backend(backend), entry)
    lists = [[t.contiguous() for t in ts] for ts in (weights, point_weights)]
    tensors = (x.contiguous(), sh.contiguous(), *lists)
    return list(fn(*lead, *tensors, tile_atoms, **launcher_precision(fn, precision)))


@torch.library.custom_op(
    "scn_fast::output_heads", mutates_args=(), schema=f"({_HEADS_ARGS}) -> Tensor[]"
)
def _output_heads(x, sh, weights, point_weights, tile_atoms, backend, precision):
    """[out_k (N, d_k)] per head k; weights = (w1, b1, w2, b2, w3, b3) per head, flattened."""
    args = (x, sh, weights, point_weights, tile_atoms, backend, precision)
    return _launch("sphere_heads_forward", [], *args)


@_output_heads.register_fake
def _(x, sh, weights, point_weights, tile_atoms, backend, precision):
    return [x.new_empty((x.shape[0], v.shape[1])) for v in point_weights]


@torch.library.custom_op(
    "scn_fast::output_heads_backward",
    mutates_args=(),
    schema=f"(Tensor[] grads, {_HEADS_ARGS}) -> Tensor[]",
)
def _output_heads_backward(grads, x, sh, weights, point_weights, tile_atoms, backend, precision):
    """[dx, then dw1, db1, dw2, db2, dw3, db3 per head]."""
    args = (x, sh, weights, point_weights, tile_atoms, backend, precision)
    return _launch("sphere_heads_backward", [[g.contiguous() for g in grads]], *args)


@_output_heads_backward.register_fake
def _(grads, x, sh, weights, point_weights, tile_atoms, backend, precision):
    return [torch.empty_like(x), *(torch.empty_like(w) for w in weights)]


def _setup_context(ctx, inputs, output):
    x, sh, weights, point_weights, tile_atoms, backend, precision = inputs
    ctx.save_for_backward(x, sh, *weights, *point_weights)
    ctx.meta = (len(weights), tile_atoms, backend, precision)


def _backward(ctx, grads):
    num_weights, tile_atoms, backend, precision = ctx.meta
    x, sh, *rest = ctx.saved_tensors
    weights, point_weights = rest[:num_weights], rest[num_weights:]
    grads = [
        g if g is not None else x.new_zeros((x.shape[0], v.shape[1]))
        for g, v in zip(grads, point_weights, strict=True)
    ]
    dx, *dws = _output_heads_backward(
        grads, x, sh, weights, point_weights, tile_atoms, backend, precision
    )
    return dx, None, dws, [None] * len(point_weights), None, None, None


_output_heads.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

HeadWeights = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]


def head_weights(fc1: torch.nn.Linear, fc2: torch.nn.Linear, fc3: torch.nn.Linear) -> HeadWeights:
    """(w1, b1, w2, b2, w3, b3) of one head's three nn.Linear layers."""
    return linear_operands("fp32", fc1, fc2, fc3)


def output_heads_reference(
    x: torch.Tensor, num_points: int, lmax: int, energy: HeadWeights, forces: HeadWeights | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Upstream's heads (``ops.reference.heads``) with these weights, for comparison."""
    from .reference import heads

    sh, _, pts = heads_constants(num_points, lmax, x.dtype, x.device)

    def layers(w: HeadWeights | None):
        if w is None:
            return None
        return [lambda t, i=i: F.linear(t, w[2 * i], w[2 * i + 1]) for i in range(3)]

    return heads(x, sh, pts, layers(energy), layers(forces))


def output_heads(
    x: torch.Tensor,
    *,
    num_points: int,
    lmax: int,
    energy: HeadWeights,
    forces: HeadWeights | None,
    backend: str,
    tile_atoms: int | None = None,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(node energies (N,), forces (N, 3) or None when ``forces`` is None) of x (N, (lmax+1)^2, C).

    energy / forces: (w1, b1, w2, b2, w3, b3) of each head (:func:`head_weights`); backend
    "extension" | "triton" | "reference"; tile_atoms: atoms per tile (default
    ``grid_projection.default_tile_atoms``: about ``TILE_ROWS`` sample rows); precision: the GEMM
    precision ("fp32" | "tf32" | "bf16"), passed to launchers that take it
    (``grid_projection.launcher_precision``). Differentiable w.r.t. x and all weights.
    """
    if backend == "reference":
        return output_heads_reference(x, num_points, lmax, energy, forces)
    sh, v_energy, v_forces = heads_constants(num_points, lmax, x.dtype, x.device)
    weights = list(energy) + (list(forces) if forces is not None else [])
    point_weights = [v_energy] + ([v_forces] if forces is not None else [])
    if tile_atoms is None:
        tile_atoms = default_tile_atoms(num_points, x.device)
    outs = _output_heads(x, sh, weights, point_weights, int(tile_atoms), backend, precision)
    return outs[0].view(-1), (outs[1] if forces is not None else None)
