"""``scn-fast train``: fairchem's S2EF training recipe for SCN, on one process or under torchrun (DDP).

Per step: a global batch of ``batch_size`` structures (seeded order, see ``SampleOrder``), split
evenly over the ranks; loss = energy_coefficient * energy MAE + force_coefficient * force L2MAE on
normalized targets (forces of fixed atoms excluded), both averaged over the *global* batch; AdamW,
gradient-norm clipping, EMA of the weights, warmup + step LR schedule (fairchem's
``warmup_lr_lambda``). Checkpoints use fairchem's layout (``scn_fast.load_checkpoint`` reads them) and
carry the optimizer, scheduler, EMA, step, RNG and data-order state so ``resume`` continues exactly.

With ``--max-atoms-per-batch A`` a step instead takes, per rank, consecutive structures of the order
up to A atoms (and at most batch_size / world_size structures). With validation data
(``--val-data`` or ``--val-fraction``) the EMA weights are evaluated every ``--eval-every`` steps
and at the end (scn_fast/evaluate.py): a ``val step N ...`` line, a row of ``DIR/metrics.csv``, and
``DIR/best_checkpoint.pt`` whenever the validation force MAE improves. Validation runs under a
forked RNG, so it leaves the training trajectory unchanged.
"""

from __future__ import annotations

import bisect
import csv
import inspect
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import distributed as dist_utils
from .checkpoint import (
    _strip_prefix,
    model_kwargs_from_config,
    normalizers_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from .datasets import (
    LabeledBatch,
    SampleOrder,
    TrainingSet,
    fit_normalizers,
    open_dataset,
    split_dataset,
)
from .datasets import rank_share as _rank_share
from .evaluate import evaluate_model, format_metrics
from .metrics import METRIC_NAMES, MetricSums
from .model import SphericalChannelNetwork
from .presets import preset as _preset
from .tap_order import optimizer_state_to_model, optimizer_state_to_upstream, params_to_model

CHECKPOINT_NAME = "checkpoint.pt"
BEST_CHECKPOINT_NAME = "best_checkpoint.pt"
METRICS_NAME = "metrics.csv"
# Options that may differ between a run and its resumption without changing the trajectory.
_RESUME_FREE_ARGS = {
    "steps",
    "resume",
    "out",
    "checkpoint_every",
    "device",
    "preset",
    "model_config",
    "val_data",
    "eval_every",
}
# Options a resumed run must repeat (they change the data order or the training set).
_RESUME_FIXED_ARGS = ("batch_size", "seed", "max_atoms_per_batch", "val_fraction")


@dataclass
class TrainConfig:
    """Options of ``scn-fast train`` (defaults: fairchem's OC20 SCN configs where they have one).

    data: ASE-readable file with energies and forces, or ``emt`` / ``builtin:emt``. preset /
    model_config: the model (a preset name, or a YAML file with SCN kwargs or fairchem's
    ``{"model": {"name": "scn", ...}}``); exactly one unless resuming. steps: total optimizer steps
    (a resumed run continues up to it). batch_size: the global batch (all ranks together). resume:
    ``""`` for ``out/checkpoint.pt``, or a checkpoint path; None starts afresh. checkpoint_every:
    also save ``out/checkpoint.pt`` every so many steps (0: only at the end). ema_decay 0 and
    clip_grad_norm 0 switch those off. max_atoms_per_batch: pack each rank's batch up to this many
    atoms (batch_size then caps the structures of a step). val_data: a labelled dataset to
    validate on, or val_fraction: the share of ``data`` held out for it (seeded); eval_every:
    validate every so many steps (0: only at the end).
    """

    data: str
    out: str
    steps: int
    preset: str | None = None
    model_config: str | None = None
    batch_size: int = 8
    lr: float = 4e-4
    seed: int = 0
    deterministic_frames: bool = False
    energy_coefficient: float = 2.0
    force_coefficient: float = 100.0
    amsgrad: bool = True
    weight_decay: float = 0.0
    warmup_steps: int = 100
    warmup_factor: float = 0.2
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.3
    clip_grad_norm: float = 100.0
    ema_decay: float = 0.999
    resume: str | None = None
    checkpoint_every: int = 0
    device: str | None = None
    use_fused: bool = False
    precision: str = "fp32"
    max_atoms_per_batch: int | None = None
    val_data: str | None = None
    val_fraction: float = 0.0
    eval_every: int = 0

    def validate(self, world_size: int = 1) -> None:
        """ValueError naming the first bad option."""
        if self.resume is None and (self.preset is None) == (self.model_config is None):
            raise ValueError("give exactly one of --preset NAME or --model-config YAML")
        if self.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.batch_size % world_size:
            raise ValueError(
                f"--batch-size {self.batch_size} (the global batch) is not divisible by the world "
                f"size {world_size} (number of processes): every rank takes batch_size / world_size "
                "structures"
            )
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise ValueError("--warmup-steps and --checkpoint-every must be >= 0")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1], got {self.ema_decay}")
        if self.clip_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError("--clip-grad-norm and --weight-decay must be >= 0")
        if self.energy_coefficient < 0 or self.force_coefficient < 0:
            raise ValueError("--energy-coefficient and --force-coefficient must be >= 0")
        if self.max_atoms_per_batch is not None and self.max_atoms_per_batch < 1:
            raise ValueError(f"--max-atoms-per-batch must be >= 1, got {self.max_atoms_per_batch}")
        if self.val_data is not None and self.val_fraction:
            raise ValueError("give --val-data or --val-fraction, not both")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {self.eval_every}")
        if list(self.lr_milestones) != sorted(self.lr_milestones):
            raise ValueError(f"--lr-milestones must be increasing, got {self.lr_milestones}")

    def optim_config(self) -> dict[str, Any]:
        """The fairchem-style ``optim`` section stored in checkpoints."""
        return {
            "optimizer": "AdamW",
            "optimizer_params": {"amsgrad": self.amsgrad, "weight_decay": self.weight_decay},
            "lr_initial": self.lr,
            "scheduler": "LambdaLR",
            "warmup_steps": self.warmup_steps,
            "warmup_factor": self.warmup_factor,
            "lr_milestones": list(self.lr_milestones),
            "lr_gamma": self.lr_gamma,
            "clip_grad_norm": self.clip_grad_norm,
            "batch_size": self.batch_size,
            "max_steps": self.steps,
            "energy_coefficient": self.energy_coefficient,
            "force_coefficient": self.force_coefficient,
        }


# ----------------------------------------------------------------------------- loss


def energy_abs_sum(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum_i |pred_i - target_i| over the structures of a batch; pred, target (b,). Divided by the
    global structure count it is the energy MAE."""
    if pred.shape != target.shape:
        raise ValueError(f"energy prediction {tuple(pred.shape)} vs target {tuple(target.shape)}")
    return (pred - target).abs().sum()


def force_l2_sum(pred: torch.Tensor, target: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """sum over free atoms a of ||pred_a - target_a||_2; pred, target (n, 3), free (n,) bool (fixed
    atoms excluded). Divided by the global count of free atoms it is fairchem's force L2MAE."""
    if pred.shape != target.shape or free.shape != pred.shape[:1]:
        raise ValueError(
            f"force prediction {tuple(pred.shape)}, target {tuple(target.shape)} and free mask "
            f"{tuple(free.shape)} disagree"
        )
    return torch.linalg.vector_norm(pred[free] - target[free], ord=2, dim=-1).sum()


def normalize(values: torch.Tensor, norm: Mapping[str, float] | None) -> torch.Tensor:
    """fairchem's ``Normalizer.norm``: (values - mean) / rmsd (identity without a normalizer)."""
    if not norm:
        return values
    return (values - norm["mean"]) / norm["rmsd"]


def training_loss(
    out: Mapping[str, torch.Tensor],
    batch: LabeledBatch,
    normalizers: Mapping[str, Mapping[str, float]],
    *,
    energy_coefficient: float,
    force_coefficient: float,
    num_structures: int,
    num_free_atoms: int,
) -> torch.Tensor:
    """This rank's share of the global loss (a scalar; the shares of all ranks sum to it):

        energy_coefficient * sum_i |E_i - E_i*| / num_structures
      + force_coefficient * sum_{free a} ||F_a - F_a*|| / num_free_atoms

    out: the model's normalized outputs ``energy`` (b,), ``forces`` (n, 3); targets are normalized
    with ``normalizers`` as fairchem does. num_structures / num_free_atoms: the counts of the
    *global* batch, so summing the ranks' shares gives the MAE / L2MAE over the whole batch."""
    energy = normalize(batch.energy, normalizers.get("energy")).to(out["energy"].dtype)
    loss = energy_coefficient * energy_abs_sum(out["energy"], energy) / max(num_structures, 1)
    if force_coefficient:
        if "forces" not in out:
            raise ValueError("the model predicts no forces (regress_forces=False)")
        forces = normalize(batch.forces, normalizers.get("forces")).to(out["forces"].dtype)
        force_sum = force_l2_sum(out["forces"], forces, batch.free)
        loss = loss + force_coefficient * force_sum / max(num_free_atoms, 1)
    return loss


# ----------------------------------------------------------------------------- schedule, EMA


def warmup_lr_lambda(
    step: int,
    warmup_steps: int,
    warmup_factor: float,
    lr_milestones: Sequence[int],
    lr_gamma: float,
) -> float:
    """LR multiplier after ``step`` scheduler steps (fairchem's ``warmup_lr_lambda``): linear from
    ``warmup_factor`` at step 0 to 1 at ``warmup_steps``, then ``lr_gamma ** k`` with k the number
    of milestones <= step. warmup_steps 0 means no warmup."""
    if warmup_steps > 0 and step <= warmup_steps:
        alpha = step / float(warmup_steps)
        return warmup_factor * (1.0 - alpha) + alpha
    return lr_gamma ** bisect.bisect(list(lr_milestones), step)


class ExponentialMovingAverage:
    """EMA shadow of the trainable parameters (in ``parameters`` order), fairchem's semantics with
    ``use_num_updates``: update k uses decay_k = min(decay, (1 + k) / (10 + k)) and sets
    shadow <- shadow + (1 - decay_k) * (param - shadow)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow_params = [p.detach().clone() for p in parameters if p.requires_grad]

    def current_decay(self) -> float:
        """The decay the next ``update`` uses."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Fold the current values of ``parameters`` (the same list as at construction) in."""
        one_minus = 1.0 - self.current_decay()
        self.num_updates += 1
        params = [p for p in parameters if p.requires_grad]
        for s, p in zip(self.shadow_params, params, strict=True):
            s.add_(p.detach() - s, alpha=one_minus)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from a checkpoint's ``ema`` entry (``shadow_params``, ``num_updates``)."""
        shadow = state["shadow_params"]
        if len(shadow) != len(self.shadow_params):
            raise ValueError(
                f"checkpoint EMA has {len(shadow)} tensors, the model {len(self.shadow_params)}"
            )
        for s, t in zip(self.shadow_params, shadow, strict=True):
            s.copy_(t)
        self.num_updates = int(state.get("num_updates") or 0)


# ----------------------------------------------------------------------------- model


def load_model_config(path: str) -> dict[str, Any]:
    """SCN constructor kwargs from a YAML file holding either the kwargs themselves or a
    fairchem-style config ``{"model": {"name": "scn", ...}, ...}`` (other sections ignored)."""
    import yaml

    if not os.path.exists(path):
        raise FileNotFoundError(f"no such model config: {path}")
    with open(path) as f:
        try:
            doc = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ValueError(f"cannot parse {path} as YAML: {exc}") from exc
    if not isinstance(doc, Mapping):
        raise ValueError(f"{path} must hold a mapping of SCN options, got {type(doc).__name__}")
    if "model" not in doc:
        doc = {"model": {"name": "scn", **doc}}
    return model_kwargs_from_config(doc)


def model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Upstream constructor kwargs of the model ``cfg`` asks for (preset or YAML)."""
    return _preset(cfg.preset) if cfg.preset is not None else load_model_config(cfg.model_config)


def _resume_path(cfg: TrainConfig) -> str:
    return os.path.join(cfg.out, CHECKPOINT_NAME) if cfg.resume == "" else str(cfg.resume)


def _check_resume_args(cfg: TrainConfig, stored: Mapping[str, Any], path: str) -> None:
    for key in _RESUME_FIXED_ARGS:
        if key in stored and stored[key] != getattr(cfg, key):
            raise ValueError(
                f"--{key.replace('_', '-')} {getattr(cfg, key)} differs from {stored[key]} of the "
                f"run in {path}; resume with the same value"
            )
    changed = sorted(
        k
        for k, v in stored.items()
        if k not in _RESUME_FREE_ARGS and hasattr(cfg, k) and getattr(cfg, k) != v
    )
    if changed:
        warnings.warn(
            f"resuming {path} with options that differ from the original run: {changed}",
            stacklevel=3,
        )


# ----------------------------------------------------------------------------- loop


class _Trainer:
    """State of one training run (one rank)."""

    def __init__(self, cfg: TrainConfig, info: dist_utils.DistInfo) -> None:
        self.cfg, self.info = cfg, info
        ckpt = read_checkpoint(_resume_path(cfg)) if cfg.resume is not None else None
        state = (ckpt or {}).get("train_state") or {}
        if ckpt is not None:
            if "optimizer" not in ckpt or not state:
                raise ValueError(
                    f"{_resume_path(cfg)} holds no training state (optimizer, data order); only "
                    "checkpoints written by scn-fast train can be resumed"
                )
            _check_resume_args(cfg, state.get("args") or {}, _resume_path(cfg))
            kwargs = model_kwargs_from_config(ckpt["config"])
            if cfg.preset is not None or cfg.model_config is not None:
                differ = sorted(k for k, v in model_kwargs(cfg).items() if kwargs.get(k) != v)
                if differ:
                    raise ValueError(
                        f"the model asked for differs from the one in {_resume_path(cfg)} in "
                        f"{differ}; resume without --preset / --model-config to use the stored one"
                    )
        else:
            kwargs = model_kwargs(cfg)

        data = open_dataset(cfg.data)
        val_data = None
        if cfg.val_fraction:
            data, val_data = split_dataset(data, cfg.val_fraction, cfg.seed)
        elif cfg.val_data is not None:
            val_data = open_dataset(cfg.val_data, "validation file")
        self.dataset = TrainingSet(data, source=data.source)
        self.val_set = TrainingSet(val_data) if val_data is not None else None
        self.best_forces_mae = math.inf
        self.validated_step = -1
        if cfg.max_atoms_per_batch is None and cfg.batch_size > len(self.dataset):
            raise ValueError(
                f"--batch-size {cfg.batch_size} exceeds the {len(self.dataset)} structures of "
                f"{cfg.data}"
            )
        self.device = dist_utils.resolve_device(cfg.device, info)
        torch.manual_seed(cfg.seed)
        self.model = SphericalChannelNetwork(
            **kwargs,
            use_fused=cfg.use_fused,
            deterministic_frames=cfg.deterministic_frames,
            precision=cfg.precision,
        ).to(self.device)
        self.model.train()
        if cfg.force_coefficient and not self.model.model_config.get("regress_forces", True):
            raise ValueError("the model has regress_forces=False but --force-coefficient is > 0")
        if ckpt is not None:
            self.normalizers = normalizers_from_checkpoint(ckpt)
        else:
            self.normalizers = fit_normalizers(self.dataset, seed=cfg.seed)
        self.model.normalizers = self.normalizers
        params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad
        )

        def lr_lambda(step: int) -> float:
            return warmup_lr_lambda(
                step, cfg.warmup_steps, cfg.warmup_factor, cfg.lr_milestones, cfg.lr_gamma
            )

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.ema = ExponentialMovingAverage(params, cfg.ema_decay) if cfg.ema_decay else None
        self.order = SampleOrder(len(self.dataset), cfg.seed)
        self.step = 0
        self.losses: list[float] = []
        if ckpt is not None:
            self._restore(ckpt, state)

    def _restore(self, ckpt: Mapping[str, Any], state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(_strip_prefix(ckpt["state_dict"]), strict=True)
        # checkpoints hold optimizer and EMA state in upstream's layout (scn_fast.tap_order)
        self.optimizer.load_state_dict(optimizer_state_to_model(self.model, ckpt["optimizer"]))
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.ema is not None:
            if not ckpt.get("ema"):
                raise ValueError("the checkpoint holds no EMA state but --ema-decay is set")
            ema = dict(ckpt["ema"])
            ema["shadow_params"] = params_to_model(self.model, ema["shadow_params"])
            self.ema.load_state_dict(ema)
        self.order.load_state_dict(state["data_order"])
        self.step = int(ckpt["step"])
        self.losses = [float(x) for x in state.get("losses", [])]
        self.best_forces_mae = float(state.get("best_val_forces_mae", math.inf))
        self.validated_step = int(state.get("validated_step", -1))
        rng = state.get("rng") or []
        if rng:
            mine = rng[self.info.rank] if len(rng) == self.info.world_size else rng[0]
            torch.set_rng_state(mine["torch"])
            if mine.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)

    def save(self, path: str) -> None:
        """Write the fairchem-layout checkpoint with the full training state (collective: every
        rank calls it, rank 0 writes)."""
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        rng = dist_utils.all_gather_objects({"torch": torch.get_rng_state(), "cuda": cuda_rng})
        if not self.info.is_main:
            return
        args = asdict(self.cfg)
        args["lr_milestones"] = list(args["lr_milestones"])
        extra = {
            "optimizer": optimizer_state_to_upstream(self.model, self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "train_state": {
                "step": self.step,
                "world_size": self.info.world_size,
                "data_order": self.order.state_dict(),
                "rng": rng,
                "losses": list(self.losses),
                "best_val_forces_mae": self.best_forces_mae,
                "validated_step": self.validated_step,
                "args": args,
            },
        }
        save_checkpoint(
            path,
            self.model,
            normalizers=self.normalizers,
            ema_shadow=self.ema.shadow_params if self.ema is not None else None,
            ema_decay=self.cfg.ema_decay if self.ema is not None else None,
            ema_num_updates=self.ema.num_updates if self.ema is not None else 0,
            optim_config=self.cfg.optim_config(),
            extra=extra,
            step=self.step,
            epoch=self.order.epoch,
        )

    def run(self) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        per_rank = cfg.batch_size // info.world_size
        if cfg.max_atoms_per_batch is None:
            print(f"rank {info.rank} of {info.world_size}: {per_rank} samples per step", flush=True)
        else:
            print(
                f"rank {info.rank} of {info.world_size}: up to {cfg.max_atoms_per_batch} atoms "
                f"and {per_rank} samples per step",
                flush=True,
            )
        net: torch.nn.Module = self.model
        if info.distributed:
            ddp = torch.nn.parallel.DistributedDataParallel
            # The buffers are constants, equal on every rank: no per-forward broadcast.
            no_sync = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
                else {"broadcast_buffers": False}  # torch < 2.13
            )
            net = ddp(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **no_sync,
            )
        os.makedirs(cfg.out, exist_ok=True)
        path = os.path.join(cfg.out, CHECKPOINT_NAME)
        bar = None
        if info.is_main and sys.stdout.isatty() and cfg.steps > self.step:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step")
        if info.is_main and self.val_set is not None:
            self._open_metrics_file(resumed=cfg.resume is not None)
        start = time.perf_counter()
        first_step = self.step
        while self.step < cfg.steps:
            loss, lr = self._train_step(net)
            self.step += 1
            self.losses.append(loss)
            line = f"step {self.step} loss={loss:.8g} lr={lr:.4g}"
            if bar is not None:
                bar.write(line)
                bar.set_postfix(loss=f"{loss:.4g}")
                bar.update(1)
            elif info.is_main:
                print(line, flush=True)
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self._validate(bar)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save(path)
        if self.val_set is not None and self.validated_step != self.step:
            self._validate(bar)
        if bar is not None:
            bar.close()
        self.save(path)
        elapsed = time.perf_counter() - start
        if info.is_main:
            done = self.step - first_step
            print(
                f"trained {done} step(s) in {elapsed:.1f} s; checkpoint: {path}"
                + (f" (EMA decay {cfg.ema_decay})" if self.ema is not None else ""),
                flush=True,
            )
        dist_utils.barrier()
        return {
            "checkpoint": path,
            "losses": list(self.losses),
            "steps": self.step,
            "best_val_forces_mae": self.best_forces_mae,
        }

    # ------------------------------------------------------------------------- validation

    def _open_metrics_file(self, resumed: bool) -> None:
        """Start ``DIR/metrics.csv`` (a fresh run) or continue it (a resumed one: rows of steps
        after the checkpoint's, written before an interruption, are dropped)."""
        self.metrics_path = os.path.join(self.cfg.out, METRICS_NAME)
        header = ["step", "epoch", "train_loss", *METRIC_NAMES, "num_structures"]
        rows: list[list[str]] = []
        if resumed and os.path.exists(self.metrics_path):
            with open(self.metrics_path, newline="") as f:
                old = list(csv.reader(f))
            rows = [r for r in old[1:] if r and r[0].isdigit() and int(r[0]) <= self.step]
        with open(self.metrics_path, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])

    @torch.no_grad()
    def _validate(self, bar: Any = None) -> dict[str, float]:
        """Evaluate the EMA weights (the current ones without EMA) on the validation set, each rank
        a strided share, sums all-reduced; log, append to metrics.csv, keep the best checkpoint."""
        cfg, info = self.cfg, self.info
        params = [p for p in self.model.parameters() if p.requires_grad]
        backup = None
        if self.ema is not None:
            backup = [p.detach().clone() for p in params]
            for p, s in zip(params, self.ema.shadow_params, strict=True):
                p.copy_(s)
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                sums, _ = evaluate_model(
                    self.model,
                    self.val_set.dataset,
                    indices=range(info.rank, len(self.val_set), info.world_size),
                    batch_size=max(cfg.batch_size // info.world_size, 1),
                    max_atoms=cfg.max_atoms_per_batch,
                )
        finally:
            if backup is not None:
                for p, b in zip(params, backup, strict=True):
                    p.copy_(b)
        total = MetricSums()
        total.values = dist_utils.all_reduce_sum(sums.values.to(self.device)).cpu()
        metrics = total.result()
        self.validated_step = self.step
        if info.is_main:
            line = f"val step {self.step} {format_metrics(metrics)}"
            if bar is not None:
                bar.write(line)
            else:
                print(line, flush=True)
            with open(self.metrics_path, "a", newline="") as f:
                csv.writer(f).writerow(
                    [
                        self.step,
                        self.order.epoch,
                        self.losses[-1] if self.losses else "",
                        *(f"{metrics[k]:.8g}" for k in METRIC_NAMES),
                        metrics["num_structures"],
                    ]
                )
        if metrics["forces_mae"] < self.best_forces_mae:
            self.best_forces_mae = metrics["forces_mae"]
            self.save(os.path.join(cfg.out, BEST_CHECKPOINT_NAME))
        return metrics

    # ------------------------------------------------------------------------- one step

    def _next_indices(self) -> tuple[list[int], int]:
        """(this rank's structures, the global batch's structure count) of the next step."""
        cfg, info = self.cfg, self.info
        if cfg.max_atoms_per_batch is None:
            global_idx = self.order.next_batch(cfg.batch_size)
            return _rank_share(global_idx, info.rank, info.world_size), cfg.batch_size
        packs = self.order.next_packs(
            self.dataset.natoms,
            cfg.max_atoms_per_batch,
            num_packs=info.world_size,
            max_structures=max(cfg.batch_size // info.world_size, 1),
        )
        return packs[info.rank], sum(len(p) for p in packs)

    def _train_step(self, net: torch.nn.Module) -> tuple[float, float]:
        """One optimizer step; returns (global loss before the step, learning rate it used)."""
        cfg, info = self.cfg, self.info
        local_idx, num_structures = self._next_indices()
        batch = self.dataset.batch(local_idx, dtype=self.model.dtype, device=self.device)
        num_free = int(dist_utils.all_reduce_sum(batch.free.sum()))
        out = net(batch.data)
        loss = training_loss(
            out,
            batch,
            self.normalizers,
            energy_coefficient=cfg.energy_coefficient,
            force_coefficient=cfg.force_coefficient,
            num_structures=num_structures,
            num_free_atoms=num_free,
        )
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks; the shares already sum to the global loss.
        (loss * info.world_size).backward()
        if cfg.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=cfg.clip_grad_norm)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model.parameters())
        self.scheduler.step()
        total = float(dist_utils.all_reduce_sum(loss.detach()))
        if not math.isfinite(total):
            raise FloatingPointError(f"loss is {total} at step {self.step + 1}")
        return total, lr


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run ``scn-fast train``; under torchrun (``WORLD_SIZE`` > 1) with DDP. Returns
    {"checkpoint": path, "losses": per-step global losses (all steps, resumed ones included),
    "best_val_forces_mae": the best validation force MAE (inf without validation),
    "steps": final step}. ValueError / FileNotFoundError for bad options or data."""
    info = dist_utils.dist_info_from_env()
    cfg.validate(info.world_size)
    try:
        trainer = _Trainer(cfg, info)
        dist_utils.init_process_group(info, trainer.device)
        return trainer.run()
    finally:
        dist_utils.destroy_process_group()
