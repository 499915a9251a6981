"""Time and peak resident memory of one inference call on a Cu(111)+CO slab of about N atoms.

    python bench/memory_probe.py --natoms 100 --preset scn-t4-b2 --fused [--threads 2] [--profile]
        [--memory-budget auto|none|BYTES] [--checkpoint auto|edges|off] [--training]

Run one size per process: the peak RSS (``ru_maxrss``) of a process only grows. Prints one JSON
line: atoms, edges per resolution, seconds of the call, RSS before the call (model and inputs
built), peak RSS, the plan's memory report (edge chunks, checkpointing), and with ``--profile``
the largest allocations by operator (torch.profiler, ``profile_memory``; the profiled call is a
second, slower one). ``--training``: one training step instead (forward, a loss on energy and
forces, backward into the parameters' gradients).
"""

from __future__ import annotations

import json
import resource
import time

import torch
from memory_setup import model_and_slab, slab_parser


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def chunk_counts(model, data) -> list[int]:
    """Edge chunks per resolution of the plan ``model`` ran (1: unchunked)."""
    _, ctx = model.prepare(data, grad=False)
    return [len(ctx.chunks(r) or [None]) for r in range(len(ctx.bounds) - 1)]


def main() -> None:
    p = slab_parser(__doc__)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--training", action="store_true")
    args = p.parse_args()
    model, atoms, data = model_and_slab(args)
    if args.training:
        model.train()
    st = model.read_input(data)
    graph = model.generate_graph(data, st)
    ctx = model.edge_context(st, graph)
    counts = [hi - lo for lo, hi in zip(ctx.bounds[:-1], ctx.bounds[1:], strict=True)]
    before = _rss_gb()
    start = time.perf_counter()
    if args.training:
        out = model(data)
        loss = out["energy"].square().sum() + out["forces"].square().sum()
        loss.backward()
        del out, loss
    else:
        with torch.no_grad():
            model(data)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    record = {
        "preset": args.preset,
        "path": "fused" if args.fused else "reference",
        "atoms": len(atoms),
        "edges_per_resolution": counts,
        "threads": torch.get_num_threads(),
        "seconds": round(seconds, 2),
        "rss_before_gb": round(before, 3),
        "peak_rss_gb": round(peak, 3),
        "mode": "training" if args.training else "inference",
        "backends": {k: v["ran"] for k, v in model.explain().items()},
        "memory_plan": model.explain()["memory"]["variant"],
        "chunks_per_resolution": chunk_counts(model, data),
    }
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with (
            torch.no_grad(),
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
            model(data)
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_memory_usage)
        record["allocations_gb_by_op"] = {
            e.key: round(e.self_cpu_memory_usage / 2**30, 3)
            for e in rows[:15]
            if e.self_cpu_memory_usage > 0
        }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
