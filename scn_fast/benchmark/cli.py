"""``scn-fast bench``: the end-to-end benchmark suite (register with ``add_bench_parser``).

    scn-fast bench [--device cpu|cuda] [--preset NAME ...] [--mode inference training] [--quick]
                   [--large] [--natoms LIST] [--out DIR] [--repeats N] [--baseline NAME]
                   [--mem-available-gb GB] [--point-minutes M] [...]

``--quick``: scn-t4-b2 and tiny (``--preset`` narrows or replaces them), the 14-atom Cu(111)+CO slab,
inference and training, the reference vs every fused backend, float32, 3 repeats after 1 warm-up;
under 10 minutes on a 2-core CPU. Without ``--quick`` the run states its expected duration first (the
CPU default stays under 30 minutes on 2 cores: tiny, scn-t1-b1, scn-t4-b2 at 14 and 38 atoms).
``--large``: the size sweep (scn-t4-b2 at 38, 200, 500, 1,000 and 2,000 atoms on CPU, float32;
``--natoms``, ``--preset`` and ``--precision`` change it): each point's plan and the estimated duration first, then per point the
time, activation memory, the point's peak RSS and atoms x steps per second, and a markdown table
(``large_table.md``) and time / memory plots against atoms with the reference's out-of-memory point
marked.

Every point chooses its correctness baseline from an estimate of its memory and time
(``--baseline auto``): the float32 reference (and its float64 copy) where they fit, else the fused
path in float64; reference paths that would not fit or finish are recorded ``skipped`` with the
estimate, and repeats are cut to fit ``--point-minutes``.
Exit status 1 when any path is ``wrong`` (outside its tolerance), else 0.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..presets import PRESETS
from .records import MODES


def _paths_arg(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def configure_bench_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``bench`` options to ``p`` and set ``func``."""
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--preset",
        nargs="+",
        choices=sorted(PRESETS),
        metavar="NAME",
        help=f"presets to run (default: per device; with --quick: scn-t4-b2 tiny); {sorted(PRESETS)}",
    )
    p.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--quick", action="store_true", help="one small size, float32, few repeats")
    p.add_argument(
        "--large",
        action="store_true",
        help="size sweep up to what fits (default scn-t4-b2 at 38,200,500,1000,2000 atoms on CPU): "
        "plan and duration first; markdown table and time/memory plots vs atoms",
    )
    p.add_argument(
        "--natoms",
        metavar="LIST",
        help="comma-separated system sizes: N (one slab of about N atoms) or BxN (a batch of B), "
        "e.g. 14,38,6x38,500 (default: 14,38 on CPU; up to 4000 on CUDA)",
    )
    p.add_argument("--out", default="bench-out", help="output directory (default ./bench-out)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per path (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per path (default 1)")
    p.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "tf32", "bf16"),
        help="precisions (default: all the device supports; --quick: fp32)",
    )
    p.add_argument(
        "--paths",
        type=_paths_arg,
        metavar="LIST",
        help="explicit paths instead of the default (reference + every fused backend the "
        "dispatcher accepts), e.g. reference,extension,reference+compile",
    )
    comp = p.add_mutually_exclusive_group()
    comp.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="include torch.compile of the reference (default on CUDA only)",
    )
    comp.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument(
        "--compile-timeout",
        type=float,
        default=900.0,
        metavar="S",
        help="limit on compiling the torch.compile path, per mode (default 900 s)",
    )
    p.add_argument(
        "--mem-limit-gb",
        type=float,
        metavar="GB",
        help="address-space limit of each CPU point process (default: physical memory)",
    )
    p.add_argument(
        "--max-minutes", type=float, metavar="M", help="start no new size point after M minutes"
    )
    p.add_argument("--threads", type=int, metavar="N", help="torch intra-op threads per point")
    p.add_argument(
        "--baseline",
        default="auto",
        choices=("auto", "reference-fp32", "fused-fp64"),
        help="what each path is checked against (default auto: the float32 reference where it and "
        "its float64 copy fit in memory and time, else the fused path in float64)",
    )
    p.add_argument(
        "--mem-available-gb",
        type=float,
        metavar="GB",
        help="memory the estimates may plan for (default: the machine's available memory at "
        "each point's start; CUDA: 90%% of the device's)",
    )
    p.add_argument(
        "--point-minutes",
        type=float,
        metavar="M",
        help="time budget of one point: repeats are cut to fit it and a reference that would "
        "take longer is not run (default 20 on CPU, 10 on CUDA; 0: none)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)
    return p


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``scn-fast`` subparsers object (``parser.add_subparsers(...)``)."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark the reference vs fused paths (speed, memory, correctness)",
        description=__doc__.split("\n\n")[0],
    )
    return configure_bench_parser(p)


def suite_config(args: argparse.Namespace):
    """The SuiteConfig of parsed ``bench`` arguments."""
    from .runner import SuiteConfig, quick_config
    from .systems import parse_sizes

    kw = {
        "device": args.device,
        "modes": list(args.mode),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "out": args.out,
        "compile_timeout_s": args.compile_timeout,
        "max_minutes": args.max_minutes,
        "progress": not args.no_progress,
        "threads": args.threads,
        "large": args.large,
        "baseline": args.baseline,
        "point_minutes": args.point_minutes,
    }
    if args.quick and args.large:
        raise SystemExit("scn-fast bench: --quick and --large exclude each other")
    if args.mem_available_gb is not None:
        kw["mem_available_bytes"] = int(args.mem_available_gb * 1e9)
    if args.repeats < 1:
        raise SystemExit("scn-fast bench: --repeats must be at least 1")
    if args.natoms:
        kw["sizes"] = [s.label for s in parse_sizes(args.natoms)]
    if args.precision:
        kw["precisions"] = list(args.precision)
    if args.paths:
        kw["paths"] = args.paths
    if args.compile is not None:
        kw["compile"] = args.compile
    if args.mem_limit_gb is not None:
        kw["mem_limit_bytes"] = int(args.mem_limit_gb * 1e9)
    if args.quick:
        return quick_config(args.preset, **kw)
    return SuiteConfig(presets=args.preset, **kw)


def cmd_bench(args: argparse.Namespace) -> int:
    from .runner import run_suite

    results = run_suite(suite_config(args))
    bad = [r for r in results["records"] if r["status"] == "wrong"]
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scn_fast.benchmark.cli ...`` (the same options as ``scn-fast bench``)."""
    parser = configure_bench_parser(argparse.ArgumentParser(prog="scn-fast bench"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    import sys

    sys.exit(main())
