"""The ``scn-fast predict`` and ``scn-fast evaluate`` subcommands and the dataset / validation options
of ``scn-fast train`` (scn_fast/cli.py registers them).

``scn-fast predict [FILE] [--checkpoint CKPT] [--out OUT.extxyz] [--relax ...]``: energies and forces
of every frame of FILE (default: a built-in Cu(111)+CO slab), from a trained checkpoint or a preset's
random weights; batched; written as extxyz with the results attached, or relaxed.

``scn-fast evaluate --checkpoint CKPT DATA [--out metrics.json]``: S2EF metrics of a checkpoint on a
labelled dataset (any format ``scn_fast.datasets.open_dataset`` reads), with throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from .presets import PRESETS

DEFAULT_PRESET = "scn-t4-b2"


def _fail(command: str, exc: BaseException) -> SystemExit:
    return SystemExit(f"scn-fast {command}: {exc}")


def load_inference_model(args: argparse.Namespace) -> tuple[Any, str]:
    """(eval-mode model, description) for ``--checkpoint`` (EMA weights when stored, physical
    units, frames a function of the edge direction) or ``--preset`` with random weights."""
    from .checkpoint import load_checkpoint
    from .model import SphericalChannelNetwork
    from .presets import preset

    if getattr(args, "checkpoint", None):
        model = load_checkpoint(
            args.checkpoint,
            map_location=args.device,
            use_fused=args.use_fused,
            precision=args.precision,
            deterministic_frames=True,
            otf_graph=True,
        )
        return model, f"checkpoint {args.checkpoint} ({model.num_params:,} parameters)"
    name = args.preset or DEFAULT_PRESET
    torch.manual_seed(args.seed)
    model = SphericalChannelNetwork(
        **preset(name),
        use_fused=args.use_fused,
        deterministic_frames=args.deterministic_frames,
        precision=args.precision,
    ).to(args.device)
    model.eval()
    return model, (
        f"model {name} (random weights, seed {args.seed}, {model.num_params:,} parameters)"
    )


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu")
    p.add_argument("--use-fused", action="store_true", help="use fused kernels where available")
    p.add_argument("--precision", default="fp32", help="the model's precision mode (default fp32)")


def _add_batch_options(p: argparse.ArgumentParser, batch_size: int) -> None:
    p.add_argument(
        "--batch-size", type=int, default=batch_size, help=f"structures per batch ({batch_size})"
    )
    p.add_argument(
        "--max-atoms-per-batch",
        type=int,
        help="also cap each batch's atoms (consecutive structures packed up to this budget)",
    )


# ----------------------------------------------------------------------------- predict


def _print_structure(k: int, atoms: Any, with_forces: bool) -> None:
    energy = atoms.calc.results["energy"]
    print(f"\nstructure {k}: {atoms.get_chemical_formula()}  energy = {energy:.6f}")
    if not with_forces:
        return
    print(f"  {'atom':>4} {'Z':>3} {'fx':>12} {'fy':>12} {'fz':>12}")
    forces = atoms.calc.results["forces"]
    for i, (z, f) in enumerate(zip(atoms.get_atomic_numbers(), forces, strict=True)):
        print(f"  {i:>4} {z:>3} {f[0]:>12.4e} {f[1]:>12.4e} {f[2]:>12.4e}")


def _trajectory_dir(out: str) -> str:
    stem, _ = os.path.splitext(out)
    return f"{stem}_trajectories"


def _read_input(path: str) -> list[Any]:
    """Every structure of ``path`` as ``ase.Atoms``: ASE-readable files directly, the LMDB formats
    (``*.lmdb``, ``*.aselmdb`` or a folder of them) through ``open_dataset``."""
    from .data import read_frames

    if os.path.isdir(path) or path.lower().endswith((".lmdb", ".aselmdb")):
        from .datasets import open_dataset

        dataset = open_dataset(path, "file")
        return [dataset.atoms(i) for i in range(len(dataset))]
    return read_frames(path)


def cmd_predict(args: argparse.Namespace) -> int:
    """``scn-fast predict``: see the module docstring."""
    import ase.io

    from .predict import predict_frames, relax_frames

    if args.checkpoint and args.preset:
        raise SystemExit("scn-fast predict: give --checkpoint or --preset, not both")
    if args.relax and not args.out:
        raise SystemExit("scn-fast predict: --relax needs --out FILE for the relaxed structures")
    try:
        if args.file is None:
            from .systems import cu111_co

            frames = [cu111_co()]
        else:
            frames = _read_input(args.file)
        model, what = load_inference_model(args)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise _fail("predict", exc) from None
    name = args.file or "built-in Cu(111)+CO slab"
    print(
        f"scn-fast predict: {name}: {len(frames)} structure(s), "
        f"{sum(len(a) for a in frames)} atoms; {what} on {args.device}"
    )
    start = time.perf_counter()
    try:
        if args.relax:
            traj_dir = _trajectory_dir(args.out)
            results = relax_frames(
                model,
                frames,
                fmax=args.fmax,
                steps=args.steps,
                optimizer=args.optimizer,
                trajectory_dir=traj_dir,
            )
        else:
            results = predict_frames(model, frames, args.batch_size, args.max_atoms_per_batch)
    except ValueError as exc:
        raise _fail("predict", exc) from None
    elapsed = time.perf_counter() - start
    for k, atoms in enumerate(results):
        _print_structure(k, atoms, with_forces=not args.out)
        if args.relax:
            print(
                f"  relaxed in {atoms.info['relax_steps']} step(s) ({args.optimizer}), "
                f"converged={atoms.info['converged']}"
            )
    if args.out:
        ase.io.write(args.out, results, format="extxyz")
        print(f"\nwrote {len(results)} structure(s) with energies and forces to {args.out}")
        if args.relax:
            print(f"trajectories: {_trajectory_dir(args.out)}/structure_K.traj")
    ran = ", ".join(f"{op}={rec['ran']}" for op, rec in model.explain().items() if rec.get("ran"))
    verb = "relaxation" if args.relax else "prediction"
    print(f"\n{verb} took {elapsed:.3f} s; backends: {ran}")
    return 0


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``predict``."""
    p = sub.add_parser(
        "predict", help="energies and forces (or relaxations) of structures (default: a slab)"
    )
    p.add_argument(
        "file",
        nargs="?",
        help="structure file: anything ASE reads (all frames), .aselmdb or OC20 .lmdb",
    )
    p.add_argument("--checkpoint", help="trained checkpoint (EMA weights; results in eV, eV/Å)")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help=f"without --checkpoint: random weights of this preset (default {DEFAULT_PRESET})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and frames")
    p.add_argument(
        "--deterministic-frames",
        action="store_true",
        help="random-weights model: frames as a function of the edge direction (always on with "
        "--checkpoint)",
    )
    _add_model_options(p)
    _add_batch_options(p, 16)
    p.add_argument("--out", help="write the structures with results attached (extxyz)")
    p.add_argument("--relax", action="store_true", help="relax each structure (FixAtoms kept)")
    p.add_argument("--fmax", type=float, default=0.05, help="relaxation force criterion (eV/Å)")
    p.add_argument("--steps", type=int, default=200, help="most relaxation steps per structure")
    p.add_argument("--optimizer", choices=("BFGS", "FIRE"), default="BFGS")
    p.set_defaults(func=cmd_predict)


# ----------------------------------------------------------------------------- evaluate


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``scn-fast evaluate``: see the module docstring."""
    from .datasets import open_dataset
    from .evaluate import evaluate_model, format_metrics

    try:
        model, what = load_inference_model(args)
        dataset = open_dataset(args.data)
        print(
            f"scn-fast evaluate: {args.data}: {len(dataset)} structure(s); {what} on {args.device}"
        )
        sums, timing = evaluate_model(
            model,
            dataset,
            batch_size=args.batch_size,
            max_atoms=args.max_atoms_per_batch,
            progress=not args.no_progress,
        )
        metrics = sums.result()
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise _fail("evaluate", exc) from None
    print(format_metrics(metrics) + f" forces_l2mae={metrics['forces_l2mae']:.6g}")
    print(
        f"{metrics['num_structures']} structures, {metrics['num_atoms']} atoms in "
        f"{timing['seconds']:.2f} s: {timing['structures_per_s']:.1f} structures/s, "
        f"{timing['atoms_per_s']:.0f} atoms/s"
    )
    if args.out:
        report = {
            "checkpoint": args.checkpoint,
            "data": args.data,
            "metrics": metrics,
            "throughput": timing,
            "device": str(args.device),
            "batch_size": args.batch_size,
            "max_atoms_per_batch": args.max_atoms_per_batch,
            "use_fused": args.use_fused,
            "precision": args.precision,
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``evaluate``."""
    p = sub.add_parser("evaluate", help="S2EF metrics of a checkpoint on a labelled dataset")
    p.add_argument("data", help="dataset: extxyz, traj, ASE db, .aselmdb, OC20 .lmdb (or folder)")
    p.add_argument("--checkpoint", required=True, help="trained checkpoint (EMA weights)")
    p.add_argument("--out", help="write the metrics and throughput as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_options(p)
    _add_batch_options(p, 16)
    p.set_defaults(func=cmd_evaluate)


# ----------------------------------------------------------------------------- train options


def add_train_data_options(p: argparse.ArgumentParser) -> None:
    """``scn-fast train``'s batching and validation options (fields of ``TrainConfig``)."""
    p.add_argument(
        "--max-atoms-per-batch",
        type=int,
        help="pack each process's batch up to this many atoms (--batch-size then caps structures)",
    )
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-data", help="labelled validation dataset (any --data format)")
    val.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="hold out this share of --data for validation (seeded by --seed)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="validate the EMA weights every N steps (0: at the end only); writes DIR/metrics.csv "
        "and DIR/best_checkpoint.pt (best validation force MAE)",
    )
