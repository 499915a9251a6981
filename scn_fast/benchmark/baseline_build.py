"""Building a point's correctness baseline inside the point process (the choice: ``baseline.py``).

``build_baseline`` runs, before any path is timed:

* ``reference-fp32``: the float32 reference's forward under ``torch.no_grad()`` with forward hooks
  on its nn.Linear layers (its outputs are the baseline, its GEMM shapes give the floors), then a
  float64 copy of it (same weights, same deterministic frames) for ``u``, the reference's own
  float32 force error. With ``check_fused_fp64`` also the fused path in float64 against that
  float64 reference (``baseline_check``: does the other baseline agree with this one here?).
* ``fused-fp64``: the fused path in float64 (``backend="auto"``), its outputs the baseline; a
  float64 training step for the parameter gradients when ``baseline_grads`` is "fused-fp64"; then,
  if ``reference_forward``, the float32 reference's forward (hooks, u against the float64 fused
  outputs). Its model is released before anything is timed.

Outputs of the float64 baseline stay float64; the comparisons (``tolerance.py``) run in float64.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from ..data import AtomsBatch
from ..model import SphericalChannelNetwork
from .errors import first_line, free_device_memory
from .floor import GemmCall, record_gemm_calls
from .models import grads_of, new_model
from .paths import make_step
from .tolerance import TOLERANCES, energy_error, force_error


@dataclass
class Baseline:
    """A point's baseline. ``outputs``: what every path is checked against; ``label``: the records'
    ``error_baseline``; ``u``: the reference's float32 force error (None: unknown) and ``u_note``
    where it came from; ``ref_errors``: (energy, force) errors of the float32 reference's forward
    against float64 (its own record's errors), ``ref_label`` their baseline; ``grads``: baseline
    parameter gradients in upstream's layout (fused-fp64 training), else None; ``calls``: the
    reference's GEMM calls (None: it did not run, no floors); ``check``: fused float64 against the
    float64 reference at this point; ``backend``: what ran the float64 fused path."""

    name: str
    outputs: dict[str, torch.Tensor]
    label: str
    u: float | None = None
    u_note: str | None = None
    ref_errors: tuple[float | None, float | None] = (None, None)
    ref_label: str | None = None
    grads: dict[str, torch.Tensor | None] | None = None
    calls: list[GemmCall] | None = None
    check: dict[str, Any] | None = None
    backend: str | None = None


def _clone(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in out.items()}


def _fused64(
    preset: str, ref: SphericalChannelNetwork, device: torch.device
) -> SphericalChannelNetwork:
    m = new_model(preset, fused=True, backend="auto", precision="fp32")
    m.load_state_dict(ref.state_dict())
    return m.to(device=device, dtype=torch.float64)


def _ran(model: SphericalChannelNetwork) -> str | None:
    entry = model.explain().get("edge_rotation")
    return entry.get("ran") if isinstance(entry, dict) else None


def _errors(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> tuple[float, float]:
    f = force_error(out["forces"], base["forces"]) if "forces" in base else 0.0
    return energy_error(out["energy"], base["energy"]), f


def _reference_forward(ref: SphericalChannelNetwork, data: AtomsBatch):
    with record_gemm_calls(ref) as calls, torch.no_grad():
        out = _clone(ref(data))
    return out, calls


def build_baseline(
    name: str,
    preset: str,
    ref: SphericalChannelNetwork,
    data: AtomsBatch,
    *,
    reference_forward: bool = True,
    baseline_grads: str | None = None,
    check_fused_fp64: bool = False,
    u_carried: tuple[float, int] | None = None,
    log=print,
) -> Baseline:
    """The baseline ``name`` of one point (module doc). ``u_carried``: (u, natoms) measured at a
    smaller point, used when the float32 reference does not run here. Raises what the baseline's
    own steps raise (out of memory: nothing can be checked)."""
    device = data.pos.device
    data64 = data.to(dtype=torch.float64)
    if name == "reference-fp32":
        base, calls = _reference_forward(ref, data)
        log(f"float32 reference done ({len(calls)} nn.Linear calls)")
        b = Baseline(name, base, "float32 reference", calls=calls, ref_label="float64 reference")
        try:
            m64 = copy.deepcopy(ref).double()
            with torch.no_grad():
                o64 = m64(data64)
            del m64
            b.ref_errors = _errors(base, o64)
            b.u = b.ref_errors[1] if "forces" in base else None
        except Exception as exc:
            free_device_memory(device)
            b.u_note = f"float64 reference unavailable ({first_line(exc)})"
            return b
        log(f"float64 reference done (u = {b.u})")
        if check_fused_fp64:
            b.check = _check_fused_fp64(preset, ref, data64, o64, device)
            log(f"float64 fused path vs float64 reference: {b.check}")
        return b
    if name != "fused-fp64":
        raise ValueError(f"unknown baseline {name!r}")
    m64 = _fused64(preset, ref, device)
    with torch.no_grad():
        o64 = _clone(m64(data64))
    backend = _ran(m64)
    log(f"float64 fused path done ({backend})")
    grads = None
    if baseline_grads == "fused-fp64":
        make_step(m64, list(m64.parameters()), "training", data64)()
        grads = {k: None if g is None else g.float() for k, g in grads_of(m64).items()}
        log("float64 fused training step done")
    del m64
    free_device_memory(device)
    b = Baseline(
        name,
        o64,
        f"float64 fused path ({backend})",
        grads=grads,
        backend=backend,
        ref_label=f"float64 fused path ({backend})",
    )
    if reference_forward:
        base32, b.calls = _reference_forward(ref, data)
        b.ref_errors = _errors(base32, o64)
        b.u = b.ref_errors[1] if "forces" in o64 else None
        b.u_note = "u: the float32 reference against the float64 fused path, this point"
        log(f"float32 reference done (u = {b.u})")
    elif u_carried is not None:
        b.u = u_carried[0]
        b.u_note = f"u measured with the reference at {u_carried[1]} atoms"
    else:
        b.u_note = "u unknown (the reference does not run here): the table's floor alone"
    return b


def _check_fused_fp64(
    preset: str,
    ref: SphericalChannelNetwork,
    data64: AtomsBatch,
    o64: dict[str, torch.Tensor],
    device: torch.device,
) -> dict[str, Any]:
    """The float64 fused path against the float64 reference (the ``fused_fp64`` row)."""
    tol = TOLERANCES["fused_fp64"]
    try:
        m = _fused64(preset, ref, device)
        with torch.no_grad():
            out = m(data64)
        backend = _ran(m)
        del m
    except Exception as exc:
        free_device_memory(device)
        return {"passed": None, "reason": f"not checked: {first_line(exc)}"}
    e, f = _errors(out, o64)
    passed = e <= tol.energy and f <= tol.force
    return {
        "what": f"float64 fused path ({backend}) vs float64 reference",
        "energy_err_rel": e,
        "max_force_err_rel": f,
        "limits": [tol.energy, tol.force],
        "passed": passed,
    }
