"""Counting the kernel launches of a step on a device that need not be present.

A training step on a GPU is a sequence of kernel launches: the Triton kernels of the fused ops and
the ATen ops (cuBLAS GEMMs, elementwise ops, copies, fills) that the model's forward, the fused ops
and autograd's backward call. :func:`record_step` records that sequence for a model, a batch and a
device (``"cuda"`` on a CPU machine too) without computing anything:

1. ``prepare`` runs for real on the batch's own device (CPU): radius graph, edge ranking, frames,
   rotations and the plan *for the target device* (``model.plan_for(device, ...)``, the plan a GPU
   run builds);
2. the structure, the planned edge context and the model's weights are replaced by *meta* tensors
   of the same shapes (shape-only: no memory, no math);
3. ``model.forward_context`` (and, for training, the benchmark's loss and ``backward``) runs under
   :class:`LaunchRecorder`: every ATen op that reaches the dispatcher is recorded, except the ones
   that launch nothing on a GPU (views, allocations, metadata: :data:`NO_LAUNCH`); the model's own
   custom ops (``torch.ops.scn_fast.*``) run their real implementation on the meta tensors (their
   launchers, tile loops and ATen calls), and every Triton launch goes through
   ``scn_fast.kernels.aot.launch``, which on meta tensors records (kernel, grid, arguments) in
   ``aot.trace()`` instead of launching.

So the counts come from the code that runs on the GPU (the plan, the model's forward, the
launchers' tile loops), not from a model of it (``scn_fast.gpu_cost`` is the model; docs/gpu.md
compares the two). The step is run twice and the second one is recorded: the first builds the
constants a GPU run caches after its first step.

What a count means: one ATen op that computes is counted as one kernel. That is exact for most ops
(an elementwise op, a copy, a fill, a cuBLAS GEMM) and a lower bound for a few (a cuBLAS split-K
GEMM adds a reduction kernel; ``embedding_dense_backward`` sorts; ``slice_backward`` is a fill and a
copy). Ops on non-meta tensors inside the step (host work, or a constant built per step) are
recorded apart, in :attr:`LaunchRecord.host_ops`: a GPU step should have none.
Custom ops of the C++ extension (``scn_fast_ext``) cannot be recorded (their CUDA code is C++):
:func:`record_step` refuses plans that run them. ``python -m scn_fast.launches`` prints
:func:`record_table` (scn-t4-b2 at 100 / 1,000 / 2,000 atoms, every precision, training and
inference), the counts ``scn_fast.gpu_cost.RECORDED_LAUNCHES`` holds.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["NO_LAUNCH", "LaunchRecord", "LaunchRecorder", "record_step", "record_table", "to_meta"]

# ATen ops that launch no kernel on a GPU: views and metadata changes, allocations without a fill.
NO_LAUNCH = frozenset(
    {
        "_reshape_alias",
        "_unsafe_view",
        "alias",
        "as_strided",
        "detach",
        "diagonal",
        "empty",
        "empty_like",
        "empty_strided",
        "expand",
        "lift_fresh",
        "narrow",
        "new_empty",
        "new_empty_strided",
        "permute",
        "select",
        "slice",
        "split",
        "split_with_sizes",
        "squeeze",
        "t",
        "transpose",
        "unbind",
        "unfold",
        "unsqueeze",
        "view",
        "view_as",
    }
)


@dataclass
class LaunchRecord:
    """The launches of one recorded step, in order.

    ``triton``: ``scn_fast.kernels.aot.Launch`` records (label, kernel, grid, arguments);
    ``aten``: (where, op) pairs, ``where`` the ``scn_fast`` custom op that called the ATen op
    ("" outside any); ``host_ops``: ATen ops on non-meta tensors (host work inside the step);
    ``custom_ops``: the ``scn_fast`` custom ops called; ``stolen_grad_copies``: gradient copies
    made by autograd's AccumulateGrad that a real run does not make (:class:`LaunchRecorder`),
    not counted."""

    triton: list = field(default_factory=list)
    aten: list[tuple[str, str]] = field(default_factory=list)
    host_ops: list[str] = field(default_factory=list)
    custom_ops: list[str] = field(default_factory=list)
    stolen_grad_copies: int = 0

    @property
    def total(self) -> int:
        """Kernel launches of the step: Triton launches plus ATen ops that launch a kernel."""
        return len(self.triton) + len(self.aten)

    def by_kernel(self) -> Counter:
        """Launch counts per Triton kernel label and per ATen op ("aten::<op>")."""
        counts = Counter(launch.label for launch in self.triton)
        counts.update(f"aten::{op}" for _, op in self.aten)
        return counts

    def by_op(self) -> Counter:
        """ATen launch counts per calling custom op ("" for the model's own code)."""
        return Counter(where for where, _ in self.aten)


def _has_kernel(func, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key)


class LaunchRecorder(TorchDispatchMode):
    """A dispatch mode that records the ATen ops that would launch a GPU kernel into ``record``
    (:class:`LaunchRecord`) and runs them (on meta tensors: shapes only). ``scn_fast`` custom ops
    run their own implementation inside the mode (their inner ATen ops and Triton launches are
    recorded, attributed to the op), not their fake; ATen ops without a kernel of their own
    (CompositeImplicitAutograd, e.g. ``reshape``, ``matmul``, ``to``) are decomposed so that what
    they call is recorded. Triton launches are recorded by ``scn_fast.kernels.aot.trace()``, which
    :func:`record_step` enters around the mode.

    One artefact of running custom ops inside the mode is left out: their gradient outputs come
    back through Python with one more reference than the dispatcher leaves, so autograd's
    AccumulateGrad, which takes a parameter's gradient over when it holds the only reference,
    copies it instead (``copy_`` into a fresh tensor). A real run takes it over
    (tests/test_edge_linear.py checks that on CPU); those copies are counted apart, in
    ``stolen_grad_copies``."""

    def __init__(self, record: LaunchRecord | None = None) -> None:
        super().__init__()
        self.record = record if record is not None else LaunchRecord()
        self._where: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        if ns == "scn_fast":
            from torch._library.custom_ops import OPDEFS

            name = func._schema.name
            self.record.custom_ops.append(name)
            self._where.append(name.split("::", 1)[1])
            try:
                with self:
                    return OPDEFS[name]._init_fn(*args, **kwargs)
            finally:
                self._where.pop()
        if ns == "scn_fast_ext":
            raise NotImplementedError(
                f"{func}: the C++ extension's ops cannot be recorded on meta tensors"
            )
        if (
            not _has_kernel(func, "CPU")
            and not _has_kernel(func, "Meta")
            and _has_kernel(func, "CompositeImplicitAutograd")
        ):
            with self:
                return func.decompose(*args, **kwargs)
        op = func.overloadpacket.__name__
        node = torch._C._current_autograd_node()
        if op == "copy_" and node is not None and node.name().endswith("AccumulateGrad"):
            self.record.stolen_grad_copies += 1
            return func(*args, **kwargs)
        if op not in NO_LAUNCH:
            tensors = [
                t
                for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)
            ]
            if any(t.device.type != "meta" for t in tensors):
                self.record.host_ops.append(op)
            else:
                self.record.aten.append((self._where[-1] if self._where else "", op))
        return func(*args, **kwargs)


def to_meta(obj: Any) -> Any:
    """``obj`` with every tensor replaced by a meta tensor of the same shape, dtype and strides
    (through tuples, lists, dicts and dataclasses, e.g. a ``Structure`` or an ``EdgeContext``)."""
    if isinstance(obj, torch.Tensor):
        return obj.to("meta")
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_meta(v) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_meta(v) for v in obj)
    if isinstance(obj, dict):
        return {k: to_meta(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: to_meta(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


class _Context(torch.nn.Module):
    """``model.forward_context`` as a module's forward (for ``torch.func.functional_call``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, st, ctx):
        return self.model.forward_context(st, ctx)


def record_step(
    model,
    data: Any,
    device: torch.device | str = "cuda",
    *,
    training: bool = True,
    capability: tuple[int, int] | None = None,
) -> LaunchRecord:
    """The kernel launches of one step of ``model`` on ``data`` as it would run on ``device``
    (module doc): the forward after ``prepare`` and, with ``training``, the benchmark's loss and
    the backward. ``model`` is not changed (its weights are replaced by meta tensors for the call;
    a model built on the meta device works too); ``data``: a batch on the CPU.
    ``capability``: the GPU's compute capability the plan assumes (default
    ``scn_fast.precision.ASSUMED_CUDA_CAPABILITY``)."""
    from . import ops
    from .benchmark.paths import loss_of
    from .kernels import aot
    from .planning import Mode, build_plan

    device = torch.device(device)
    st = model.read_input(data)
    graph = model.generate_graph(data, st)
    d = model.dispatcher
    last_plan = d.plan
    try:
        if capability is None:
            plan = model.plan_for(device, st.pos.dtype, training)
        else:
            plan = build_plan(
                model._shape, d, device, st.pos.dtype, model.precision, Mode(training), capability
            )
    finally:
        d.plan = last_plan
    if any(op.ran == "extension" for op in plan.ops.values()):
        raise ValueError(
            "record_step records Triton and ATen launches; this plan runs the C++ extension "
            f"({plan.explain()})"
        )
    ctx = model.edge_context(st, graph, plan)
    ops.prepare_constants(ctx, model.grid, model.num_sphere_samples, model.lmax)
    st_m, ctx_m = to_meta(st), to_meta(ctx)
    ops.prepare_constants(ctx_m, model.grid, model.num_sphere_samples, model.lmax)
    weights = {
        f"model.{k}": torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
        for k, p in model.named_parameters()
    }
    weights.update({f"model.{k}": b.to("meta") for k, b in model.named_buffers()})
    wrapper = _Context(model)
    record = LaunchRecord()
    for recorded in (False, True):  # the first step builds what a GPU run caches
        rec = LaunchRecorder(record if recorded else None)
        with aot.trace() as launches, rec, torch.set_grad_enabled(training):
            out = torch.func.functional_call(wrapper, weights, (st_m, ctx_m), strict=False)
            if training:
                loss_of(out).backward()
        for w in weights.values():
            w.grad = None
        if recorded:
            record.triton = list(launches)
    return record


def record_table(
    config: str = "scn-t4-b2",
    atoms_list: tuple[int, ...] = (100, 1000, 2000),
    precisions: tuple[str, ...] = ("fp32", "tf32", "bf16"),
    device: str = "cuda",
) -> dict[tuple[str, str, int], tuple[int, int]]:
    """{(mode, precision, atoms): (Triton launches, ATen launches)} of one step of ``config`` on
    the built-in Cu slab of each size (``scn_fast.systems.slab_of_size``), training and inference,
    as :func:`record_step` records them for ``device`` (a few seconds per entry on a CPU)."""
    from .data import AtomsBatch
    from .model import SphericalChannelNetwork
    from .presets import preset
    from .systems import slab_of_size

    with torch.device("meta"):  # weights are never read
        model = SphericalChannelNetwork(**preset(config), use_fused=True, deterministic_frames=True)
    table = {}
    for atoms in atoms_list:
        data = AtomsBatch.from_ase([slab_of_size(atoms)])
        for precision in precisions:
            model.precision = precision
            for mode in ("training", "inference"):
                rec = record_step(model, data, device, training=mode == "training")
                if rec.host_ops:
                    raise RuntimeError(f"host work inside the step: {rec.host_ops}")
                table[(mode, precision, atoms)] = (len(rec.triton), len(rec.aten))
    return table


if __name__ == "__main__":
    for key, value in record_table().items():
        print(f"    {key!r}: {value!r},", flush=True)
