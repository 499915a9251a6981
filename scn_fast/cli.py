"""The ``scn-fast`` command line.

``scn-fast predict [FILE]``: energies and forces of the structures in FILE (any ASE-readable file; all
frames), or of a built-in Cu(111)+CO slab when FILE is omitted, from a trained ``--checkpoint`` or a
randomly initialised model of a preset (default scn-t4-b2, seeded); ``--out`` writes extxyz,
``--relax`` relaxes (scn_fast/cli_tasks.py).

``scn-fast evaluate --checkpoint CKPT DATA``: S2EF metrics on a labelled dataset (scn_fast/cli_tasks.py).

``scn-fast train``: train SCN on an ASE file with energies and forces, or on the built-in EMT set
(``--data emt``), on one process or under ``torchrun`` (scn_fast/train.py; ``scn-fast train --help``).

``scn-fast make-dataset OUT``: write the built-in EMT set to a file in any dataset format (extxyz,
traj, ASE db, .aselmdb, OC20 .lmdb).

``scn-fast bench``: the benchmark suite, speed, memory and error of every path side by side against
the reference (scn_fast/benchmark; see ``scn-fast bench --help``).

``scn-fast bench-md``: MD throughput through the ASE calculator (scn_fast/benchmark/md.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .benchmark.cli import add_bench_parser
from .benchmark.md import add_md_parser
from .cli_tasks import add_evaluate_parser, add_predict_parser, add_train_data_options
from .presets import PRESETS


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from .train import TrainConfig, train

    names = set(TrainConfig.__dataclass_fields__)
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise SystemExit(f"scn-fast train: --out {cfg.out} is a file; --out names a directory")
    try:
        train(cfg)
    except (ValueError, OSError, NotImplementedError, FloatingPointError, ImportError) as exc:
        raise SystemExit(f"scn-fast train: {exc}") from exc
    return 0


def cmd_make_dataset(args: argparse.Namespace) -> int:
    from .datasets import emt_dataset, write_dataset

    try:
        structures = emt_dataset(n_structures=args.n, seed=args.seed)
        write_dataset(args.out, structures, lmdb_layout=args.lmdb_layout)
    except (ValueError, ImportError, FileExistsError) as exc:
        raise SystemExit(f"scn-fast make-dataset: {exc}") from exc
    natoms = [len(a) for a in structures]
    print(
        f"wrote {len(structures)} EMT-labelled slabs ({min(natoms)}-{max(natoms)} atoms, "
        f"seed {args.seed}) to {args.out}"
    )
    return 0


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``make-dataset``."""
    from .datasets import DEFAULT_EMT_SIZE
    from .train import TrainConfig

    d = TrainConfig(data="", out="", steps=0)  # defaults
    p = sub.add_parser("train", help="train SCN (fairchem's S2EF recipe; DDP under torchrun)")
    p.add_argument(
        "--data",
        required=True,
        help="labelled dataset (extxyz, traj, ASE db, .aselmdb, OC20 .lmdb file or folder), or 'emt'",
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", help=f"model preset: {sorted(PRESETS)}")
    model.add_argument(
        "--model-config", help="YAML: SCN kwargs or fairchem's {model: {name: scn, ...}}"
    )
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="global batch (all ranks together)"
    )
    p.add_argument("--lr", type=float, default=d.lr, help="initial learning rate (lr_initial)")
    p.add_argument("--seed", type=int, default=d.seed, help="weights and data-order seed")
    p.add_argument("--out", required=True, help="output directory (DIR/checkpoint.pt)")
    p.add_argument(
        "--deterministic-frames",
        action="store_true",
        help="edge frames as a function of the edge direction (batch- and rank-independent)",
    )
    p.add_argument("--energy-coefficient", type=float, default=d.energy_coefficient)
    p.add_argument("--force-coefficient", type=float, default=d.force_coefficient)
    p.add_argument(
        "--amsgrad",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="AdamW with amsgrad (default on, as upstream's SCN configs)",
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--warmup-factor", type=float, default=d.warmup_factor)
    p.add_argument(
        "--lr-milestones", type=int, nargs="*", default=[], help="steps where lr *= lr_gamma"
    )
    p.add_argument("--lr-gamma", type=float, default=d.lr_gamma)
    p.add_argument(
        "--clip-grad-norm", type=float, default=d.clip_grad_norm, help="0 switches it off"
    )
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="0 switches EMA off")
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="CHECKPOINT",
        help="continue from DIR/checkpoint.pt (or the given checkpoint) up to --steps",
    )
    p.add_argument(
        "--checkpoint-every", type=int, default=0, help="also save every N steps (0: at the end)"
    )
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--use-fused", action="store_true", help="use fused kernels where available")
    p.add_argument("--precision", default="fp32", help="the model's precision mode (default fp32)")
    add_train_data_options(p)
    p.set_defaults(func=cmd_train)

    m = sub.add_parser("make-dataset", help="write the built-in EMT-labelled slab set to a file")
    m.add_argument(
        "out",
        help="output file, format from the extension (emt.extxyz, .traj, .db, .aselmdb, .lmdb)",
    )
    m.add_argument(
        "--lmdb-layout",
        choices=("pyg", "legacy", "dict"),
        default="pyg",
        help="OC20 .lmdb records: torch_geometric>=2 Data (pyg), 1.x Data (legacy) or plain dicts",
    )
    m.add_argument(
        "--n", type=int, default=DEFAULT_EMT_SIZE, help=f"structures (default {DEFAULT_EMT_SIZE})"
    )
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_make_dataset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scn-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_predict_parser(sub)
    add_evaluate_parser(sub)
    add_train_parser(sub)
    add_bench_parser(sub)
    add_md_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
