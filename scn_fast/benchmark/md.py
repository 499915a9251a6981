"""``scn-fast bench-md``: molecular-dynamics throughput through the ASE calculator.

For each slab size (default 14, 200 and 1,000 atoms: Cu(111)+CO slabs, ``scn_fast.systems``), a
randomly initialised model of a preset drives ``ase.md.verlet.VelocityVerlet`` (1 fs step, velocities
drawn at 300 K, seeded) through ``SCNCalculator``. After ``warmup`` steps, ``steps`` steps are timed:

* steps per second, and the ns/day it equals at a 1 fs time step (steps/s x 86,400 s/day x 1e-6
  ns/fs), and atoms x steps per second;
* the per-step split from the calculator's ``timing_totals`` (transfer, graph, model) and what the
  ASE integrator itself adds (the step's wall time minus the calculator's);
* the distinct (atoms, edges) shapes the model saw (with ``--bucketing``: the padded ones);
* the process's CPU seconds over the timed steps (all threads): on a shared, loaded machine the
  wall-clock rate measures the load as much as the model, and CPU time per step is the steadier
  number.

The weights are random, so the trajectory is not physical; the cost per step is that of a trained
model of the same preset (the same shapes and operations). Records go to stdout as a table and,
with ``--out``, to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

DEFAULT_SIZES = (14, 200, 1000)
NS_PER_DAY_PER_STEP_PER_S = 86400 * 1e-6  # ns/day at 1 fs per step, per step/s


@dataclass
class MDRecord:
    """One size's MD measurement (times in seconds unless named otherwise)."""

    preset: str
    path: str
    bucketing: bool
    system: str
    atoms: int
    edges: int
    device: str
    threads: int
    warmup: int
    steps: int
    seconds: float
    steps_per_s: float
    cpu_seconds: float
    ns_per_day_at_1fs: float
    atom_steps_per_s: float
    per_step_ms: dict[str, float] = field(default_factory=dict)
    shapes: list[list[int]] = field(default_factory=list)
    commit: str | None = None


def _sig(x: float) -> float:
    """x to 6 significant digits (records stay readable at any rate)."""
    return float(f"{x:.6g}")


def md_system(natoms: int, seed: int = 0) -> tuple[str, Any]:
    """(name, Atoms): the 14-atom Cu(111)+CO slab (2x2x3) for 14, else ``slab_of_size(natoms)``."""
    from ..systems import cu111_co, slab_of_size

    if natoms == 14:
        return "cu111_co 2x2x3", cu111_co(size=(2, 2, 3), seed=seed)
    atoms = slab_of_size(natoms, seed=seed)
    return f"cu111_co slab ~{natoms}", atoms


def _thermalize(atoms: Any, temperature_k: float, seed: int) -> None:
    """Maxwell-Boltzmann momenta at temperature_k (a seeded draw)."""
    from ase import units

    rng = np.random.default_rng(seed)
    masses = atoms.get_masses()[:, None]
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * np.sqrt(units.kB * temperature_k * masses))


def run_md(
    model: Any,
    atoms: Any,
    *,
    steps: int,
    warmup: int = 1,
    bucketing: bool = False,
    temperature_k: float = 300.0,
    timestep_fs: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Run warmup + steps VelocityVerlet steps of atoms with model through SCNCalculator; the timed
    part's seconds, per-step split (ms) and the shapes the model saw."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from ..ase import SCNCalculator

    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    calc = SCNCalculator(model, bucketing=bucketing)
    atoms.calc = calc
    _thermalize(atoms, temperature_k, seed)
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    shapes: set[tuple[int, int]] = set()
    dyn.attach(lambda: shapes.add(calc.runner.last_shape), interval=1)
    atoms.get_forces()  # the first force call belongs to the warm-up
    if warmup:
        dyn.run(warmup)
    edges = calc.runner.last_real_shape[1]
    calc.runner.reset_totals()
    shapes.clear()
    start, cpu_start = time.perf_counter(), time.process_time()
    dyn.run(steps)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    totals = calc.timing_totals
    calls = max(int(totals["calls"]), 1)
    split = {k: 1e3 * totals[k] / calls for k in ("transfer", "graph", "model")}
    split["calculator"] = 1e3 * totals["total"] / calls
    split["ase_and_other"] = 1e3 * seconds / steps - split["calculator"]
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "edges": edges,
        "per_step_ms": {k: _sig(v) for k, v in split.items()},
        "shapes": sorted([list(s) for s in shapes]),
        "calls": calls,
    }


def md_benchmark(
    preset_name: str = "scn-t4-b2",
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    steps: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    use_fused: bool = True,
    bucketing: bool = False,
    seed: int = 0,
    echo: bool = True,
) -> list[MDRecord]:
    """One ``MDRecord`` per size (module docstring)."""
    from ..model import SphericalChannelNetwork
    from ..presets import preset
    from .env import device_name, git_state

    records = []
    for natoms in sizes:
        torch.manual_seed(seed)
        model = SphericalChannelNetwork(
            **preset(preset_name), use_fused=use_fused, deterministic_frames=True
        ).to(device)
        name, atoms = md_system(natoms, seed)
        if echo:
            print(
                f"bench-md: {preset_name} {'fused' if use_fused else 'reference'}, {name} "
                f"({len(atoms)} atoms), {warmup} warm-up + {steps} timed steps ...",
                flush=True,
            )
        res = run_md(model, atoms, steps=steps, warmup=warmup, bucketing=bucketing, seed=seed)
        rate = steps / res["seconds"]
        rec = MDRecord(
            preset=preset_name,
            path="fused" if use_fused else "reference",
            bucketing=bucketing,
            system=name,
            atoms=len(atoms),
            edges=res["edges"],
            device=device_name(device),
            threads=torch.get_num_threads(),
            warmup=warmup,
            steps=steps,
            seconds=_sig(res["seconds"]),
            steps_per_s=_sig(rate),
            cpu_seconds=_sig(res["cpu_seconds"]),
            ns_per_day_at_1fs=_sig(rate * NS_PER_DAY_PER_STEP_PER_S),
            atom_steps_per_s=_sig(rate * len(atoms)),
            per_step_ms=res["per_step_ms"],
            shapes=res["shapes"],
            commit=git_state()[0],
        )
        if echo:
            print("  " + format_record(rec), flush=True)
        records.append(rec)
    return records


def format_record(rec: MDRecord) -> str:
    """One line: atoms, rates and the per-step split."""
    ms = rec.per_step_ms
    return (
        f"{rec.atoms:>5} atoms {rec.edges:>6} edges  {rec.steps_per_s:9.3f} steps/s  "
        f"({rec.cpu_seconds / rec.steps:.2f} CPU s/step)  "
        f"{rec.ns_per_day_at_1fs:9.5f} ns/day@1fs  {rec.atom_steps_per_s:10.1f} atom-steps/s  "
        f"per step: model {ms['model']:.1f} ms, graph {ms['graph']:.1f} ms, transfer "
        f"{ms['transfer']:.2f} ms, ASE+other {ms['ase_and_other']:.2f} ms; "
        f"{len(rec.shapes)} shape(s)"
    )


def add_md_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench-md`` on the ``scn-fast`` subparsers object."""
    from ..presets import PRESETS

    p = subparsers.add_parser(
        "bench-md",
        help="MD throughput (VelocityVerlet through the ASE calculator): steps/s, ns/day at 1 fs",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--preset", default="scn-t4-b2", choices=sorted(PRESETS))
    p.add_argument(
        "--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="slab sizes (atoms)"
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per size (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per size (default 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reference", action="store_true", help="the reference path (default: fused)")
    p.add_argument(
        "--bucketing", action="store_true", help="pad to capacities (scn_fast.bucketing)"
    )
    p.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the records to this JSON file")
    p.set_defaults(func=cmd_bench_md)
    return p


def cmd_bench_md(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    records = md_benchmark(
        args.preset,
        args.sizes,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        use_fused=not args.reference,
        bucketing=args.bucketing,
        seed=args.seed,
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump([asdict(r) for r in records], f, indent=1)
        print(f"bench-md: records written to {args.out}")
    return 0
