"""Compile every Triton kernel of scn_fast for real NVIDIA targets, without a GPU.

Run as ``python tests/triton_compile.py [--family edge tap gemm] [--json PATH] [--arch 80 90]``
in a process *without* ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` yields functions
that cannot be compiled; the gpu_compile tests start this script in a subprocess with the variable
removed).

One harness for all kernel files (``scn_fast.kernels.aot``): each family's ``launch_configs`` runs
its launchers on meta tensors of a problem's shapes and returns the exact specialisations they
launch (signature, constexprs, divisibility attrs, warps, stages, options); each is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` down to PTX and a cubin. A
line per compile reports shared memory, the tensor-core instructions in the PTX (wgmma / mma) and,
for the edge kernels, registers and spills (``cuobjdump --dump-resource-usage``; non-zero local
memory means spills). Exits 1 if any compile fails or produced no cubin.

Families: ``edge`` (kernels/edge_rotation.py, every resolution at an aligned and an odd channel
count, float32 and bfloat16 features), ``tap`` (kernels/tap_elementwise.py), ``gemm``
(kernels/gemm.py as the grid and heads launchers use it, scn-t4-b2 in every precision).
"""

from __future__ import annotations

import argparse
import os
import sys

# (lmax, mmax, channels, dtype, wig dtype): every resolution the model uses at an aligned and an odd
# channel count, float32 and bfloat16 features (with float32 Wigner rows, and bf16 rows once).
CASES = [
    (lmax, mmax, channels, dtype, "float32")
    for (lmax, mmax) in ((6, 1), (4, 1), (6, 0))
    for channels in (128, 17)
    for dtype in ("float32", "bfloat16")
] + [(6, 1, 128, "bfloat16", "bfloat16")]
SIDES = 2
ARCHS = (80, 90)
FAMILIES = ("edge", "tap", "gemm")


def edge_cases() -> list[tuple[dict, list]]:
    """(problem, configs) of the edge kernels for every entry of :data:`CASES`."""
    import torch
    from scn_fast.kernels import edge_rotation as er

    out = []
    for lmax, mmax, channels, dtype, wig_dtype in CASES:
        configs = er.launch_configs(
            lmax, mmax, channels, sides=SIDES,
            dtype=getattr(torch, dtype), wig_dtype=getattr(torch, wig_dtype),
        )  # fmt: skip
        meta = {"lmax": lmax, "mmax": mmax, "channels": channels, "dtype": dtype,
                "wig_dtype": wig_dtype}  # fmt: skip
        out.append((meta, configs))
    return out


def family_cases(family: str) -> list[tuple[dict, list]]:
    if family == "edge":
        return edge_cases()
    if family == "tap":
        from scn_fast.kernels import tap_elementwise

        return tap_elementwise.compile_cases()
    if family == "gemm":
        from scn_fast.kernels import grid_projection

        return grid_projection.compile_cases()
    raise ValueError(f"unknown kernel family {family!r}; known: {FAMILIES}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no"):
        print("triton_compile: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
        return 2

    # Import and trace once, before the workers fork.
    from scn_fast.kernels import aot

    cases = []
    for family in args.family:
        cases += [({"family": family, **meta}, cfgs) for meta, cfgs in family_cases(family)]
    return aot.compile_main(
        cases, tuple(args.arch), args.json, args.jobs, "triton_compile", resources=True
    )


if __name__ == "__main__":
    sys.exit(main())
