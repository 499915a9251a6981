"""Triton launchers of the sphere-sample output heads (``scn_fast::output_heads``).

Per tile of ``n`` atoms (math in ``scn_fast/ops/output_heads.py``), with sample rows ordered
(point, atom) so that every projection is one 2-D GEMM; all heads' first layers run as one GEMM:

    Q    = x^T-tile  [w1_0; w1_1; ...]^T                   (S*n, D1)
    H1   = silu(sh @ Q + b1)                               (P, n*D1) = (P*n, D1)
    H2_k = silu(H1[:, head k] w2_k^T + b2_k)               (P*n, d2_k)
    R_k  = (V_k / P)^T H2_k                                (d_k, n*d2_k): point sums before fc3
    out_k[z, j] = R_k[(j, z)] w3_k^T + b3_k sum_p V_k[p, j] / P

The backward recomputes each tile's forward. Its fc3 gradient is an outer product: with g the
tile's output gradient (n, d_k), ``dA2_k = ((V_k / P) g^T)[p, z] w3_k[h] * silu'(A2_k)``, one rank-1
GEMM with the SiLU-derivative epilogue (no (d_k, n, d2) temporary). ``R_k`` and ``dQ`` are written
in (atom, .) row order, so the weight-gradient GEMMs read ``grads`` and ``x`` as plain views.
``db1``/``db2`` are GEMM-epilogue column sums reduced once per call; ``db3`` is computed once.
Precision as in ``kernels/tile_loop.py``.
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
    tiles_of,
    weight_dtype,
    weight_grad,
)

__all__ = ["sphere_heads_backward", "sphere_heads_forward"]


def _heads_sizes(x, sh, weights, point_weights):
    n_atoms, s, c = x.shape
    p = sh.shape[0]
    heads = len(point_weights)
    d1 = [weights[6 * k].shape[0] for k in range(heads)]
    d2 = [weights[6 * k + 2].shape[0] for k in range(heads)]
    dout = [v.shape[1] for v in point_weights]
    off = [sum(d1[:k]) for k in range(heads)]
    return n_atoms, s, c, p, heads, d1, d2, dout, off, sum(d1)


def _check_heads(x, sh, weights, point_weights, precision) -> torch.device:
    if len(weights) != 6 * len(point_weights) or not point_weights:
        raise ValueError("weights must hold (w1, b1, w2, b2, w3, b3) per head")
    named = {"x": x, "sh": sh}
    named.update({f"weights[{i}]": w for i, w in enumerate(weights)})
    named.update({f"point_weights[{i}]": v for i, v in enumerate(point_weights)})
    device = check_inputs(named, "output-head")
    gemm.check_precision(precision, x.dtype)
    return device


def sphere_heads_forward(
    x: torch.Tensor,
    sh: torch.Tensor,
    weights: list[torch.Tensor],
    point_weights: list[torch.Tensor],
    tile_atoms: int,
    *,
    precision: str = "fp32",
) -> list[torch.Tensor]:
    """[out_k (N, d_k)]: out_k[z, j] = (1/P) sum_p V_k[p, j] mlp_k((sh x_z)[p]) (module doc)."""
    _check_heads(x, sh, weights, point_weights, precision)
    n_atoms, s, _, p, heads, d1, d2, dout, off, d1_all = _heads_sizes(x, sh, weights, point_weights)
    outs = [x.new_empty((n_atoms, d)) for d in dout]
    if n_atoms == 0:
        return outs
    tiles = tiles_of(n_atoms, tile_atoms)
    nt = tiles[0][1]
    wdt = weight_dtype(precision, x.dtype)
    proj = projection_precision(precision)
    w1cat_t = torch.cat([weights[6 * k] for k in range(heads)]).t().to(wdt)  # (C, D1), a view
    b1cat = torch.cat([weights[6 * k + 1] for k in range(heads)])
    vs = [v / p for v in point_weights]
    vs_t = [v.t() for v in vs]
    vsum = [v.sum(0) for v in vs]
    w2t = [weights[6 * k + 2].t().to(wdt) for k in range(heads)]  # strided B operands
    w3t = [weights[6 * k + 4].t().to(wdt) for k in range(heads)]  # (D2, 1)
    buf = Buffers(
        x,
        {
            "q": s * nt * d1_all,
            "h1": p * nt * d1_all,
            "h2": p * nt * max(d2),
            "r": max(dout) * nt * max(d2),
        },
    )
    for z0, n in tiles:
        q = buf.get("q", s * n, d1_all)
        mm(x[z0 : z0 + n].transpose(0, 1), w1cat_t, q, precision=precision)
        h1 = buf.get("h1", p, n * d1_all)
        mm(
            sh,
            q.view(s, n * d1_all),
            h1,
            bias=b1cat,
            bias_period=d1_all,
            epi=EPI_SILU,
            precision=proj,
        )
        h1r = h1.view(p * n, d1_all)
        for k in range(heads):
            h2 = buf.get("h2", p * n, d2[k])
            mm(
                h1r[:, off[k] : off[k] + d1[k]],
                w2t[k],
                h2,
                bias=weights[6 * k + 3],
                epi=EPI_SILU,
                precision=precision,
            )
            r = buf.get("r", dout[k], n * d2[k])
            mm(vs_t[k], h2.view(p, n * d2[k]), r, precision=proj)
            dst = outs[k][z0 : z0 + n].t().unsqueeze(2)  # (d_k, n, 1)
            mm(
                r.view(dout[k] * n, d2[k]),
                w3t[k],
                dst,
                bias=weights[6 * k + 5],
                rowv=vsum[k],
                precision=precision,
            )
    return outs


def sphere_heads_backward(
    grads: list[torch.Tensor],
    x: torch.Tensor,
    sh: torch.Tensor,
    weights: list[torch.Tensor],
    point_weights: list[torch.Tensor],
    tile_atoms: int,
    *,
    precision: str = "fp32",
) -> list[torch.Tensor]:
    """[dx, then dw1, db1, dw2, db2, dw3, db3 per head], each tile's forward recomputed."""
    device = _check_heads(x, sh, weights, point_weights, precision)
    grads = [gr.contiguous() for gr in grads]
    n_atoms, s, c, p, heads, d1, d2, dout, off, d1_all = _heads_sizes(x, sh, weights, point_weights)
    dx = torch.empty_like(x)
    if n_atoms == 0:
        return [dx, *(torch.zeros_like(w) for w in weights)]
    # every gradient is written once below (the weight GEMMs' by the first tile): no fills
    dws = [torch.empty_like(w) for w in weights]
    tiles = tiles_of(n_atoms, tile_atoms)
    nt = tiles[0][1]
    dtype = x.dtype
    wdt = weight_dtype(precision, dtype)
    proj = projection_precision(precision)
    w1cat = torch.cat([weights[6 * k] for k in range(heads)])  # (D1, C)
    w1cat_g = w1cat.to(wdt)
    w1cat_t = w1cat_g.t()  # a strided B operand (no copy)
    b1cat = torch.cat([weights[6 * k + 1] for k in range(heads)])
    dw1cat = torch.empty_like(w1cat)
    vs = [v / p for v in point_weights]
    vs_t = [v.t() for v in vs]
    vsum = [v.sum(0) for v in vs]
    w2g = [weights[6 * k + 2].to(wdt) for k in range(heads)]
    w2t = [w.t() for w in w2g]
    w3g = [weights[6 * k + 4].to(wdt) for k in range(heads)]  # (1, D2)
    # db1: column sums of dA1 (P*n, D1) (all heads share its row blocks); db2_k: of dA2_k.
    sums1 = ColumnSums(
        x, sum(gemm.row_blocks(p * n, d1_all, dtype, precision) for _, n in tiles), d1_all
    )
    sums2 = [
        ColumnSums(x, sum(gemm.row_blocks(p * n, d2[k], dtype, precision) for _, n in tiles), d2[k])
        for k in range(heads)
    ]
    buf = Buffers(
        x,
        {
            "q": s * nt * d1_all,
            "h1": p * nt * d1_all,
            "a1": p * nt * d1_all,
            "dh1": p * nt * d1_all,
            "h2": p * nt * max(d2),
            "a2": p * nt * max(d2),
            "r": max(dout) * nt * max(d2),
            "vg": p * nt,
        },
    )
    sh_t = sh.t()
    with cublas_scope(device, precision):
        for z0, n in tiles:
            first = z0 == 0
            rows = p * n
            xt = x[z0 : z0 + n].transpose(0, 1)
            q = buf.get("q", s * n, d1_all)
            mm(xt, w1cat_t, q, precision=precision)
            h1, a1 = buf.get("h1", p, n * d1_all), buf.get("a1", p, n * d1_all)
            mm(sh, q.view(s, n * d1_all), h1, bias=b1cat, bias_period=d1_all, epi=EPI_SILU,
               pre=a1, precision=proj)  # fmt: skip
            h1r, a1r = h1.view(rows, d1_all), a1.view(rows, d1_all)
            da1 = buf.get("dh1", rows, d1_all)
            slot1 = sums1.take(gemm.row_blocks(rows, d1_all, dtype, precision))
            for k in range(heads):
                cols = slice(off[k], off[k] + d1[k])
                h2, a2 = buf.get("h2", rows, d2[k]), buf.get("a2", rows, d2[k])
                mm(h1r[:, cols], w2t[k], h2, bias=weights[6 * k + 3], epi=EPI_SILU, pre=a2,
                   precision=precision)  # fmt: skip
                # R_k in (atom, output) row order (n, d_k, D2), written through a permuted view
                r = buf.get("r", n, dout[k], d2[k])
                mm(vs_t[k], h2.view(p, n * d2[k]), r.permute(1, 0, 2).unsqueeze(0), precision=proj)
                gk = grads[k][z0 : z0 + n]  # (n, d_k), contiguous
                dw3 = dws[6 * k + 4].view(-1)
                if first:
                    torch.mv(r.view(n * dout[k], d2[k]).t(), gk.view(-1), out=dw3)
                else:
                    dw3.addmv_(r.view(n * dout[k], d2[k]).t(), gk.view(-1))
                # dA2 = ((V/P) g^T)[p, z] w3[h] * silu'(A2): a rank-1 GEMM, into H2's buffer
                vg = buf.get("vg", p, n)
                mm(vs[k], gk.t(), vg, precision=proj)
                da2 = h2
                mm(
                    vg.view(rows, 1),
                    w3g[k],
                    da2,
                    epi=EPI_DSILU,
                    z=a2,
                    colsum=sums2[k].take(gemm.row_blocks(rows, d2[k], dtype, precision)),
                    precision=precision,
                )
                weight_grad(dws[6 * k + 2], da2.t(), h1r[:, cols], first)
                mm(da2, w2g[k], da1[:, cols], epi=EPI_DSILU, z=a1r[:, cols],
                   colsum=slot1[:, cols], precision=precision)  # fmt: skip
            # dQ = sh^T dA1 into Q's buffer, in (atom, coefficient) row order (n, S, D1)
            dq = q.view(n, s, d1_all)
            mm(sh_t, da1.view(p, n * d1_all), dq.permute(1, 0, 2).unsqueeze(0), precision=proj)
            dq_r = dq.view(n * s, d1_all)
            weight_grad(dw1cat, dq_r.t(), x[z0 : z0 + n].view(n * s, c), first)
            mm(dq_r, w1cat_g, dx[z0 : z0 + n].view(n * s, c), precision=precision)
    db1cat = sums1.total()
    for k in range(heads):
        dws[6 * k].copy_(dw1cat[off[k] : off[k] + d1[k]])
        dws[6 * k + 1].copy_(db1cat[off[k] : off[k] + d1[k]])
        dws[6 * k + 3] = sums2[k].total()
        b3 = weights[6 * k + 5]  # one output per point: the bias gradient is one number
        dws[6 * k + 5] = (grads[k].sum(0) * vsum[k]).sum().reshape(b3.shape).to(b3.dtype)
    return [dx, *dws]
