"""Triton launchers of the spherical grid MLP (``scn_fast::grid_projection``), forward and backward.

The math and the tile algorithm are those of ``scn_fast/ops/grid_projection.py`` (and
``csrc/grid_ops.cpp``, the C++ twin): per tile of ``n`` atoms, with the tile's grid rows ordered
(grid point, atom) so that every projection is one 2-D GEMM,

    Q_k  = [x_down | x_new]^T-tile  W1_k^T                 (S*n, H1)  per band k, coefficient space
    H1   = silu(to_grid @ [Q_0; ...; Q_{b-1}] + b1)         (G, n*H1) = (G*n, H1)
    H2   = silu(H1 w2^T + b2)                               (G*n, H2)
    U    = from_grid @ H2                                   (S, n*H2) = (S*n, H2)
    out[z, i] = U[(i, z)] w3^T + fsum[i] b3                 fsum = from_grid @ 1

Every GEMM that produces an activation is :func:`scn_fast.kernels.gemm.mm` with its fused
prologue/epilogue (strided inputs read in place, bias, SiLU / SiLU derivative, bias-gradient column
sums). The backward recomputes each tile's forward and writes ``U`` and ``dQ`` in (atom,
coefficient) row order, so the weight-gradient GEMMs (``torch.addmm``: cuBLAS split-K) read the
inputs and ``grad_out`` as plain views: no per-tile copy. Bias gradients: ``db1`` and ``db2`` are
column sums written by the GEMM epilogues into one buffer per call and reduced once, ``db3`` is
``fsum @ sum_z grad_out[z]``, once per call.

Precision: the ``precision`` argument ("fp32", "tf32", "bf16"; see ``kernels/tile_loop.py``), never a
global flag. ``tile_atoms`` comes from the caller (``kernels/tiling.py`` sizes it from a memory
budget on GPUs).
"""

from __future__ import annotations

import torch

from . import gemm
from .gemm import EPI_DSILU, EPI_SILU, ColumnSums, mm
from .tile_loop import (
    Buffers,
    check_inputs,
    cublas_scope,
    projection_precision,
    row_sums,
    tiles_of,
    weight_dtype,
    weight_grad,
)

__all__ = ["grid_mlp_backward", "grid_mlp_forward"]


def _grid_sizes(x_down, to_grid, w2, w3):
    n_atoms, s, c = x_down.shape
    g = to_grid.shape[0]
    b = to_grid.shape[1] // s
    return n_atoms, s, c, g, b, 2 * b * c, w2.shape[0], w3.shape[0]


def _first_layer(xd, xn, w1_kt, to_grid, b1, buf, n, s, g, b, h1w, prec, pre=None):
    """H1 = silu(to_grid @ Q + b1) of one tile (G, n*H1); Q_k = [xd | xn] W1_k^T read in place."""
    q = buf.get("q", b, s * n, h1w)
    for k in range(b):
        mm(xd, w1_kt[k, 0], q[k], a2=xn, b2=w1_kt[k, 1], precision=prec)
    h1 = buf.get("h1", g, n * h1w)
    mm(
        to_grid,
        q.view(b * s, n * h1w),
        h1,
        bias=b1,
        bias_period=h1w,
        epi=EPI_SILU,
        pre=pre,
        precision=projection_precision(prec),
    )
    return q, h1


def grid_mlp_forward(
    x_down: torch.Tensor,
    x_new: torch.Tensor,
    to_grid: torch.Tensor,
    from_grid: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
    tile_atoms: int,
    *,
    precision: str = "fp32",
) -> torch.Tensor:
    """out (N, S, C3) = F fc3(silu(fc2(silu(fc1([T x_down | T x_new]))))) (module doc)."""
    check_inputs(
        dict(
            x_down=x_down, x_new=x_new, to_grid=to_grid, from_grid=from_grid,
            w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3,
        ),
        "grid",
    )  # fmt: skip
    gemm.check_precision(precision, x_down.dtype)
    n_atoms, s, c, g, b, h1w, h2w, c3 = _grid_sizes(x_down, to_grid, w2, w3)
    out = x_down.new_empty((n_atoms, s, c3))
    if n_atoms == 0:
        return out
    tiles = tiles_of(n_atoms, tile_atoms)
    nt = tiles[0][1]
    wdt = weight_dtype(precision, x_down.dtype)
    proj = projection_precision(precision)
    # weights as the GEMMs' B operands, read in place through strided views (no copy per call;
    # bf16: one conversion each)
    w1_kt = w1.view(h1w, 2, b, c).permute(2, 1, 3, 0).to(wdt)  # (b, 2, C, H1)
    w2t, w3t = w2.t().to(wdt), w3.t().to(wdt)
    fsum = row_sums(from_grid)
    buf = Buffers(
        x_down, {"q": b * s * nt * h1w, "h1": g * nt * h1w, "h2": g * nt * h2w, "u": s * nt * h2w}
    )
    for z0, n in tiles:
        xd = x_down[z0 : z0 + n].transpose(0, 1)  # (S, n, C): rows (i, z)
        xn = x_new[z0 : z0 + n].transpose(0, 1)
        _, h1 = _first_layer(xd, xn, w1_kt, to_grid, b1, buf, n, s, g, b, h1w, precision)
        h2 = buf.get("h2", g * n, h2w)
        mm(h1.view(g * n, h1w), w2t, h2, bias=b2, epi=EPI_SILU, precision=precision)
        u = buf.get("u", s, n * h2w)
        mm(from_grid, h2.view(g, n * h2w), u, precision=proj)
        mm(
            u.view(s * n, h2w),
            w3t,
            out[z0 : z0 + n].transpose(0, 1),
            bias=b3,
            rowv=fsum,
            precision=precision,
        )
    return out


def grid_mlp_backward(
    grad_out: torch.Tensor,
    x_down: torch.Tensor,
    x_new: torch.Tensor,
    to_grid: torch.Tensor,
    from_grid: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
    tile_atoms: int,
    *,
    precision: str = "fp32",
) -> list[torch.Tensor]:
    """[dx_down, dx_new, dw1, db1, dw2, db2, dw3, db3], each tile's forward recomputed."""
    grad_out = grad_out.contiguous()
    device = check_inputs(
        dict(
            grad_out=grad_out, x_down=x_down, x_new=x_new, to_grid=to_grid, from_grid=from_grid,
            w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3,
        ),
        "grid",
    )  # fmt: skip
    gemm.check_precision(precision, x_down.dtype)
    n_atoms, s, c, g, b, h1w, h2w, c3 = _grid_sizes(x_down, to_grid, w2, w3)
    dx_down, dx_new = torch.empty_like(x_down), torch.empty_like(x_new)
    if n_atoms == 0:
        dw1 = x_down.new_zeros((h1w, h1w))
        return [dx_down, dx_new, dw1, torch.zeros_like(b1), torch.zeros_like(w2),
                torch.zeros_like(b2), torch.zeros_like(w3), torch.zeros_like(b3)]  # fmt: skip
    # weight gradients: written by the first tile's GEMMs, accumulated by the others (no fill);
    # dw1 in w1's own layout (H1, side, band, C): each (band, side) block is a strided view
    dw1 = x_down.new_empty((h1w, 2, b, c))
    dw2, dw3 = torch.empty_like(w2), torch.empty_like(w3)

    tiles = tiles_of(n_atoms, tile_atoms)
    nt = tiles[0][1]
    dtype = x_down.dtype
    wdt = weight_dtype(precision, dtype)
    proj = projection_precision(precision)
    w1_view = w1.view(h1w, 2, b, c)
    w1_kt = w1_view.permute(2, 1, 3, 0).to(wdt)  # (b, 2, C, H1), strided views (no copy)
    w1_k = w1_view.permute(2, 1, 0, 3).to(wdt)  # (b, 2, H1, C)
    w2g, w3g = w2.to(wdt), w3.to(wdt)
    w2t = w2g.t()
    fsum = row_sums(from_grid)
    to_grid_t, from_grid_t = to_grid.t(), from_grid.t()
    # db1: column sums of dA1 (G*n, H1); db2: of dA2 (G, n*H2), columns (z, h) folded to h.
    sums1 = ColumnSums(
        x_down, sum(gemm.row_blocks(g * n, h1w, dtype, precision) for _, n in tiles), h1w
    )
    sums2 = ColumnSums(
        x_down, sum(gemm.row_blocks(g, n * h2w, dtype, proj) for _, n in tiles), nt * h2w
    )
    buf = Buffers(
        x_down,
        {
            "q": b * s * nt * h1w,
            "h1": g * nt * h1w,
            "a1": g * nt * h1w,
            "h2": g * nt * h2w,
            "a2": g * nt * h2w,
            "u": s * nt * h2w,
            "du": s * nt * h2w,
        },
    )
    with cublas_scope(device, precision):
        for z0, n in tiles:
            first = z0 == 0
            rows = g * n
            xd = x_down[z0 : z0 + n].transpose(0, 1)
            xn = x_new[z0 : z0 + n].transpose(0, 1)
            # recompute the tile's forward, keeping the pre-activations
            a1 = buf.get("a1", g, n * h1w)
            q, h1 = _first_layer(
                xd, xn, w1_kt, to_grid, b1, buf, n, s, g, b, h1w, precision, pre=a1
            )
            a2, h2 = buf.get("a2", rows, h2w), buf.get("h2", rows, h2w)
            mm(h1.view(rows, h1w), w2t, h2, bias=b2, epi=EPI_SILU, pre=a2, precision=precision)
            # U in (atom, coefficient) row order: (n, S, H2), written through a permuted view
            u = buf.get("u", n, s, h2w)
            mm(from_grid, h2.view(g, n * h2w), u.permute(1, 0, 2).unsqueeze(0), precision=proj)
            # fc3 through the back-projection: out[z, i] = U[(z, i)] w3^T + fsum[i] b3
            go = grad_out[z0 : z0 + n]  # (n, S, C3), contiguous
            weight_grad(dw3, go.view(n * s, c3).t(), u.view(n * s, h2w), first)
            du = buf.get("du", s * n, h2w)
            mm(go.transpose(0, 1), w3g, du, precision=precision)  # rows (i, z)
            # dA2 = (F^T dU) * silu'(A2), into H2's buffer; its column sums -> db2
            da2 = h2
            mm(
                from_grid_t,
                du.view(s, n * h2w),
                da2.view(g, n * h2w),
                epi=EPI_DSILU,
                z=a2.view(g, n * h2w),
                colsum=sums2.take(gemm.row_blocks(g, n * h2w, dtype, proj)),
                precision=proj,
            )
            weight_grad(dw2, da2.t(), h1.view(rows, h1w), first)
            # dA1 = (dA2 w2) * silu'(A1), into H1's buffer; its column sums -> db1
            da1 = h1.view(rows, h1w)
            mm(
                da2,
                w2g,
                da1,
                epi=EPI_DSILU,
                z=a1.view(rows, h1w),
                colsum=sums1.take(gemm.row_blocks(rows, h1w, dtype, precision)),
                precision=precision,
            )
            # dQ = to_grid^T dA1 into Q's buffer, in (band, atom, coefficient) row order
            dq = q.view(b, n, s, h1w)
            mm(to_grid_t, da1.view(g, n * h1w), dq.permute(0, 2, 1, 3), precision=proj)
            for k in range(b):
                dq_k = dq[k].view(n * s, h1w)  # rows (z, i)
                for side, (x, dx) in enumerate(((x_down, dx_down), (x_new, dx_new))):
                    weight_grad(dw1[:, side, k], dq_k.t(), x[z0 : z0 + n].view(n * s, c), first)
                    mm(
                        dq_k,
                        w1_k[k, side],
                        dx[z0 : z0 + n].view(n * s, c),
                        accumulate=k > 0,
                        precision=precision,
                    )
    db3 = fsum @ grad_out.sum(0)
    return [dx_down, dx_new, dw1.view(h1w, h1w), sums1.total(), dw2, sums2.total(h2w), dw3, db3]
