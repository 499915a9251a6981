"""What a result was measured on: device name, thread count, library versions, git commit."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import torch

from ..precision import gemm_support

PRECISIONS = ("fp32", "tf32", "bf16")


def supported_precisions(device: torch.device | str) -> tuple[str, ...]:
    """Precisions the benchmark runs by default on ``device``: fp32, and each low precision whose
    GEMMs run natively there (an emulated mode has float32 speed; ask for it with --precision)."""
    return tuple(p for p in PRECISIONS if p == "fp32" or gemm_support(p, device)[0])


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (or the platform's processor string)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def device_name(device: torch.device | str) -> str:
    """``torch.cuda.get_device_name`` on CUDA; the CPU model and torch's thread count on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # not installed, or broken on this platform
        return None
    return getattr(mod, "__version__", None)


@functools.cache
def git_state() -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files differ from it) of the checkout holding scn_fast, or Nones."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(
                # safe.directory: a checkout copied onto a machine by another user is still read
                ["git", "-c", "safe.directory=*", "-C", str(root), *args],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def environment(device: torch.device | str) -> dict[str, Any]:
    """Fields every record carries: device, device_type, threads, versions, git commit."""
    device = torch.device(device)
    commit, dirty = git_state()
    return {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "cuda_version": torch.version.cuda,
        "git_commit": commit,
        "git_dirty": dirty,
    }
