"""``grid_projection`` (EdgeBlock's spherical grid MLP) and ``output_heads`` (energy + force heads).

Shapes: scn-t4-b2's grid (C = 128 channels, L = 6: S = 49 coefficients, G = 14 x 15 = 210 points,
fc1 2bC -> 2bC, fc2 -> 2C, fc3 -> C) with num_bands 1 and 2, for N = 38 atoms (the Cu(111)+CO slab) and
N = 200; heads on P = 128 sphere samples (C -> C -> C -> 1, energy and forces). float32.

Paths: ``reference`` (upstream: ``Grid.to_grid`` / ``from_grid`` einsums, ``nn.Linear``, SiLU, exactly
EdgeBlock's code; the model's ``_heads`` for the heads), the fused op per backend, and ``gemm-floor``:
the fused op's own GEMMs alone (same shapes, same calls, preallocated outputs: forward, and forward
recompute + backward), and ``reference-gemm-floor`` (the reference's nn.Linear GEMMs alone, x3 work
for fwd+bwd). A fused path is timed only if its output matches the reference (op tolerance, 1e-5).

``python -m pytest bench/bench_grid_projection.py --benchmark-only`` (pytest-benchmark, activation
memory in extra_info), or ``python bench/bench_grid_projection.py [--threads T] [--repeats R]`` for one
interleaved table (min and median of R repeats per path, ratios, peak activation memory).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import op_step
from torch import nn

from scn_fast import so3
from scn_fast.model import Grid
from scn_fast.ops import grid_projection as gp
from scn_fast.ops import output_heads as oh

CHANNELS, LMAX, POINTS = 128, 6, 128
ATOMS = (38, 200)
BANDS = (1, 2)
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
TOL = 1e-5


def fused_backends(device: str) -> list[str]:
    return ["extension"] if device == "cpu" else ["extension", "triton"]


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------


class GridProblem:
    """x_down, x_new (N, S, C), EdgeBlock's fc1/fc2/fc3_sphere, a gradient for the output."""

    def __init__(self, atoms: int, bands: int, device: str, grad: bool, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        s, c, w = (LMAX + 1) ** 2, CHANNELS, 2 * bands * CHANNELS
        self.atoms, self.bands, self.device = atoms, bands, device
        self.grid = Grid(LMAX, bands)
        self.fc1, self.fc2, self.fc3 = (
            m.to(device) for m in (nn.Linear(w, w), nn.Linear(w, 2 * c), nn.Linear(2 * c, c))
        )
        self.xd = torch.randn(atoms, s, c, generator=gen).to(device).requires_grad_(grad)
        self.xn = torch.randn(atoms, s, c, generator=gen).to(device).requires_grad_(grad)
        self.gout = torch.randn(atoms, s, c, generator=gen).to(device)
        self.params = [
            self.xd,
            self.xn,
            *self.fc1.parameters(),
            *self.fc2.parameters(),
            *self.fc3.parameters(),
        ]

    def reference(self) -> torch.Tensor:
        c = CHANNELS
        g = torch.cat([self.grid.to_grid(self.xd, c), self.grid.to_grid(self.xn, c)], dim=1)
        g = F.silu(self.fc1(g))
        g = F.silu(self.fc2(g))
        return self.grid.from_grid(self.fc3(g), c).view(self.atoms, -1, c)

    def fused(self, backend: str) -> torch.Tensor:
        return gp.grid_mlp(
            self.xd,
            self.xn,
            self.fc1,
            self.fc2,
            self.fc3,
            lmax=LMAX,
            num_bands=self.bands,
            backend=backend,
        )

    def step(self, fn: Callable[[], torch.Tensor], direction: str) -> Callable[[], object]:
        return op_step(direction, fn, self.params, self.xd, self.gout)

    def gemm_floor(self, direction: str) -> Callable[[], None]:
        """The fused op's GEMMs alone (the extension's calls, same shapes and order): forward; for
        fwd+bwd also the backward's recomputed forward and its gradient GEMMs."""
        s, c, b, g = (LMAX + 1) ** 2, CHANNELS, self.bands, 210
        h1, h2 = 2 * b * c, 2 * c
        tg, fg = gp.grid_constants(LMAX, b, torch.float32, self.device)
        tile = gp.default_tile_atoms(g, self.device)
        tiles = [min(tile, self.atoms - z0) for z0 in range(0, self.atoms, tile)]
        dev = self.device

        def r(*shape):
            return torch.randn(*shape, device=dev)

        w1r, w2, w3 = r(b, h1, 2 * c), self.fc2.weight.detach(), self.fc3.weight.detach()
        bufs = {
            n: dict(
                x=r(s * n, 2 * c),
                q=r(b, s * n, h1),
                a1=r(g, n * h1),
                a2=r(g * n, h2),
                u=r(s * n, h2),
                o=r(s * n, c),
                do=r(s * n, c),
                du=r(s * n, h2),
                dh2=r(g, n * h2),
                dh1=r(g * n, h1),
                dq=r(b * s, n * h1),
                dx=r(s * n, 2 * c),
            )
            for n in set(tiles)
        }
        dw1, dw2, dw3 = r(b, h1, 2 * c), r(h2, h1), r(c, h2)

        def forward(d, n):
            for k in range(b):
                torch.mm(d["x"], w1r[k].t(), out=d["q"][k])
            torch.mm(tg, d["q"].view(b * s, n * h1), out=d["a1"])
            torch.mm(d["a1"].view(g * n, h1), w2.t(), out=d["a2"])
            torch.mm(fg, d["a2"].view(g, n * h2), out=d["u"].view(s, n * h2))

        def run():
            for n in tiles:
                d = bufs[n]
                forward(d, n)
                torch.mm(d["u"], w3.t(), out=d["o"])
            if direction == "fwd":
                return
            for n in tiles:  # backward: the tile's forward recomputed, then the gradients
                d = bufs[n]
                forward(d, n)
                dw3.addmm_(d["do"].t(), d["u"])
                torch.mm(d["do"], w3, out=d["du"])
                torch.mm(fg.t(), d["du"].view(s, n * h2), out=d["dh2"])
                dw2.addmm_(d["dh2"].view(g * n, h2).t(), d["a1"].view(g * n, h1))
                torch.mm(d["dh2"].view(g * n, h2), w2, out=d["dh1"])
                torch.mm(tg.t(), d["dh1"].view(g, n * h1), out=d["dq"])
                dq = d["dq"].view(b, s * n, h1)
                for k in range(b):
                    dw1[k].addmm_(dq[k].t(), d["x"])
                    if k == 0:
                        torch.mm(dq[k], w1r[k], out=d["dx"])
                    else:
                        d["dx"].addmm_(dq[k], w1r[k])

        return run

    def reference_gemm_floor(self, direction: str) -> Callable[[], None]:
        """The reference's nn.Linear GEMMs alone: (N*G, 2bC) x fc1, fc2, fc3 (x3 for fwd+bwd)."""
        rows, dev = self.atoms * 210, self.device
        ws = [m.weight.detach() for m in (self.fc1, self.fc2, self.fc3)]
        ins = [torch.randn(rows, w.shape[1], device=dev) for w in ws]
        outs = [torch.randn(rows, w.shape[0], device=dev) for w in ws]
        grads = [torch.randn_like(w) for w in ws]

        def run():
            for a, w, o, gw in zip(ins, ws, outs, grads, strict=True):
                torch.mm(a, w.t(), out=o)
                if direction != "fwd":
                    torch.mm(o, w, out=a)
                    torch.mm(o.t(), a, out=gw)

        return run


class HeadsProblem:
    def __init__(self, atoms: int, device: str, grad: bool, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        c = CHANNELS
        self.atoms = atoms
        self.energy = [m.to(device) for m in (nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, 1))]
        self.forces = [m.to(device) for m in (nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, 1))]
        self.x = torch.randn(atoms, (LMAX + 1) ** 2, c, generator=gen).to(device)
        self.x.requires_grad_(grad)
        self.ge = torch.randn(atoms, generator=gen).to(device)
        self.gf = torch.randn(atoms, 3, generator=gen).to(device)
        self.params = [self.x, *(p for m in self.energy + self.forces for p in m.parameters())]

    def reference(self):
        p = POINTS
        y = so3.sphere_harmonics_at_points(p, LMAX).to(dtype=self.x.dtype, device=self.x.device)
        on_sphere = torch.einsum("abc,pb->apc", self.x, y).contiguous().view(-1, CHANNELS)
        e = F.silu(self.energy[0](on_sphere))
        e = F.silu(self.energy[1](e))
        e = self.energy[2](e).view(-1, p, 1)
        f = F.silu(self.forces[0](on_sphere))
        f = F.silu(self.forces[1](f))
        f = self.forces[2](f).view(-1, p, 1)
        pts = so3.sphere_points(p).to(dtype=self.x.dtype, device=self.x.device)
        return torch.sum(e, dim=1).view(-1) / p, torch.sum(f * pts.view(1, p, 3), dim=1) / p

    def fused(self, backend: str):
        return oh.output_heads(
            self.x,
            num_points=POINTS,
            lmax=LMAX,
            energy=oh.head_weights(*self.energy),
            forces=oh.head_weights(*self.forces),
            backend=backend,
        )

    def step(self, fn, direction: str):
        def loss(out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            e, f = out
            return (e * self.ge).sum() + (f * self.gf).sum()

        return op_step(direction, fn, self.params, self.x, loss=loss)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def check_grid(pb: GridProblem, backend: str) -> None:
    with torch.no_grad():
        err = _rel(pb.fused(backend), pb.reference())
    if err > TOL:
        pytest.fail(f"grid_projection[{backend}] is off the reference by {err:.2e} > {TOL}")


def check_heads(pb: HeadsProblem, backend: str) -> None:
    with torch.no_grad():
        (e, f), (re, rf) = pb.fused(backend), pb.reference()
    err = max(_rel(e, re), _rel(f, rf))
    if err > 10 * TOL:  # forces: a cancelling sum, compared in float32 on both sides
        pytest.fail(f"output_heads[{backend}] is off the reference by {err:.2e}")


# ----------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------


def _skip_reason(backend: str, device: str) -> str | None:
    from scn_fast.dispatch import OpRequest

    req = OpRequest("grid_projection", torch.device(device), torch.float32, LMAX, 0, 1, CHANNELS)
    return gp.get_backend(backend).refusal(req)


def _paths() -> list:
    out = []
    for device in DEVICES:
        out.append(pytest.param(device, "reference", id=f"{device}-reference"))
        for b in fused_backends(device):
            why = _skip_reason(b, device)
            marks = [pytest.mark.skip(reason=why)] if why else []
            out.append(pytest.param(device, b, id=f"{device}-{b}", marks=marks))
        out.append(pytest.param(device, "gemm-floor", id=f"{device}-gemm-floor"))
        out.append(
            pytest.param(device, "reference-gemm-floor", id=f"{device}-reference-gemm-floor")
        )
    return out


@pytest.mark.parametrize("atoms", ATOMS)
@pytest.mark.parametrize("bands", BANDS)
@pytest.mark.parametrize(("device", "path"), _paths())
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_grid(run_op, device, path, bands, atoms, direction):
    pb = GridProblem(atoms, bands, device, direction != "fwd")
    if path == "reference":
        fn = pb.step(pb.reference, direction)
    elif path == "gemm-floor":
        fn = pb.gemm_floor(direction)
    elif path == "reference-gemm-floor":
        fn = pb.reference_gemm_floor(direction)
    else:
        check_grid(pb, path)
        fn = pb.step(lambda: pb.fused(path), direction)
    run_op(fn, device, f"grid_projection b{bands} N{atoms} {direction} {device}")


@pytest.mark.parametrize("atoms", ATOMS)
@pytest.mark.parametrize(
    ("device", "path"),
    [p for p in _paths() if "floor" not in p.id],
)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_heads(run_op, device, path, atoms, direction):
    pb = HeadsProblem(atoms, device, direction != "fwd")
    if path == "reference":
        fn = pb.step(pb.reference, direction)
    else:
        check_heads(pb, path)
        fn = pb.step(lambda: pb.fused(path), direction)
    run_op(fn, device, f"output_heads N{atoms} {direction} {device}")


# ----------------------------------------------------------------------------------------------
# One interleaved table
# ----------------------------------------------------------------------------------------------


def _interleaved(steps: dict, device: str, repeats: int) -> dict[str, list[float]]:
    """Per path, ``repeats`` times after a warm-up call, interleaved across the paths (repeat r starts
    at path r mod paths, so slow drifts of a busy machine hit all paths alike)."""
    from scn_fast.benchmark import measure

    names = list(steps)
    for name in names:
        measure.time_step(steps[name], device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(measure.time_step(steps[name], device))
    return times


def main(argv: list[str] | None = None) -> int:
    from scn_fast.benchmark import measure

    parser = argparse.ArgumentParser(description="grid_projection / output_heads vs the reference")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = args.device
    print(f"device={device} threads={torch.get_num_threads()} float32 C={CHANNELS} L={LMAX}")
    print(
        f"{'case':<34}{'path':<22}{'min ms':>9}{'median':>9}{'vs ref':>8}{'vs floor':>9}{'act MB':>8}"
    )
    for kind in ("grid", "heads"):
        for bands in BANDS if kind == "grid" else (None,):
            for atoms in ATOMS:
                for direction in ("fwd", "fwd+bwd"):
                    steps: dict[str, Callable[[], object]] = {}
                    if kind == "grid":
                        pb = GridProblem(atoms, bands, device, direction != "fwd")
                        steps["reference"] = pb.step(pb.reference, direction)
                        for b in fused_backends(device):
                            if _skip_reason(b, device) is None:
                                check_grid(pb, b)
                                steps[b] = pb.step(lambda b=b, pb=pb: pb.fused(b), direction)
                        steps["gemm-floor"] = pb.gemm_floor(direction)
                        steps["reference-gemm-floor"] = pb.reference_gemm_floor(direction)
                        case = f"grid b{bands} N{atoms} {direction}"
                    else:
                        hp = HeadsProblem(atoms, device, direction != "fwd")
                        steps["reference"] = hp.step(hp.reference, direction)
                        for b in fused_backends(device):
                            if _skip_reason(b, device) is None:
                                check_heads(hp, b)
                                steps[b] = hp.step(lambda b=b, hp=hp: hp.fused(b), direction)
                        case = f"heads N{atoms} {direction}"
                    times = _interleaved(steps, device, args.repeats)
                    mem = {k: measure.activation_memory(v, device) for k, v in steps.items()}
                    ref = min(times["reference"])
                    floor = min(times["gemm-floor"]) if "gemm-floor" in times else None
                    for name, ts in times.items():
                        t = min(ts)
                        vs_floor = f"{t / floor:8.3f}" if floor else f"{'':>8}"
                        m = mem.get(name)
                        mb = f"{m / 2**20:8.1f}" if m is not None else f"{'?':>8}"
                        print(
                            f"{case:<34}{name:<22}{t * 1e3:9.1f}{measure.median(ts) * 1e3:9.1f}"
                            f"{ref / t:8.2f}{vs_floor}{mb}"
                        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
