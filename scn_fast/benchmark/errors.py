"""How the benchmark classifies and reports failures: out-of-memory detection, one-line reasons,
a time limit for compiling, and JSON-safe values."""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

TIMEOUT_MARK = "compile_timeout_s"
_OOM_TEXT = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "bad_alloc",
    "failed to allocate",
)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means the device or process ran out of memory."""
    if isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in _OOM_TEXT)


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is, wraps, or reports (torch.compile re-raises it as its own error) the
    TimeoutError of ``time_limit``."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TimeoutError) or TIMEOUT_MARK in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def first_line(exc: BaseException) -> str:
    """``Type: first non-empty line of the message``."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def status_of(exc: BaseException) -> str:
    return "oom" if is_oom(exc) else "failed"


def free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise TimeoutError in this (main) thread after ``seconds`` (no limit off the main thread)."""
    usable = (
        seconds
        and hasattr(signal, "SIGALRM")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"took longer than {seconds:.0f} s ({TIMEOUT_MARK})")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
