"""Which tensors are alive at the peak of one inference call: a live-storage census.

    python bench/memory_breakdown.py --natoms 100 --preset scn-t4-b2 --fused [--threads 1]

Every tensor an operator returns during the call (aten ops, the ``scn_fast::*`` custom ops, the
workspaces they allocate from Python) is tracked by its storage until the storage is freed; at the
largest total the live storages are listed, largest first, with the operator and shape that made
them. Weights, inputs and anything else allocated before the call are not counted; temporaries a
C++ op allocates and frees inside itself are not seen. Prints one JSON line.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from memory_setup import model_and_slab, slab_parser
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveStorages(TorchDispatchMode):
    """Tracks the storages operators return; records the live set at the peak of their total."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.skip = skip
        self.live: dict[int, tuple[StorageWeakRef, int, str, tuple]] = {}
        self.total = 0
        self.peak = 0
        self.at_peak: list[tuple[int, str, tuple]] = []
        self.peak_op = ""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        if isinstance(func, torch._ops.OpOverload) and func.namespace == "scn_fast":
            name = f"scn_fast::{name}"
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self.skip and key not in self.live and st.nbytes() > 0:
                    self.live[key] = (StorageWeakRef(st), st.nbytes(), name, tuple(t.shape))
                    self.total += st.nbytes()
        for key in [k for k, v in self.live.items() if v[0].expired()]:
            self.total -= self.live.pop(key)[1]
        if self.total > self.peak:
            self.peak = self.total
            self.peak_op = name
            self.at_peak = sorted(((v[1], v[2], v[3]) for v in self.live.values()), reverse=True)
        return out


def main() -> None:
    p = slab_parser(__doc__)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    model, atoms, data = model_and_slab(args)
    with torch.no_grad():
        model(data)  # warm: constants and backend choices made outside the census
    held = [*model.parameters(), *model.buffers()]
    mode = LiveStorages({t.untyped_storage().data_ptr() for t in held})
    start = time.perf_counter()
    with torch.no_grad(), mode:
        model(data)
    n = len(atoms)
    print(
        json.dumps(
            {
                "preset": args.preset,
                "path": "fused" if args.fused else "reference",
                "atoms": n,
                "seconds": round(time.perf_counter() - start, 2),
                "peak_live_gb": round(mode.peak / 2**30, 4),
                "peak_live_kb_per_atom": round(mode.peak / 1024 / n, 1),
                "peak_after_op": mode.peak_op,
                "largest_at_peak": [
                    {"mb": round(b / 2**20, 2), "op": op, "shape": list(shape)}
                    for b, op, shape in mode.at_peak[: args.top]
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
