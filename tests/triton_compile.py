"""Compile every Triton kernel of scn_fast for real NVIDIA targets, without a GPU.

Run as ``python tests/triton_compile.py [--json PATH] [--arch 80 90]`` in a process *without*
``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` yields functions that cannot be compiled;
``tests/test_triton_edge.py`` starts this script in a subprocess with the variable removed).

For every problem in ``CASES`` it asks ``scn_fast.kernels.edge_rotation.launch_configs`` for the exact
specialisations the launchers use (signature, constexprs, divisibility attrs, num_warps, options),
compiles each with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` down to a
cubin, and reads the resource usage of the cubin with ``cuobjdump --dump-resource-usage`` (registers,
shared, local memory / stack: non-zero local memory means register spills). Prints one line per
compile; exits 1 if any compile fails or produced no cubin.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

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


def _resource_usage(cubin: bytes) -> dict:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        tool = knobs.nvidia.cuobjdump.path
        out = subprocess.run(
            [tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
    except Exception as exc:  # resource usage is informative only
        return {"error": f"cuobjdump failed: {exc}"}
    finally:
        os.unlink(path)
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        found = re.findall(rf"\b{key}:(\d+)", out)
        if found:
            usage[key.lower()] = max(int(v) for v in found)
    return usage


def compile_one(case: tuple, arch: int) -> list[dict]:
    """Compile both kernels of one problem for one arch; one result dict per kernel."""
    import torch
    import triton
    from scn_fast.kernels import edge_rotation as er
    from triton.backends.compiler import GPUTarget

    lmax, mmax, channels, dtype, wig_dtype = case
    configs = er.launch_configs(
        lmax, mmax, channels, sides=SIDES,
        dtype=getattr(torch, dtype), wig_dtype=getattr(torch, wig_dtype),
    )  # fmt: skip
    results = []
    for cfg in configs:
        res = {
            "kernel": cfg.name, "arch": f"sm_{arch}", "lmax": lmax, "mmax": mmax,
            "channels": channels, "dtype": dtype, "wig_dtype": wig_dtype,
            "num_warps": cfg.num_warps,
            "constexprs": {k: str(v) for k, v in cfg.constexprs.items()},
        }  # fmt: skip
        start = time.perf_counter()
        try:
            compiled = triton.compile(
                cfg.ast_source(), target=GPUTarget("cuda", arch, 32), options=cfg.options
            )
            cubin = compiled.asm.get("cubin", b"")
            res.update(
                ok=bool(cubin),
                cubin_bytes=len(cubin),
                shared_metadata=int(compiled.metadata.shared),
                **_resource_usage(cubin),
            )
        except Exception:
            res.update(ok=False, error=traceback.format_exc(limit=4))
        res["seconds"] = round(time.perf_counter() - start, 2)
        results.append(res)
    return results


def _fmt(r: dict) -> str:
    head = (
        f"{r['kernel']:<15} {r['arch']} L={r['lmax']} M={r['mmax']} C={r['channels']:<4} "
        f"{r['dtype']:<8} wig={r['wig_dtype']:<8} warps={r['num_warps']}"
    )
    if not r["ok"]:
        return f"{head}  FAILED\n{r.get('error', 'no cubin')}"
    return (
        f"{head}  regs={r.get('reg', '?'):<3} shared={r.get('shared', '?')}B "
        f"local={r.get('local', '?')}B stack={r.get('stack', '?')}B "
        f"cubin={r['cubin_bytes'] // 1024}KiB {r['seconds']:.1f}s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no"):
        print("triton_compile: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
        return 2

    # Import once, before the workers fork.
    import triton  # noqa: F401
    from scn_fast.kernels import edge_rotation  # noqa: F401

    jobs = [(case, arch) for case in CASES for arch in args.arch]
    start = time.perf_counter()
    results: list[dict] = []
    if args.jobs > 1:
        # fork: the workers inherit the imported modules; nothing has compiled or spawned threads yet.
        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as pool:
            for part in pool.map(compile_one, *zip(*jobs, strict=True)):
                results.extend(part)
    else:
        for case, arch in jobs:
            results.extend(compile_one(case, arch))
    for r in results:
        print(_fmt(r))
    failed = [r for r in results if not r["ok"]]
    print(
        f"triton_compile: {len(results) - len(failed)}/{len(results)} kernels compiled "
        f"in {time.perf_counter() - start:.1f}s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
