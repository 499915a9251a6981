"""The compiled ``scn_fast_ext`` extension: built on first use, loaded into ``torch.ops.scn_fast_ext``.

Ops (scn_fast/ops/SPEC.md):

* ``gather_rotate(x, wig, idx, lmax, mmax) -> y``
* ``rotate_scatter(m, wig, perm, ptr, lmax, mmax, num_nodes) -> out``
* ``cached_empty(size, dtype)``, ``release_cpu_cache()``, ``cpu_cache_bytes()``: the CPU block cache
  (``release_cpu_cache()`` / ``cpu_cache_bytes()`` below)

``load_extension()`` compiles the sources with ``torch.utils.cpp_extension.load`` (ninja) the first time
it is called in a process and returns the ``torch.ops.scn_fast_ext`` namespace. The CPU twin is always
compiled; the CUDA twin only when torch is a CUDA build and the CUDA toolkit (``CUDA_HOME``/nvcc) is
found. Builds are cached on disk (torch's default extensions directory, or ``$SCN_FAST_EXT_DIR``), so a
later process only relinks/reloads. A failed build raises ``RuntimeError`` (with the compiler's output)
from ``load_extension()``, never at ``import scn_fast``; the outcome, success or failure, is cached for
the rest of the process.

Sources are looked up in ``<repo>/csrc`` (a checkout or an editable install) and then in
``scn_fast/csrc`` (package data of an installed wheel).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import torch

EXTENSION_NAME = "scn_fast_ext"
ENV_BUILD_DIR = "SCN_FAST_EXT_DIR"

# Sources relative to the csrc directory.
_COMMON_SOURCES = (
    "edge_ops.cpp",
    "cpu/edge_ops_cpu.cpp",
    "grid_ops.cpp",
    "message_ops.cpp",
    "message_gate.cpp",
    "message_combine.cpp",
    "tap_rows.cpp",
    "tap_blocked.cpp",
    "cpu_runtime.cpp",
)
_CUDA_SOURCES = ("cuda/edge_ops_cuda.cpp", "cuda/edge_ops_kernels.cu")

_lock = threading.Lock()
_state = SimpleNamespace(ops=None, error=None)  # the cached outcome of the one build attempt


def csrc_dir() -> Path | None:
    """The directory holding the C++/CUDA sources: ``<repo>/csrc``, else ``scn_fast/csrc``; None if neither."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "csrc"):
        if (candidate / _COMMON_SOURCES[0]).is_file():
            return candidate
    return None


def _cuda_toolkit_available() -> bool:
    """torch is a CUDA build and its cpp_extension found a CUDA toolkit (CUDA_HOME with nvcc)."""
    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists()


def _ensure_ninja_on_path() -> bool:
    """Make the ``ninja`` executable visible to torch (it runs ``ninja`` from PATH).

    A venv used without activation has ninja in its bin directory but not on PATH: prepend the
    directory of the ``ninja`` Python package's binary. Returns whether ninja is now on PATH.
    """
    if shutil.which("ninja") is not None:
        return True
    try:
        import ninja  # the PyPI package ships the binary
    except ImportError:
        return False
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir is None or not (Path(bin_dir) / "ninja").exists():
        return False
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


def _cxx_compiler() -> str | None:
    """The C++ compiler torch's build would use ($CXX, else ``c++``), if it exists."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _build_prerequisites_missing() -> str | None:
    """Why a build cannot be attempted (no sources, no ninja, no compiler), or None."""
    if csrc_dir() is None:
        return "the extension sources (csrc/) are not found next to scn_fast nor as package data"
    if not _ensure_ninja_on_path():
        return "ninja is not available (pip install ninja)"
    if _cxx_compiler() is None:
        return f"no C++ compiler found ({os.environ.get('CXX', 'c++')!r} is not on PATH)"
    return None


def _build_and_load():
    """Compile (or reuse the cached build of) the extension and load it into torch.ops."""
    from torch.utils.cpp_extension import load

    missing = _build_prerequisites_missing()
    if missing is not None:
        raise RuntimeError(f"cannot build {EXTENSION_NAME}: {missing}")
    src = csrc_dir()
    assert src is not None
    with_cuda = _cuda_toolkit_available()
    sources = [str(src / s) for s in _COMMON_SOURCES]
    if with_cuda:
        sources += [str(src / s) for s in _CUDA_SOURCES]
    openmp = (
        [] if sys.platform == "darwin" else ["-fopenmp"]
    )  # at::parallel_for needs it to run in parallel
    build_dir = os.environ.get(ENV_BUILD_DIR)
    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
    load(
        name=EXTENSION_NAME,
        sources=sources,
        extra_cflags=["-O3", *openmp],
        extra_cuda_cflags=["-O3"],
        extra_ldflags=openmp,
        extra_include_paths=[str(src)],
        build_directory=build_dir or None,
        verbose=False,
        with_cuda=with_cuda,
        is_python_module=False,
    )
    return torch.ops.scn_fast_ext


def load_extension():
    """Build (first call only) and load the extension; return the ``torch.ops.scn_fast_ext`` namespace.

    Raises RuntimeError, with the compiler's output, when the build fails; the failure is cached, so
    later calls in the same process raise the same error without rebuilding.
    """
    with _lock:
        if _state.ops is None and _state.error is None:
            try:
                _state.ops = _build_and_load()
            except Exception as exc:  # compiler errors, missing tools, load errors
                _state.error = f"building {EXTENSION_NAME} failed: {exc}"
        if _state.error is not None:
            raise RuntimeError(_state.error)
        return _state.ops


def extension_status() -> tuple[bool, str | None]:
    """Whether the extension is (or can be expected to be) usable, and if not why; never builds.

    * After a build attempt in this process: ``(True, None)`` if it loaded, ``(False, error)`` if it
      failed (the error holds the compiler output).
    * Before any attempt: ``(True, None)`` when a build is possible (sources found, ninja and a C++
      compiler available; it may still fail to compile), else ``(False, reason)``. A True answer here
      is a prediction; ``load_extension()`` is the only proof.
    """
    with _lock:
        if _state.ops is not None:
            return True, None
        if _state.error is not None:
            return False, _state.error
    missing = _build_prerequisites_missing()
    return (missing is None), missing


def cuda_twin_expected() -> bool:
    """Whether a build in this environment includes the CUDA twin (CUDA torch and a CUDA toolkit)."""
    return _cuda_toolkit_available()


def loaded_extension():
    """The ``torch.ops.scn_fast_ext`` namespace if the extension is loaded in this process, else None
    (never builds it)."""
    with _lock:
        return _state.ops


def release_cpu_cache() -> int:
    """Free the extension's cached CPU blocks (``csrc/cpu/block_pool.h``: the large tensors its CPU
    ops create, kept after use for the next request of the same size class, as PyTorch's CUDA caching
    allocator keeps GPU blocks) and return the bytes freed; 0 when the extension is not loaded (this
    never builds it). The cache holds at most ``SCN_FAST_CPU_CACHE_BYTES`` bytes (default 4 GiB;
    0 turns it off)."""
    ops = loaded_extension()
    return int(ops.release_cpu_cache()) if ops is not None else 0


def cpu_cache_bytes() -> int:
    """Bytes the extension's CPU block cache holds now (0 when the extension is not loaded)."""
    ops = loaded_extension()
    return int(ops.cpu_cache_bytes()) if ops is not None else 0
