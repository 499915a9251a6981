"""The time memory bounds cost, A/B in one process: edge chunks (inference) or activation
checkpointing (training).

    python bench/memory_budget_ab.py --natoms 486 --fused --threads 2 --memory-budget auto \
        [--rounds 3] [--training]

One model, one slab; each round runs A then B back to back, so machine load hits both alike:
inference, A unchunked (``memory_budget=None``) and B with ``--memory-budget``; ``--training``, one
training step (forward, loss on energy and forces, backward) with ``--memory-budget``, A with
``activation_checkpointing="off"`` and B with "edges". Prints one JSON line: the chunks per
resolution, every round's seconds, the minima, their ratio (B / A) and the spread of each side
(max / min - 1; a spread above 10% marks the run noisy). Outputs are compared too (max |dE|,
max |dF| / max |F|): chunks change only GEMM row blocking, checkpointing nothing.
"""

from __future__ import annotations

import json
import time

import torch
from memory_setup import memory_budget, model_and_slab, slab_parser


def main() -> None:
    p = slab_parser(__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--training", action="store_true")
    args = p.parse_args()
    model, atoms, data = model_and_slab(args)
    budget = memory_budget(args.memory_budget)
    if args.training:
        model.train()
        sides = {"plain": (budget, "off"), "checkpointed": (budget, "edges")}
    else:
        sides = {"unchunked": (None, "off"), "chunked": (budget, "off")}
    a, b = sides
    times: dict[str, list[float]] = {k: [] for k in sides}
    outs = {}
    for _ in range(args.rounds):
        for name, (budget_, ckpt) in sides.items():
            model.memory_budget, model.activation_checkpointing = budget_, ckpt
            start = time.perf_counter()
            with torch.set_grad_enabled(args.training):
                out = model(data)
                if args.training:
                    (out["energy"].square().sum() + out["forces"].square().sum()).backward()
            times[name].append(time.perf_counter() - start)
            outs[name] = {k: v.detach() for k, v in out.items()}
            model.zero_grad(set_to_none=True)
    _, ctx = model.prepare(data, grad=False)
    chunks = [len(ctx.chunks(r) or [None]) for r in range(len(ctx.bounds) - 1)]
    best = {k: min(v) for k, v in times.items()}
    spread = {k: max(v) / min(v) - 1 for k, v in times.items()}
    f_ref = outs[a]["forces"]
    record = {
        "preset": args.preset,
        "atoms": len(atoms),
        "threads": torch.get_num_threads(),
        "mode": "training" if args.training else "inference",
        "budget": args.memory_budget,
        "chunks_per_resolution": chunks,
        "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "min_seconds": {k: round(v, 2) for k, v in best.items()},
        "ratio": f"{b} / {a}",
        "ratio_value": round(best[b] / best[a], 4),
        "spread": {k: round(v, 3) for k, v in spread.items()},
        "noisy": any(v > 0.10 for v in spread.values()),
        "max_abs_energy_diff": float((outs[b]["energy"] - outs[a]["energy"]).abs().max()),
        "max_force_diff_rel": float((outs[b]["forces"] - f_ref).abs().max() / f_ref.abs().max()),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
