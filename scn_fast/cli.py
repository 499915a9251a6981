"""The ``scn-fast`` command line.

``scn-fast predict [FILE]``: energies and forces of the structures in FILE (any ASE-readable file; all
frames), or of a built-in Cu(111)+CO slab when FILE is omitted, from a randomly initialised model of a
preset (default scn-t4-b2, seeded).

``scn-fast bench``: the benchmark suite, speed, memory and error of every path side by side against
the reference (scn_fast/benchmark; see ``scn-fast bench --help``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from .benchmark.cli import add_bench_parser
from .presets import PRESETS, preset


def _load_structures(path: str | None) -> list:
    if path is None:
        from .systems import cu111_co

        return [cu111_co()]
    import ase.io

    try:
        frames = ase.io.read(path, index=":")
    except FileNotFoundError:
        raise SystemExit(f"scn-fast: no such file: {path}") from None
    except Exception as exc:  # ASE raises many types for unreadable files
        raise SystemExit(f"scn-fast: cannot read {path} with ASE: {exc}") from None
    return frames if isinstance(frames, list) else [frames]


def cmd_predict(args: argparse.Namespace) -> int:
    from . import AtomsBatch, SphericalChannelNetwork

    structures = _load_structures(args.file)
    torch.manual_seed(args.seed)
    model = SphericalChannelNetwork(
        **preset(args.preset),
        use_fused=args.use_fused,
        deterministic_frames=args.deterministic_frames,
    ).to(args.device)
    model.eval()
    data = AtomsBatch.from_ase(structures, device=args.device)
    name = args.file or "built-in Cu(111)+CO slab"
    print(
        f"scn-fast predict: {name}: {len(structures)} structure(s), {int(data.natoms.sum())} atoms; "
        f"model {args.preset} (random weights, seed {args.seed}, {model.num_params:,} parameters) "
        f"on {args.device}"
    )
    start = time.perf_counter()
    with torch.no_grad():
        out = model(data)
    elapsed = time.perf_counter() - start
    offset = 0
    for k, atoms in enumerate(structures):
        n = len(atoms)
        print(
            f"\nstructure {k}: {atoms.get_chemical_formula()}  energy = {out['energy'][k].item():.6f}"
        )
        if "forces" in out:
            print(f"  {'atom':>4} {'Z':>3} {'fx':>12} {'fy':>12} {'fz':>12}")
            forces = out["forces"][offset : offset + n].cpu()
            for i, (z, f) in enumerate(zip(atoms.get_atomic_numbers(), forces, strict=True)):
                print(
                    f"  {i:>4} {z:>3} {f[0].item():>12.4e} {f[1].item():>12.4e} {f[2].item():>12.4e}"
                )
        offset += n
    print(
        f"\nforward took {elapsed:.3f} s; backends: "
        + ", ".join(f"{op}={rec['ran']}" for op, rec in model.explain().items() if rec["ran"])
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scn-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="energies and forces of structures (default: built-in slab)")
    p.add_argument("file", nargs="?", help="ASE-readable structure file (all frames are used)")
    p.add_argument("--preset", default="scn-t4-b2", choices=sorted(PRESETS))
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and frames")
    p.add_argument("--device", default="cpu")
    p.add_argument("--use-fused", action="store_true", help="use fused kernels where available")
    p.add_argument("--deterministic-frames", action="store_true")
    p.set_defaults(func=cmd_predict)
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
