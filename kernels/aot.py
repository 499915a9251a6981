"""Launching the Triton kernels of scn_fast, and compiling them ahead of time without a GPU.

Every launcher in ``scn_fast.kernels`` launches through :func:`launch`. On CUDA tensors (or CPU
tensors under Triton's interpreter) it runs the kernel. On *meta* tensors nothing runs: the launch
is appended to the active :func:`trace` (and refused outside one), the way torch's meta tensors
describe a computation without doing it. So the exact specialisations a launcher uses (pointer
dtypes and alignment, integer sizes, constexprs, warps, stages) are found by running the launcher
on meta tensors of a real problem's shapes, with no GPU and no test hook in the launcher.

:func:`configs_of` turns traced launches into distinct :class:`LaunchConfig` values (specialised as
``JITFunction.run`` would: 16-byte aligned pointers and integers divisible by 16 get the "D"
attribute, the integer 1 becomes a constexpr). :func:`compile_config` compiles one for an NVIDIA
target (``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``) down to PTX and a
cubin, and reports shared memory, the tensor-core instructions in the PTX (``wgmma`` on sm_90,
``mma`` on sm_80; none means the GEMM runs on FMA units) and, when ``cuobjdump`` is found, registers
and spills. :func:`compile_main` compiles lists of configs in forked processes and prints one line per
compile. The compile must run in a process without ``TRITON_INTERPRET``: under the interpreter
``@triton.jit`` yields functions that cannot be compiled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import triton

__all__ = [
    "OPTIONS",
    "Launch",
    "LaunchConfig",
    "compile_config",
    "compile_main",
    "configs_of",
    "is_interpreted",
    "launch",
    "on_device",
    "specialize",
    "tensor_core_ops",
    "trace",
]

# Launch options besides num_warps / num_stages. FMA contraction is pinned on (Triton 3.9 warns that
# its default flips to off in 3.10): a*b + c rounded once is both faster and more accurate.
OPTIONS = {"enable_fp_fusion": True}

_PTR_SIG = {
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.int64: "*i64",
    torch.int32: "*i32",
}


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def on_device(device: torch.device):
    """Launch on ``device`` (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Launch and trace
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """One launch as a launcher issued it: the kernel, a label naming the specialisation, the
    non-constexpr arguments by name (tensors, ints), the constexprs and the launch options."""

    label: str
    kernel: object
    grid: tuple
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int | None


_TRACE: list[Launch] | None = None


@contextlib.contextmanager
def trace() -> Iterator[list[Launch]]:
    """Record the launches made on meta tensors inside the block (yields the list they go to)."""
    global _TRACE
    old, _TRACE = _TRACE, []
    try:
        yield _TRACE
    finally:
        _TRACE = old


def launch(
    label: str,
    kernel,
    grid: tuple,
    args: dict,
    constexprs: dict,
    *,
    device: torch.device,
    num_warps: int,
    num_stages: int | None = None,
) -> None:
    """Run ``kernel[grid](**args, **constexprs)`` on ``device``; on the meta device, record it in
    the active :func:`trace` instead."""
    if device.type == "meta":
        if _TRACE is None:
            raise ValueError(
                "meta tensors describe a Triton launch only inside scn_fast.kernels.aot.trace()"
            )
        _TRACE.append(
            Launch(label, kernel, grid, dict(args), dict(constexprs), num_warps, num_stages)
        )
        return
    stages = {} if num_stages is None else {"num_stages": num_stages}
    with on_device(device):
        kernel[grid](**args, **constexprs, num_warps=num_warps, **stages, **OPTIONS)


# ----------------------------------------------------------------------------------------------
# Specialisation
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """One kernel specialisation as a launcher launches it, for ``triton.compile``.

    ``signature`` maps every argument to its Triton type ("constexpr" for constexprs),
    ``constexprs`` the constexpr arguments to their values, ``attrs`` the argument attributes the
    JIT would add; :attr:`options` are the compile options of the launch.
    """

    name: str
    kernel: object  # the JITFunction (an InterpretedFunction when interpreted)
    signature: dict
    constexprs: dict
    attrs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int | None = None

    @property
    def options(self) -> dict:
        """Compile options (``triton.compile(..., options=cfg.options)``), as the launch uses them."""
        stages = {} if self.num_stages is None else {"num_stages": self.num_stages}
        return {"num_warps": self.num_warps, **stages, **OPTIONS}

    def ast_source(self):
        """A ``triton.compiler.ASTSource`` for this config (needs the kernel un-interpreted)."""
        if is_interpreted(self.kernel):
            raise RuntimeError(
                "the kernels were decorated under TRITON_INTERPRET=1; compile in a process without it"
            )
        return triton.compiler.ASTSource(
            fn=self.kernel, signature=self.signature, constexprs=self.constexprs, attrs=self.attrs
        )

    def key(self) -> str:
        return json.dumps(
            [
                getattr(self.kernel, "__name__", str(self.kernel)),
                self.signature,
                {k: str(v) for k, v in self.constexprs.items()},
                repr(sorted(self.attrs.items())),
                self.num_warps,
                self.num_stages,
            ]
        )


def specialize(kernel, args: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attrs as ``JITFunction.run`` derives them from runtime arguments.

    ``args`` maps the non-constexpr argument names to values: a tensor (its dtype; aligned when its
    data pointer is a multiple of 16, as fresh allocations and meta tensors are), a ``torch.dtype``
    (an aligned pointer of that dtype) or an int.
    """
    from triton.backends.compiler import BaseBackend

    constexprs = dict(constexprs)
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, torch.Tensor):
            signature[name] = _PTR_SIG[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = BaseBackend.parse_attr("D")
        elif isinstance(value, torch.dtype):
            signature[name] = _PTR_SIG[value]
            attrs[(i,)] = BaseBackend.parse_attr("D")
        elif value == 1:  # the JIT specialises the integer 1 to a constexpr
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            attrs[(i,)] = BaseBackend.parse_attr("D" if value % 16 == 0 else "")
    return signature, constexprs, attrs


def configs_of(launches: Sequence[Launch]) -> list[LaunchConfig]:
    """The distinct specialisations among ``launches``, in first-launch order."""
    out: dict[str, LaunchConfig] = {}
    for rec in launches:
        sig, const, attrs = specialize(rec.kernel, rec.args, rec.constexprs)
        cfg = LaunchConfig(rec.label, rec.kernel, sig, const, attrs, rec.num_warps, rec.num_stages)
        out.setdefault(cfg.key(), cfg)
    return list(out.values())


# ----------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------

# PTX instructions that run on tensor cores: Hopper's warpgroup MMA and the warp-level MMA of
# sm_80 (also emitted on sm_90 for tiles too small for a warpgroup).
_TENSOR_CORE_PTX = {
    "wgmma": re.compile(r"\bwgmma\.mma_async\b"),
    "mma": re.compile(r"\bmma\.sync\b"),
}


def tensor_core_ops(ptx: str) -> dict[str, int]:
    """Counts of tensor-core instructions in PTX text: {"wgmma": n, "mma": n}."""
    return {k: len(rx.findall(ptx)) for k, rx in _TENSOR_CORE_PTX.items()}


def _resource_usage(cubin: bytes) -> dict:
    """Registers, shared, local memory and stack of a cubin (``cuobjdump --dump-resource-usage``;
    non-zero local memory means register spills). Informative only: {} when cuobjdump is missing."""
    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
    except Exception:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run(
            [tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
    except Exception as exc:
        return {"resource_error": f"cuobjdump failed: {exc}"}
    finally:
        os.unlink(path)
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        found = re.findall(rf"\b{key}:(\d+)", out)
        if found:
            usage[key.lower()] = max(int(v) for v in found)
    return usage


def compile_config(cfg: LaunchConfig, arch: int, resources: bool = False) -> dict:
    """Compile ``cfg`` for ``sm_{arch}``: {kernel, arch, ok, cubin_bytes, shared, tensor_cores
    {wgmma, mma}, num_warps, num_stages, seconds[, reg, local, stack], error on failure}."""
    from triton.backends.compiler import GPUTarget

    res = {
        "kernel": cfg.name,
        "arch": f"sm_{arch}",
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "constexprs": {k: str(v) for k, v in cfg.constexprs.items()},
    }
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            cfg.ast_source(), target=GPUTarget("cuda", arch, 32), options=cfg.options
        )
        cubin = compiled.asm.get("cubin", b"")
        res.update(
            ok=bool(cubin),
            cubin_bytes=len(cubin),
            shared=int(compiled.metadata.shared),
            tensor_cores=tensor_core_ops(compiled.asm.get("ptx", "")),
        )
        if resources and cubin:
            res.update(_resource_usage(cubin))
    except Exception:
        res.update(ok=False, error=traceback.format_exc(limit=4))
    res["seconds"] = round(time.perf_counter() - start, 2)
    return res


# The work of compile_main, set before the workers fork (they inherit it; kernels do not pickle).
_WORK: list[tuple] = []


def _compile_job(index: int) -> dict:
    meta, cfg, arch, resources = _WORK[index]
    return {**meta, **compile_config(cfg, arch, resources)}


def _fmt(r: dict) -> str:
    case = " ".join(f"{k}={v}" for k, v in r.items() if k in r.get("_case_keys", ()))
    head = f"{case:<34} {r['kernel']:<34} {r['arch']} warps={r['num_warps']}"
    if not r["ok"]:
        return f"{head}  FAILED\n{r.get('error', 'no cubin')}"
    tc = r["tensor_cores"]
    extra = "".join(f" {k}={r[k]}" for k in ("reg", "local", "stack") if k in r)
    return (
        f"{head} shared={r['shared']}B wgmma={tc['wgmma']} mma={tc['mma']}{extra} "
        f"cubin={r['cubin_bytes'] // 1024}KiB {r['seconds']:.1f}s"
    )


def compile_main(
    cases: Sequence[tuple[dict, Sequence[LaunchConfig]]],
    archs: Sequence[int] = (80, 90),
    json_path: str | None = None,
    jobs: int | None = None,
    title: str = "triton compile",
    resources: bool = False,
) -> int:
    """Compile every config of every case for each arch (in ``jobs`` forked processes) and print
    one line per compile. ``cases`` pairs a dict describing the problem (copied into each result)
    with its configs. Returns 0 when all compiled to a cubin, 1 if any failed, 2 when interpreted."""
    import concurrent.futures as cf
    import multiprocessing as mp

    if any(is_interpreted(cfg.kernel) for _, cfgs in cases for cfg in cfgs):
        print(f"{title}: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
        return 2
    _WORK[:] = [
        ({**meta, "_case_keys": list(meta)}, cfg, arch, resources)
        for meta, cfgs in cases
        for cfg in cfgs
        for arch in archs
    ]
    start = time.perf_counter()
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(_WORK) or 1))
    if jobs > 1:
        # fork: the workers inherit the imported modules and the work list.
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
            results = list(pool.map(_compile_job, range(len(_WORK))))
    else:
        results = [_compile_job(i) for i in range(len(_WORK))]
    for r in results:
        print(_fmt(r))
        r.pop("_case_keys", None)
    failed = [r for r in results if not r["ok"]]
    print(
        f"{title}: {len(results) - len(failed)}/{len(results)} compiled "
        f"in {time.perf_counter() - start:.1f}s"
    )
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed or not results else 0
