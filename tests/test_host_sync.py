"""After ``prepare``, the forward (and its backward) never synchronises with the host, and builds no
constant: everything it reads was built in ``prepare`` (``ops.prepare_constants``).

A device-to-host synchronisation is any read of a tensor's values on the host: ``.item()``,
``.tolist()``, ``bool()`` / ``int()`` / ``float()`` of a tensor, ``torch.equal``, ``nonzero``
(its output size depends on the values), ``unique``, or a copy to the CPU. On a CPU machine
nothing synchronises, so the test catches the calls themselves: a dispatch mode for the ATen ops
that read values (``_local_scalar_dense``, ``nonzero``, ``equal``, ``is_nonzero``, ...) and a
function mode for the Python-level reads that bypass the dispatcher on CPU tensors (``tolist``,
``numpy``, ``cpu``). Checked on the extension path (CPU) and on the Triton path (its interpreter),
inference and training, float32, on the tiny config.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from scn_fast import AtomsBatch, SphericalChannelNetwork, preset, so3
from scn_fast.benchmark.paths import loss_of
from scn_fast.systems import cu111_co

# ATen ops whose result depends on a tensor's values on the host (a synchronisation on a GPU).
_SYNC_ATEN = {
    "_local_scalar_dense",
    "nonzero",
    "nonzero_static",
    "equal",
    "is_nonzero",
    "is_set_to",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "masked_select",
    "allclose",
}
# Python-level reads (on CPU tensors they do not go through the dispatcher).
_SYNC_METHODS = {"tolist", "numpy", "cpu", "item", "__bool__", "__int__", "__float__", "__index__"}


class SyncDetector(TorchDispatchMode):
    """Records the ATen ops that read values on the host (:data:`_SYNC_ATEN`) and copies from a
    non-CPU device to the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _SYNC_ATEN:
            self.syncs.append(f"aten::{name}")
        elif name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst_dev = args[0].device if name == "copy_" else kwargs.get("device")
            to_cpu = dst_dev is not None and torch.device(dst_dev).type == "cpu"
            if src.device.type != "cpu" and to_cpu:
                self.syncs.append(f"aten::{name} to cpu")
        return func(*args, **kwargs)


class HostReadDetector(TorchFunctionMode):
    """Records Python-level reads of tensor values (:data:`_SYNC_METHODS`, ``torch.equal``)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SYNC_METHODS or func in (torch.equal, torch.nonzero, torch.unique):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def _count_constant_builds(monkeypatch) -> list:
    """Patch ``so3.cached_constant`` (every device constant's cache) to start from empty caches
    (as a process whose model was built on another device: the CPU-side caches the model's
    construction filled do not count) and to record the cache misses."""
    built: list = []
    original = so3.cached_constant
    fresh: dict[int, dict] = {}

    def counting(cache, key, build):
        cache = fresh.setdefault(id(cache), {})
        if key not in cache:
            built.append(key)
        return original(cache, key, build)

    monkeypatch.setattr(so3, "cached_constant", counting)
    return built


@pytest.mark.parametrize("backend", ["extension", "triton"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_forward_after_prepare_has_no_host_sync(backend, training, monkeypatch):
    torch.manual_seed(0)
    model = SphericalChannelNetwork(
        **preset("tiny"), use_fused=True, backend=backend, deterministic_frames=True
    )
    data = AtomsBatch.from_ase([cu111_co(size=(2, 2, 2))])
    built = _count_constant_builds(monkeypatch)
    with torch.set_grad_enabled(training):
        st, ctx = model.prepare(data)
    assert model.explain()["edge_rotation"]["ran"] == backend
    built.clear()  # what prepare built (nothing when an earlier test cached it)
    aten, python = SyncDetector(), HostReadDetector()
    with torch.set_grad_enabled(training), python, aten:
        out = model.forward_context(st, ctx)
        if training:
            loss_of(out).backward()
    assert aten.syncs == [] and python.syncs == [], (aten.syncs, python.syncs)
    assert built == [], f"constants built inside the forward, not in prepare: {built}"
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()


def test_sync_detectors_catch_host_reads():
    """The detectors are not blind: each kind of read is caught."""
    x = torch.arange(4.0)
    aten, python = SyncDetector(), HostReadDetector()
    with python, aten:
        x.sum().item()
        torch.nonzero(x)
        x.tolist()
        bool(x[1] > 0)
    assert "aten::_local_scalar_dense" in aten.syncs and "aten::nonzero" in aten.syncs
    assert {"item", "tolist", "__bool__"} <= set(python.syncs)


def test_prepare_sync_free_constants_are_cached_per_dtype_and_device():
    """The Wigner J matrices the rotations need are moved to the device once, not at every call."""
    from scn_fast.ops import layout

    j = layout.wigner_j(3, torch.float32, torch.device("cpu"))
    assert j is layout.wigner_j(3, torch.float32, torch.device("cpu"))
    assert j.dtype == torch.float32 and j.shape == (7, 7)
    assert layout.wigner_j(3, torch.float64, torch.device("cpu")).dtype == torch.float64
    torch.testing.assert_close(j.double(), so3.wigner_j(3), rtol=0, atol=1e-7)
