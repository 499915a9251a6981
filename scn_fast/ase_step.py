"""One energy-and-forces evaluation of ``ase.Atoms`` for the ASE calculator, timed and with reuse.

An MD step changes the positions and (usually) nothing else, so ``StepRunner`` keeps, from one call
to the next, what depends only on the rest: the atomic numbers, structure index, atom counts, pbc
and cell tensors on the model's device (rebuilt when the atoms' numbers, cell or pbc change), a
pinned host buffer for the positions on CUDA, and, with bucketing (``scn_fast.bucketing``), the
current capacity. The model's own constants (Wigner and grid matrices, tap tables, dispatcher
decisions, the applied GEMM precision) are cached by the model per dtype and device already.

Every call records its time split in ``timings`` (seconds, the last call) and adds it to
``totals`` (with ``calls``):

* ``transfer``: Atoms -> tensors on the device, and forces and energy back to the host;
* ``graph``: input checks, the radius graph and edge vectors, and padding when bucketing;
* ``model``: the interaction blocks and heads (edge ranking, frames and rotations included);
* ``total``: the whole call.

On CUDA each boundary synchronises the device, so the split is the device time of each part.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch

from .bucketing import Bucketer, BucketPolicy, Capacity, pad_graph, resolution_counts
from .data import AtomsBatch, relative_positions

TIMING_KEYS = ("transfer", "graph", "model", "total")


def denormalize(model: Any, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Outputs in physical units: out * rmsd + mean per ``model.normalizers`` (as ``predict``)."""
    for key, norm in model.normalizers.items():
        if key in out:
            out[key] = out[key] * norm["rmsd"] + norm["mean"]
    return out


class StepRunner:
    """Energy (eV) and forces (eV/Å, float64 numpy) of one ``ase.Atoms`` per call, through
    ``model.forward_graph``. bucketing: False, True (default ``BucketPolicy``) or a policy."""

    def __init__(self, model: Any, bucketing: bool | BucketPolicy = False) -> None:
        self.model = model
        if isinstance(bucketing, BucketPolicy):
            self.bucketer: Bucketer | None = Bucketer.for_model(model, bucketing)
        elif bucketing is True:
            self.bucketer = Bucketer.for_model(model)
        elif bucketing is False:
            self.bucketer = None
        else:
            raise TypeError(f"bucketing must be a bool or a BucketPolicy, got {bucketing!r}")
        self.timings: dict[str, float] = dict.fromkeys(TIMING_KEYS, 0.0)
        self.totals: dict[str, float] = {**dict.fromkeys(TIMING_KEYS, 0.0), "calls": 0}
        self.last_shape: tuple[int, int] | None = None
        """(atoms, edges) the model saw in the last call (padded, when bucketing)."""
        self.last_real_shape: tuple[int, int] | None = None
        """(atoms, edges) of the last call's system itself."""
        self.last_capacity: Capacity | None = None
        self._key: tuple | None = None
        self._fixed: dict[str, torch.Tensor] = {}
        self._pos_host: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.model.sphere_embedding.weight.device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _inputs(self, atoms: Any) -> AtomsBatch:
        """The AtomsBatch of atoms on the model's device, reusing every tensor but the positions
        while the numbers, cell and pbc stay the same."""
        dtype, device = self.model.dtype, self.device
        numbers = np.asarray(atoms.get_atomic_numbers())
        cell = np.asarray(atoms.get_cell()[:], dtype=np.float64)
        pbc = np.asarray(atoms.get_pbc(), dtype=bool)
        key = (numbers.tobytes(), cell.tobytes(), pbc.tobytes(), dtype, device)
        if key != self._key:
            n = len(numbers)
            self._fixed = {
                "cell": torch.as_tensor(cell[None], dtype=dtype).to(device),
                "atomic_numbers": torch.as_tensor(numbers, dtype=torch.long).to(device),
                "natoms": torch.tensor([n], dtype=torch.long).to(device),
                "batch": torch.zeros(n, dtype=torch.long).to(device),
                "pbc": torch.as_tensor(pbc[None]).to(device),
            }
            self._pos_host = None
            self._key = key
        # relative to the mean position, in float64 before the cast (as AtomsBatch.from_ase)
        pos64 = torch.as_tensor(np.asarray(atoms.get_positions(), dtype=np.float64))
        pos = relative_positions(pos64, torch.tensor([pos64.shape[0]]))[0].to(dtype)
        if device.type == "cuda":
            if self._pos_host is None:
                self._pos_host = torch.empty(pos.shape, dtype=dtype).pin_memory()
            self._pos_host.copy_(pos)
            pos = self._pos_host.to(device, non_blocking=True)
        return AtomsBatch(pos=pos, **self._fixed)

    def __call__(self, atoms: Any) -> tuple[float, np.ndarray]:
        """(energy, forces (N, 3) float64) of atoms."""
        model = self.model
        t0 = time.perf_counter()
        data = self._inputs(atoms)
        self._sync()
        t1 = time.perf_counter()
        st = model.read_input(data)
        with warnings.catch_warnings():
            # a model loaded with otf_graph=False builds its graph here all the same
            warnings.filterwarnings("ignore", message="otf_graph=False but data has no edge_index")
            graph = model.generate_graph(data, st)
        padded = None
        self.last_real_shape = (st.pos.shape[0], graph.edge_index.shape[1])
        if self.bucketer is not None:
            counts = resolution_counts(graph.edge_index[1], st.pos.shape[0], self.bucketer.caps)
            capacity = self.bucketer.choose(st.pos.shape[0], counts)
            padded = pad_graph(st, graph, capacity, self.bucketer.caps, model.cutoff)
            st, graph = padded.structure, padded.graph
            self.last_capacity = capacity
        self.last_shape = (st.pos.shape[0], graph.edge_index.shape[1])
        self._sync()
        t2 = time.perf_counter()
        with torch.no_grad():
            out = model.forward_graph(st, graph)
            if padded is not None:
                out = padded.unpad(out)
            out = denormalize(model, out)
        self._sync()
        t3 = time.perf_counter()
        energy = float(out["energy"][0])
        forces = out["forces"].detach().to("cpu", torch.float64).numpy()
        t4 = time.perf_counter()
        self.timings = {"transfer": (t1 - t0) + (t4 - t3), "graph": t2 - t1, "model": t3 - t2}
        self.timings["total"] = t4 - t0
        for k in TIMING_KEYS:
            self.totals[k] += self.timings[k]
        self.totals["calls"] += 1
        return energy, forces

    def reset_totals(self) -> None:
        """Zero ``totals`` (e.g. after warm-up steps)."""
        self.totals = {**dict.fromkeys(TIMING_KEYS, 0.0), "calls": 0}
