"""Reusable scratch buffers for the fused ops' weight-sized temporaries on CPU.

A fused op that gathers a weight into another layout (``tap_projection``: 20 MB per call at
scn-t4-b2) or has its GEMMs write a weight gradient into a scratch layout would otherwise allocate
that much fresh memory per call. On CPU such blocks come straight from the kernel (glibc serves
large requests with mmap and returns them on free), so every call pays a page fault per 4 KiB
touched: measured 1.5 us per page on the 2-core benchmark VM, and 50 ms instead of 1.5 ms for one
20 MB gather when two threads fault at once. A workspace keeps one buffer per (name, dtype, device)
and thread, grown to the largest size asked for, and hands out views of it.

Contract: a view is scratch for the duration of one op call. It must not be returned, saved for
backward or held across a call that may use the same name. On CUDA (whose caching allocator already
reuses blocks) and other devices a fresh tensor is returned.
"""

from __future__ import annotations

import math
import threading

import torch

_local = threading.local()


def workspace(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """An uninitialised tensor of ``shape``: a view of this thread's buffer ``name`` on CPU."""
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buffers: dict = getattr(_local, "buffers", None) or {}
    _local.buffers = buffers
    key = (name, dtype)
    numel = math.prod(shape)
    # A normal tensor even under torch.inference_mode(): an inference tensor could not be written
    # later outside that mode (buffers outlive the call that made them).
    with torch.inference_mode(False):
        buf = buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            buffers[key] = buf
        return buf[:numel].view(shape)
