"""Correctness gates of the benchmark: the tolerance table of docs/tolerances.md and the comparisons.

Energy error: max over structures of |dE| / max(1, |E_ref|). Force error: max |dF| / max |F_ref|.
Force cosine: the cosine between the flattened force arrays. Gradient error: the largest, over parameter
tensors, of ||g - g_ref||_2 / ||g_ref||_2 (a tensor whose reference gradient is zero must be zero too).

Every path is compared against the point's baseline (``baseline.py``) on the same system, with the same
weights and the same deterministic frames: the float32 reference, or, where the reference does not fit,
the fused path in float64. ``u``, the reference's own float32 force error against float64 measured in
the same run, widens the fused float32 force limit to max(5e-5, 5u), as in the table. The ``fused_fp64``
row checks the float64 fused baseline against the float64 reference where both run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """One row of the table: limits on energy error, force error (max(force, force_u_factor * u)),
    minimum force cosine, and parameter-gradient error (None: not checked)."""

    name: str
    energy: float
    force: float
    force_u_factor: float = 0.0
    force_cosine: float | None = None
    grad: float | None = None

    def force_limit(self, u: float | None) -> float:
        return max(self.force, self.force_u_factor * u) if u is not None else self.force


TOLERANCES: dict[str, Tolerance] = {
    "fused_fp32": Tolerance("fused, float32", 1e-5, 5e-5, force_u_factor=5.0, grad=1e-3),
    "reference_fp32": Tolerance("reference, float32", 1e-5, 2e-5, force_u_factor=3.0),
    "compile_fp32": Tolerance("torch.compile vs eager", 1e-5, 2e-4),
    "fused_fp64": Tolerance("fused, float64", 1e-9, 1e-8),
    "tf32": Tolerance("tf32", 5e-4, 0.05, force_cosine=0.999),
    "bf16": Tolerance("bf16", 2e-3, 0.20, force_cosine=0.99),
}


def tolerance_for(path_kind: str, precision: str) -> Tolerance:
    """The row for a path kind ("reference", "fused", "compile") at ``precision``."""
    if precision in ("tf32", "bf16"):
        return TOLERANCES[precision]
    return TOLERANCES[f"{path_kind}_fp32"]


def energy_error(e: torch.Tensor, ref: torch.Tensor) -> float:
    """max |dE| / max(1, |E_ref|) over structures."""
    e, ref = e.detach().double().cpu(), ref.detach().double().cpu()
    return ((e - ref).abs() / ref.abs().clamp(min=1.0)).max().item()


def force_error(f: torch.Tensor, ref: torch.Tensor) -> float:
    """max |dF| / max |F_ref|."""
    f, ref = f.detach().double().cpu(), ref.detach().double().cpu()
    scale = ref.abs().max().item()
    diff = (f - ref).abs().max().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def force_cosine(f: torch.Tensor, ref: torch.Tensor) -> float:
    f, ref = f.detach().double().cpu().flatten(), ref.detach().double().cpu().flatten()
    return torch.nn.functional.cosine_similarity(f, ref, dim=0).item()


def grad_error(grads: dict[str, torch.Tensor | None], ref: dict[str, torch.Tensor | None]) -> float:
    """Largest per-tensor relative L2 error of parameter gradients (inf if their sets differ)."""
    worst = 0.0
    for name, g_ref in ref.items():
        g = grads.get(name)
        if (g is None) != (g_ref is None):
            return math.inf
        if g is None or g_ref is None:
            continue
        diff = (g.double().cpu() - g_ref.double().cpu()).norm().item()
        scale = g_ref.double().norm().item()
        err = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
        worst = max(worst, err)
    return worst


@dataclass
class Check:
    """Errors of one path against the float32 reference and whether they pass ``tol``."""

    energy_err: float
    force_err: float
    force_cos: float
    grad_err: float | None
    force_limit: float
    passed: bool
    reason: str | None


def check_outputs(
    out: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    tol: Tolerance,
    u: float | None = None,
    grads: dict[str, torch.Tensor | None] | None = None,
    ref_grads: dict[str, torch.Tensor | None] | None = None,
) -> Check:
    """Compare energy/forces (and parameter gradients when both are given) against the reference."""
    e_err = energy_error(out["energy"], ref["energy"])
    f_err = force_error(out["forces"], ref["forces"]) if "forces" in ref else 0.0
    cos = force_cosine(out["forces"], ref["forces"]) if "forces" in ref else 1.0
    g_err = grad_error(grads, ref_grads) if grads is not None and ref_grads is not None else None
    limit = tol.force_limit(u)
    reasons = []
    if not e_err <= tol.energy:
        reasons.append(f"energy error {e_err:.3g} > {tol.energy:g}")
    if not f_err <= limit:
        reasons.append(f"force error {f_err:.3g} > {limit:.3g}")
    if tol.force_cosine is not None and not cos >= tol.force_cosine:
        reasons.append(f"force cosine {cos:.6f} < {tol.force_cosine}")
    if tol.grad is not None and g_err is not None and not g_err <= tol.grad:
        reasons.append(f"parameter gradient error {g_err:.3g} > {tol.grad:g}")
    reason = f"outside the {tol.name} tolerance: " + "; ".join(reasons) if reasons else None
    return Check(e_err, f_err, cos, g_err, limit, not reasons, reason)
