"""The extension's CPU block cache (csrc/cpu/block_pool.h): large tensors its CPU ops create come
back, when freed, for the next request of the same size; a tensor still referenced is never handed
out again; ``scn_fast.release_cpu_cache`` frees the cache and the benchmark's memory steps do so
first; ``SCN_FAST_CPU_CACHE_BYTES=0`` turns it off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import scn_fast
from scn_fast.benchmark import measure
from scn_fast.ops import gated_tap_projection


@pytest.fixture
def ext():
    from scn_fast.extension import load_extension

    try:
        ops = load_extension()
    except RuntimeError as exc:
        pytest.skip(f"the C++ extension cannot be built here: {exc}")
    scn_fast.release_cpu_cache()
    yield ops
    scn_fast.release_cpu_cache()


def test_a_freed_block_serves_the_next_request_of_its_size(ext):
    t = ext.cached_empty([512, 1024], torch.float32)  # 2 MiB
    assert t.shape == (512, 1024) and t.dtype == torch.float32 and t.is_contiguous()
    ptr = t.data_ptr()
    assert scn_fast.cpu_cache_bytes() == 0
    del t
    assert scn_fast.cpu_cache_bytes() == 2 << 20
    u = ext.cached_empty([1024, 256], torch.float64)  # the same bytes, another shape and dtype
    assert u.data_ptr() == ptr and scn_fast.cpu_cache_bytes() == 0
    v = ext.cached_empty([1024, 1024], torch.float32)  # another size: a new block
    assert v.data_ptr() != ptr
    del u, v
    assert scn_fast.cpu_cache_bytes() == (2 << 20) + (4 << 20)
    small = ext.cached_empty([100], torch.float32)  # under 1 MiB: a plain allocation
    del small
    assert scn_fast.cpu_cache_bytes() == 6 << 20
    assert scn_fast.release_cpu_cache() == 6 << 20 and scn_fast.cpu_cache_bytes() == 0


def test_sizes_that_move_a_little_share_a_size_class(ext):
    """Blocks come in classes 2^k (1 + j/8): requests a few percent apart (edge counts in MD) reuse
    the same block; the cache counts the class's bytes; a request past the class takes a new one."""
    t = ext.cached_empty([1_500_000 // 4], torch.float32)  # 1.5 MB: class 12 x 2^17 = 1572864
    ptr = t.data_ptr()
    del t
    assert scn_fast.cpu_cache_bytes() == 1572864
    for n in (1_450_000, 1_560_000, 1_572_864, 1_441_800):  # all in class 12 x 2^17
        u = ext.cached_empty([n // 4], torch.float32)
        assert u.data_ptr() == ptr, n
        u.fill_(1.0)  # the whole request is writable
        del u
    assert scn_fast.cpu_cache_bytes() == 1572864
    v = ext.cached_empty([1_600_000 // 4], torch.float32)  # the next class (13 x 2^17)
    assert v.data_ptr() != ptr
    del v
    assert scn_fast.cpu_cache_bytes() == 1572864 + 13 * 2**17


def test_a_kept_weight_gradient_is_never_overwritten(ext):
    """fc1_edge_proj's weight gradient comes from the cache (3.4 MB here): a gradient the caller
    still holds keeps its block; once dropped, the block serves the next step, with right values."""
    g = torch.Generator().manual_seed(0)
    lmax, h, c, e = 4, 256, 128, 9
    y = torch.randn(e, 2, 13, c, generator=g)
    w = (torch.randn(h, 2 * 13 * c, generator=g) / 40).requires_grad_()
    b, gate = torch.randn(h, generator=g), torch.randn(e, h, generator=g)

    def grad_of(dout, backend):
        w.grad = None
        out = gated_tap_projection(y, w, b, gate, lmax, 1, -1, backend=backend, weight_order="tap")
        out.backward(dout)
        return w.grad

    d1, d2 = (torch.randn(e, 4, h, generator=g) for _ in range(2))
    kept = grad_of(d1, "extension")
    snapshot = kept.clone()
    second = grad_of(d2, "extension")
    assert second.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, snapshot)  # not handed out again while referenced
    torch.testing.assert_close(second, grad_of(d2, "reference"), rtol=1e-4, atol=1e-5)
    old_ptr = kept.data_ptr()
    del second
    del kept, snapshot  # freed last: the first block of its size handed out again
    w.grad = None
    third = grad_of(d1, "extension")
    assert third.data_ptr() == old_ptr  # the dropped gradient's block came back
    torch.testing.assert_close(third, grad_of(d1, "reference"), rtol=1e-4, atol=1e-5)


def test_memory_measurements_release_the_cache_first(ext):
    t = ext.cached_empty([1 << 20], torch.float32)
    del t
    assert scn_fast.cpu_cache_bytes() == 4 << 20
    measure.release_free_heap()
    assert scn_fast.cpu_cache_bytes() == 0


def test_a_zero_limit_turns_the_cache_off(ext):
    code = (
        "import torch, scn_fast\n"
        "from scn_fast.extension import load_extension\n"
        "t = load_extension().cached_empty([1 << 20], torch.float32)\n"
        "del t\n"
        "print(scn_fast.cpu_cache_bytes())\n"
    )
    env = {**os.environ, "SCN_FAST_CPU_CACHE_BYTES": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "0"


def test_without_the_extension_loaded_nothing_is_built():
    code = (
        "import scn_fast\n"
        "from scn_fast import extension\n"
        "print(scn_fast.release_cpu_cache(), scn_fast.cpu_cache_bytes(), extension._state.ops)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "0", "None"]
