"""A GPU cost model of one SCN step, on paper: FLOPs, bytes moved and kernel launches per path and
precision, and the step times they predict on an H100 / H200 (``docs/gpu.md`` prints its tables).

Nothing here is measured: the work is derived from the shapes of a configuration (``Shapes``: scn-t4-b2
by default, about 40 edges per atom, 12 at the first resolution and 28 at the second) and the
devices' peak rates. Every operation of one interaction block is listed per path as an :class:`Op`
with its FLOPs (2 m k n per GEMM), its HBM traffic (each operand read once, each result written once,
``itemsize`` bytes per number) and its launches (ATen ops or Triton kernels). A training step adds
the backward: twice the forward's GEMM FLOPs, bytes and launches per op (plus, for the grid tile loops,
which recompute their forward, the forward once more). Then per op a roofline,
``max(flops / (peak * GEMM_EFF), bytes / (bandwidth * BW_EFF))``, summed over the step, gives the
device time; the host time is the launches times the per-launch cost of eager PyTorch / Triton; the
step takes the larger of the two (the host queues kernels ahead of the device).

Paths: "reference" (upstream's dense math: a repeat of the node features per tap, dense Wigner bmm,
the (N*G, 2bC) grid tensor), "triton" and "extension" (the fused ops: compact rotation once per
edge, the tap symmetry, the grid MLP in tiles of ``kernels/tiling.py``'s size). Precisions: fp32 (FMA
units), tf32 and bf16 (tensor cores; the reference keeps its rotations and grid projections in float32
on FMA units, the fused paths run them in tf32). Known omissions: graph construction and the edge
frames / Wigner rows (``prepare``), the optimizer, the output heads' backward (small).

The numbers are estimates (+-50%); ``docs/gpu.md`` says how to check each line on a GPU. The
launches of the Triton path are also *recorded* from the code that runs on the GPU
(``scn_fast.launches``, :data:`RECORDED_LAUNCHES`); :func:`launch_table` sets both side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "DEVICES",
    "RECORDED_LAUNCHES",
    "Device",
    "Op",
    "Shapes",
    "StepCost",
    "block_ops",
    "breakdown_table",
    "heads_ops",
    "launch_table",
    "markdown_table",
    "step_cost",
]

# Kernel launches of one Triton-path step of scn-t4-b2 on the built-in Cu slab of each size, recorded
# on a CPU machine by ``python -m scn_fast.launches`` (``scn_fast.launches.record_table``: the CUDA
# plan, the model's forward and backward and the launchers' tile loops run on meta tensors; every
# Triton launch and every ATen op that launches a kernel is counted). (mode, precision, atoms) ->
# (Triton launches, ATen launches). tests/test_launch_count.py checks the fp32 training entries.
RECORDED_LAUNCHES: dict[tuple[str, str, int], tuple[int, int]] = {
    ("training", "fp32", 100): (772, 687),
    ("inference", "fp32", 100): (288, 190),
    ("training", "tf32", 100): (772, 687),
    ("inference", "tf32", 100): (288, 190),
    ("training", "bf16", 100): (496, 2181),
    ("inference", "bf16", 100): (192, 862),
    ("training", "fp32", 1000): (772, 687),
    ("inference", "fp32", 1000): (288, 190),
    ("training", "tf32", 1000): (772, 687),
    ("inference", "tf32", 1000): (288, 190),
    ("training", "bf16", 1000): (496, 2181),
    ("inference", "bf16", 1000): (192, 862),
    ("training", "fp32", 2000): (1000, 759),
    ("inference", "fp32", 2000): (288, 190),
    ("training", "tf32", 2000): (1000, 759),
    ("inference", "tf32", 2000): (288, 190),
    ("training", "bf16", 2000): (724, 2253),
    ("inference", "bf16", 2000): (192, 862),
}

# Fractions of peak that big GEMMs and streaming kernels reach (cuBLAS / Triton on Hopper).
GEMM_EFF = {"fma": 0.70, "tc": 0.60}
BW_EFF = 0.75
# Host time per launch: an eager ATen op (Python, dispatcher, cudaLaunchKernel) and a Triton launch.
HOST_S = {"aten": 8e-6, "triton": 15e-6}


@dataclass(frozen=True)
class Device:
    """Dense peak FLOP/s per precision ("fp32" on FMA units, "tf32" / "bf16" tensor cores) and HBM
    bandwidth (bytes/s)."""

    name: str
    peak: dict
    bandwidth: float


DEVICES = {
    "H100": Device("H100 SXM", {"fp32": 67e12, "tf32": 495e12, "bf16": 990e12}, 3.35e12),
    "H200": Device("H200 SXM", {"fp32": 67e12, "tf32": 495e12, "bf16": 990e12}, 4.8e12),
}


@dataclass(frozen=True)
class Shapes:
    """The sizes of one step (scn-t4-b2 defaults): per resolution (lmax, hidden, edges per atom,
    which may be fractional)."""

    atoms: int
    blocks: int = 12
    channels: int = 128
    basis: int = 128
    gaussians: int = 400
    mmax: int = 1
    taps: int = 4
    resolutions: tuple = ((6, 1024, 12), (4, 256, 28))
    lmax: int = 6
    bands: int = 2
    points: int = 128

    @property
    def edges(self) -> float:
        return sum(e for _, _, e in self.resolutions) * self.atoms

    @property
    def grid_points(self) -> int:
        return 2 * (self.lmax + 1) * (2 * self.lmax + 3)


@dataclass(frozen=True)
class Op:
    """One operation of a block: ``flops`` (GEMM FLOPs), ``elems`` (numbers moved through HBM),
    ``launches``, ``engine`` ("aten" or "triton"), ``kind``: "linear" (a weight GEMM, in the mode's
    precision), "geometry" (rotation / projection GEMM), "memory" (elementwise, gathers, copies);
    ``recompute``: redone in the backward (the grid tile loops); ``saved``: numbers kept for the
    backward."""

    name: str
    flops: float = 0.0
    elems: float = 0.0
    launches: float = 1.0
    engine: str = "aten"
    kind: str = "memory"
    recompute: bool = False
    saved: float = 0.0


def _gemm(name, m, k, n, kind="linear", engine="aten", recompute=False, launches=1.0, saved=None):
    return Op(name, 2.0 * m * k * n, m * k + k * n + m * n, launches, engine, kind, recompute,
              m * n if saved is None else saved)  # fmt: skip


def _mem(name, elems, launches=1.0, engine="aten", recompute=False, saved=0.0):
    return Op(name, 0.0, 2.0 * elems, launches, engine, "memory", recompute, saved)


def _rows(lmax: int, mmax: int) -> tuple[int, int]:
    """(R, K): rotated rows and compact Wigner entries per edge."""
    r = k = 0
    for l in range(lmax + 1):
        n = 2 * min(l, mmax) + 1
        r, k = r + n, k + n * (2 * l + 1)
    return r, k


def _tiles(sh: Shapes, training: bool, backend: str) -> int:
    from scn_fast.kernels.tiling import grid_tile_atoms

    atoms = grid_tile_atoms(sh.lmax, sh.bands, sh.channels, backend=backend, training=training)
    return max(1, math.ceil(sh.atoms / atoms))


def block_ops(path: str, sh: Shapes, training: bool = True) -> list[Op]:
    """The forward operations of one interaction block on ``path`` (module doc)."""
    n, c, t = sh.atoms, sh.channels, sh.taps
    e_all = sh.edges
    ops = [  # DistanceBlock (the same on every path)
        _gemm("dist.fc1_dist", e_all, sh.gaussians, sh.basis),
        _mem("dist.embed+silu", 3 * e_all * sh.basis, 3),
        _gemm("dist.fc1_edge_attr", e_all, sh.basis, sh.basis),
        _mem("dist.silu", e_all * sh.basis),
    ]
    fused = path != "reference"
    eng = "triton" if path == "triton" else "aten"
    for lmax, h, per_atom in sh.resolutions:
        e = per_atom * n
        s = (lmax + 1) ** 2
        r, k = _rows(lmax, sh.mmax)
        f = (5 * lmax + 1) / (12 * lmax + 4) if (sh.mmax == 1 and t == 4) else 1.0
        p = f"L{lmax}."
        ops += [_gemm(p + "fc1_dist", e, sh.basis, h), _mem(p + "gate.silu", e * h)]
        if not fused:
            ops += [
                _mem(p + "gather+repeat", 2 * (e * s * c + e * t * s * c), 4),
                _gemm(
                    p + "rotate.bmm",
                    2 * e * t * r,
                    s,
                    c,
                    "geometry",
                    launches=2,
                    saved=2 * e * t * (r * s + s * c),
                ),
                _mem(p + "cat", e * t * 2 * r * c, saved=e * t * 2 * r * c),
                _gemm(p + "fc1_edge_proj", e * t, 2 * r * c, h),
                _mem(p + "silu*gate", 2 * e * t * h, 2, saved=2 * e * t * h),
                _gemm(p + "fc1_edge", e * t, h, h),
                _mem(p + "silu", e * t * h, saved=e * t * h),
                _gemm(p + "fc2_edge", e * t, h, r * c),
                _mem(p + "silu", e * t * r * c, saved=e * t * r * c),
                _gemm(p + "tap_mapping", e, t * r, r, "geometry", launches=2),
                _gemm(p + "rotate_back.bmm", e * s, r, c, "geometry", saved=e * s * r),
                _mem(p + "index_add", e * s * c + n * s * c),
            ]
        else:
            # the gate and the tap combination: Triton's fused kernels on both fused paths (on
            # CUDA the plan prefers them to the extension's ATen compositions, ops.support)
            gate_l = comb_l = 1
            ops += [
                Op(
                    p + "gather_rotate",
                    2.0 * 2 * e * k * c,
                    2 * e * (s * c + r * c) + e * k,
                    1,
                    eng,
                    "memory",
                    saved=2 * e * r * c,
                ),
                _gemm(
                    p + "fc1_edge_proj(a,b)", e * t, 2 * r * c * f, h, launches=2, saved=3 * e * h
                ),
                _mem(p + "tap_gate", e * t * h + 4 * e * h, gate_l, "triton"),
                _gemm(p + "fc1_edge", e * t, h, h),
                _mem(p + "silu", e * t * h, saved=e * t * h),
                _gemm(p + "fc2_edge", e * t, h, r * c, saved=e * t * h),
                _mem(p + "tap_combine", e * t * r * c + e * r * c, comb_l, "triton"),
                Op(
                    p + "rotate_scatter",
                    2.0 * e * k * c,
                    e * r * c + e * k + n * s * c,
                    2,
                    eng,
                    "memory",
                ),
            ]
    g, b, s = sh.grid_points, sh.bands, (sh.lmax + 1) ** 2
    h1, h2 = 2 * b * c, 2 * c
    if not fused:
        ops += [
            _gemm("grid.to_grid", n * g, s, 2 * b * c, "geometry", launches=2 * b + 1),
            _gemm("grid.fc1", n * g, h1, h1),
            _mem("grid.silu", n * g * h1, saved=n * g * h1),
            _gemm("grid.fc2", n * g, h1, h2),
            _mem("grid.silu", n * g * h2, saved=n * g * h2),
            _gemm("grid.fc3", n * g, h2, c),
            _gemm("grid.from_grid", n * s, g, c, "geometry", launches=2),
        ]
    else:
        tiles = _tiles(sh, training, "triton" if path == "triton" else "extension")
        per_tile = 1 if path == "triton" else 2  # the extension's bias + SiLU are ATen ops on CUDA
        ops += [
            _mem("grid.weights", 2 * h1 * h1 + h1 * h2 + h2 * c, 5),
            _gemm(
                "grid.Q",
                n * s,
                2 * c,
                b * h1,
                engine=eng,
                recompute=True,
                launches=b * tiles,
                saved=0,
            ),
            _gemm("grid.to_grid+fc1", n * g, b * s, h1, "geometry", eng, True, per_tile * tiles, 0),
            _gemm(
                "grid.fc2",
                n * g,
                h1,
                h2,
                engine=eng,
                recompute=True,
                launches=per_tile * tiles,
                saved=0,
            ),
            _gemm("grid.from_grid", n * s, g, h2, "geometry", eng, True, tiles, 0),
            _gemm(
                "grid.fc3",
                n * s,
                h2,
                c,
                engine=eng,
                recompute=True,
                launches=per_tile * tiles,
                saved=0,
            ),
        ]
    ops.append(_mem("residual", 3 * n * s * c, 2))
    return ops


def heads_ops(sh: Shapes) -> list[Op]:
    """The output heads (once per step, the same work on every path)."""
    n, c, s, p = sh.atoms, sh.channels, (sh.lmax + 1) ** 2, sh.points
    return [
        _gemm("heads.sample", n * p, s, c, "geometry"),
        *(_gemm(f"heads.fc{i}", 2 * n * p, c, c) for i in (1, 2)),
        _gemm("heads.fc3", 2 * n * p, c, 1),
        _mem("heads.silu+mean", 4 * n * p * c, 6),
    ]


@dataclass
class StepCost:
    """The totals of one step and the predicted times (seconds)."""

    path: str
    precision: str
    atoms: int
    training: bool
    flops: float = 0.0
    tc_flops: float = 0.0
    bytes: float = 0.0
    launches: float = 0.0
    saved_bytes: float = 0.0
    gemm_s: float = 0.0
    memory_s: float = 0.0
    device_s: float = 0.0
    host_s: float = 0.0
    by_name: dict = field(default_factory=dict)

    @property
    def step_s(self) -> float:
        return max(self.device_s, self.host_s)


def _rate(op: Op, path: str, precision: str, device: Device) -> tuple[float, bool]:
    """(FLOP/s, on tensor cores) of a GEMM op on path in precision."""
    if precision == "fp32" or (path == "reference" and op.kind == "geometry"):
        return device.peak["fp32"] * GEMM_EFF["fma"], False
    if op.kind == "geometry":  # the fused paths' projections: float32 operands, tf32
        return device.peak["tf32"] * GEMM_EFF["tc"], True
    return device.peak[precision] * GEMM_EFF["tc"], True


def step_cost(
    path: str,
    precision: str,
    atoms: int,
    training: bool = True,
    device: str = "H100",
    shapes: Shapes | None = None,
) -> StepCost:
    """FLOPs, bytes, launches and predicted times of one step (module doc)."""
    if path not in ("reference", "triton", "extension"):
        raise ValueError(f"path must be reference, triton or extension, got {path!r}")
    if precision not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"precision must be fp32, tf32 or bf16, got {precision!r}")
    sh = shapes or Shapes(atoms)
    dev = DEVICES[device]
    itemsize = 4  # activations stay float32 in every mode; weights are negligible
    ops = block_ops(path, sh, training) * sh.blocks + heads_ops(sh)
    cost = StepCost(path, precision, sh.atoms, training)
    for op in ops:
        # forward, backward (2x), and the tile loops' recomputed forward
        times = (1.0 + 2.0 + (1.0 if op.recompute else 0.0)) if training else 1.0
        launches = (1.0 + 2.0 + (1.0 if op.recompute else 0.0)) if training else 1.0
        flops, nbytes = op.flops * times, op.elems * itemsize * times
        compute_s = memory_s = 0.0
        if flops:
            rate, tc = _rate(op, path, precision, dev)
            compute_s = flops / rate
            cost.tc_flops += flops if tc else 0.0
        memory_s = nbytes / (dev.bandwidth * BW_EFF)
        cost.flops += flops
        cost.bytes += nbytes
        cost.launches += op.launches * launches
        cost.host_s += op.launches * launches * HOST_S[op.engine]
        cost.gemm_s += compute_s
        cost.memory_s += memory_s if not flops else 0.0
        cost.device_s += max(compute_s, memory_s)
        cost.saved_bytes += op.saved * itemsize if training else 0.0
        key = op.name.split(".")[0] if "." in op.name else op.name
        cost.by_name[key] = cost.by_name.get(key, 0.0) + max(compute_s, memory_s)
    return cost


def markdown_table(
    atoms_list=(100, 1000, 2000), training: bool = True, device: str = "H100"
) -> str:
    """One row per (atoms, path, precision): TFLOP, tensor-core share, GB moved, launches, device /
    host / step milliseconds, saved activations (GB) and the predicted speedup over the reference
    in the same precision."""
    head = (
        "| atoms | path | precision | TFLOP | on tensor cores | GB moved | launches | device ms "
        "| host ms | step ms | activations GB | speedup |\n"
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [head]
    for atoms in atoms_list:
        for precision in ("fp32", "tf32", "bf16"):
            ref = step_cost("reference", precision, atoms, training, device)
            for path in ("reference", "triton", "extension"):
                c = step_cost(path, precision, atoms, training, device)
                rows.append(
                    f"| {atoms} | {path} | {precision} | {c.flops / 1e12:.2f} | "
                    f"{100 * c.tc_flops / max(c.flops, 1):.0f}% | {c.bytes / 1e9:.0f} | "
                    f"{c.launches:.0f} | {1e3 * c.device_s:.0f} | {1e3 * c.host_s:.0f} | "
                    f"{1e3 * c.step_s:.0f} | "
                    f"{f'{c.saved_bytes / 1e9:.1f}' if training else '-'} | "
                    f"{ref.step_s / c.step_s:.2f}x |"
                )
    return "\n".join(rows)


def launch_table(device: str = "H100") -> str:
    """Launches per step of the Triton path: predicted by this model and recorded from the code
    (:data:`RECORDED_LAUNCHES`), with the host time each implies at :data:`HOST_S` per launch."""
    rows = [
        "| atoms | mode | precision | predicted | recorded: Triton | recorded: ATen | recorded "
        "| host ms, recorded |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for (mode, precision, atoms), (tri, aten) in RECORDED_LAUNCHES.items():
        c = step_cost("triton", precision, atoms, mode == "training", device)
        host = tri * HOST_S["triton"] + aten * HOST_S["aten"]
        rows.append(
            f"| {atoms} | {mode} | {precision} | {c.launches:.0f} | {tri} | {aten} | "
            f"{tri + aten} | {1e3 * host:.0f} |"
        )
    return "\n".join(rows)


def breakdown_table(atoms: int = 1000, training: bool = True, device: str = "H100") -> str:
    """Predicted device milliseconds per part of the step (the distance block, each message
    resolution, the grid MLP, the output heads, the residual adds) per path and precision: the
    lines to compare with a GPU profile, part by part."""
    costs = {
        (path, prec): step_cost(path, prec, atoms, training, device)
        for prec in ("fp32", "tf32", "bf16")
        for path in ("reference", "triton", "extension")
    }
    parts = list(next(iter(costs.values())).by_name)
    head = "| part | " + " | ".join(f"{p} {q}" for p, q in costs) + " |"
    rows = [head, "|---|" + "---:|" * len(costs)]
    for part in parts:
        rows.append(
            f"| {part} | "
            + " | ".join(f"{1e3 * c.by_name[part]:.0f}" for c in costs.values())
            + " |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    dev = sys.argv[1] if len(sys.argv) > 1 else "H100"
    for training in (True, False):
        print(f"\n{'training' if training else 'inference'} step, {DEVICES[dev].name}\n")
        print(markdown_table(training=training, device=dev))
    print(f"\ndevice ms per part, training, 1,000 atoms, {DEVICES[dev].name}\n")
    print(breakdown_table(device=dev))
    print("\nlaunches per step, Triton path: predicted and recorded\n")
    print(launch_table(dev))
