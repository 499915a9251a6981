"""Trainer checkpoints: load ocpmodels / fairchem SCN checkpoints, save in fairchem's layout.

Two layouts are read (both as the trainers saved them, weights under ``state_dict`` with or without
DataParallel/DDP's ``module.`` prefix, EMA shadow weights under ``ema``):

- ocpmodels: ``config["model"] == "scn"``, constructor kwargs in ``config["model_attributes"]``,
  normalizers ``{"target": {"mean", "std"}, "grad_target": {"mean", "std"}}`` (or, in older files,
  ``config["dataset"]`` with ``normalize_labels`` and ``target_mean`` / ``target_std`` / ...);
- fairchem: ``config["model"] = {"name": "scn", **kwargs}``, normalizers
  ``{"energy": {"mean", "rmsd"}, "forces": {"mean", "rmsd"}}``.

``save_checkpoint`` writes the fairchem layout (``scn-fast train`` uses it); ``load_checkpoint`` reads
both and returns an eval-mode model whose ``predict`` applies the normalizers.
"""

from __future__ import annotations

import inspect
import os
import pickle
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .model import SphericalChannelNetwork
from .tap_order import params_to_model, params_to_upstream

MODEL_NAMES = ("scn", "SphericalChannelNetwork", "spherical_channel_network")

# Keys a trainer config may carry for the model that the SCN constructor does not take; ignored.
_TRAINER_ONLY_KEYS = {"name", "num_atoms", "bond_feat_dim", "num_targets"}

# scn_fast's own constructor options (not upstream's; never stored in a checkpoint's config).
_RUNTIME_KEYS = {"use_fused", "backend", "precision", "deterministic_frames"}


# Top-level key of the model configuration the weights were trained with (written by
# save_checkpoint, next to the editable config["model"]); load_checkpoint compares it with the
# configuration it builds and warns on a difference that keeps the shapes but changes the model.
TRAINED_CONFIG_KEY = "scn_fast_trained_model_config"

# Configuration keys that may differ from the trained one without changing what the weights mean.
_HARMLESS_KEYS = {"otf_graph", "show_timing_info"}


def _warn_config_mismatch(trained: Any, built: Mapping[str, Any]) -> None:
    """Warn, naming each key, when the model built from a checkpoint differs from the configuration
    its weights were trained with (``trained``, None for checkpoints without one)."""
    if not isinstance(trained, Mapping):
        return
    differ = {
        k: (trained[k], built[k])
        for k in sorted(set(trained) & set(built) - _HARMLESS_KEYS)
        if trained[k] != built[k]
    }
    if differ:
        listed = ", ".join(f"{k}: trained {a!r}, now {b!r}" for k, (a, b) in differ.items())
        warnings.warn(
            f"the checkpoint's weights were trained with another model configuration ({listed}); "
            "the model loads (the shapes agree) but computes something else",
            stacklevel=3,
        )


def _constructor_keys() -> set[str]:
    return set(inspect.signature(SphericalChannelNetwork.__init__).parameters) - {"self"}


def model_kwargs_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The SCN constructor kwargs of a trainer config (either layout). Keys the constructor does not
    know are dropped with a warning naming them; a model that is not SCN is a ValueError."""
    model = config.get("model")
    if isinstance(model, Mapping):
        kwargs = dict(model)
        name = kwargs.pop("name", None)
    elif isinstance(model, str):
        name = model
        kwargs = dict(config.get("model_attributes") or {})
    else:
        raise ValueError(
            "checkpoint config has no model section: expected config['model'] as a dict with "
            "'name' (fairchem) or a name with config['model_attributes'] (ocpmodels)"
        )
    if name is not None and name not in MODEL_NAMES:
        raise ValueError(
            f"checkpoint holds model {name!r}, not SCN (accepted names: {MODEL_NAMES})"
        )
    known = _constructor_keys() - _RUNTIME_KEYS
    dropped = sorted(k for k in kwargs if k not in known or k in _TRAINER_ONLY_KEYS)
    unexpected = [k for k in dropped if k not in _TRAINER_ONLY_KEYS]
    if unexpected:
        warnings.warn(
            f"checkpoint model config keys not used by SCN, ignored: {unexpected}", stacklevel=3
        )
    return {k: v for k, v in kwargs.items() if k not in dropped}


def _as_float(value: Any, what: str) -> float:
    try:
        return float(torch.as_tensor(value).reshape(-1)[0])
    except Exception as exc:
        raise ValueError(f"checkpoint normalizer {what} is not a number: {value!r}") from exc


def normalizers_from_checkpoint(ckpt: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """{"energy"|"forces": {"mean", "rmsd"}} from either layout (empty when the model was trained on
    raw targets)."""
    out: dict[str, dict[str, float]] = {}
    stored = ckpt.get("normalizers") or {}
    renamed = {"target": "energy", "grad_target": "forces"}
    for key, norm in stored.items():
        name = renamed.get(key, key)
        if name not in ("energy", "forces") or norm is None:
            continue
        scale = norm.get("rmsd", norm.get("std"))
        if scale is None or "mean" not in norm:
            raise ValueError(f"checkpoint normalizer {key!r} needs 'mean' and 'rmsd' (or 'std')")
        out[name] = {
            "mean": _as_float(norm["mean"], f"{key}.mean"),
            "rmsd": _as_float(scale, f"{key}.rmsd"),
        }
    if not out:  # old ocpmodels: statistics in the dataset config
        dataset = (ckpt.get("config") or {}).get("dataset") or {}
        if isinstance(dataset, list):
            dataset = dataset[0] if dataset else {}
        if isinstance(dataset, Mapping) and dataset.get("normalize_labels"):
            for name, prefix in (("energy", "target"), ("forces", "grad_target")):
                if f"{prefix}_std" in dataset:
                    out[name] = {
                        "mean": _as_float(dataset.get(f"{prefix}_mean", 0.0), f"{prefix}_mean"),
                        "rmsd": _as_float(dataset[f"{prefix}_std"], f"{prefix}_std"),
                    }
    return out


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        out[key] = value
    return out


def _check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches {mismatched}")
    if problems:
        raise ValueError(
            "checkpoint weights do not fit the SCN built from its config: " + "; ".join(problems)
        )


def _load_ema(model: torch.nn.Module, ema: Mapping[str, Any]) -> None:
    shadow = ema.get("shadow_params")
    params = [p for p in model.parameters() if p.requires_grad]
    if shadow is None or len(shadow) != len(params):
        raise ValueError(
            f"checkpoint EMA has {None if shadow is None else len(shadow)} shadow parameters, the "
            f"model {len(params)} trainable parameters"
        )
    bad = [
        i for i, (s, p) in enumerate(zip(shadow, params, strict=True)) if tuple(s.shape) != p.shape
    ]
    if bad:
        raise ValueError(f"checkpoint EMA shadow parameters {bad} do not match the model's shapes")
    with torch.no_grad():  # shadow parameters are in upstream's layout (tap_order)
        for s, p in zip(params_to_model(model, shadow), params, strict=True):
            p.copy_(s)


def read_checkpoint(path: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (loaded on CPU with ``weights_only=True``), or ``path`` itself
    when it is already a dict."""
    if isinstance(path, Mapping):
        return dict(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"cannot read {path} as a checkpoint: the file is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused an object the file holds
        raise ValueError(
            f"cannot read {path} as a checkpoint with torch.load(weights_only=True): {exc}. If you "
            "trust the file, load it yourself with torch.load(..., weights_only=False) and pass the dict"
        ) from exc
    except Exception as exc:  # truncated or not a torch file at all
        reason = str(exc) or type(exc).__name__
        raise ValueError(
            f"cannot read {path} as a checkpoint (truncated or not written by torch.save): {reason}"
        ) from exc
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a trainer checkpoint (needs 'state_dict' and 'config')")
    return dict(ckpt)


def load_checkpoint(
    path: str | os.PathLike | Mapping[str, Any],
    *,
    use_ema: bool | None = None,
    map_location: str | torch.device | None = None,
    **model_kwargs: Any,
) -> SphericalChannelNetwork:
    """An eval-mode SCN from an ocpmodels or fairchem trainer checkpoint (file path or loaded dict).

    use_ema: None uses the EMA shadow weights when the checkpoint holds them and its config enables
    EMA (``optim.ema_decay``), as fairchem's predictions do; False forces the plain ``state_dict``;
    True requires EMA weights. model_kwargs: constructor options (``use_fused``, ``backend``,
    ``precision``, ``deterministic_frames``, or overrides of the stored config). map_location: the
    device of the returned model (default CPU). ``model.predict(data)`` gives physical units.
    """
    ckpt = read_checkpoint(path)
    config = ckpt["config"]
    kwargs = model_kwargs_from_config(config)
    kwargs.update(model_kwargs)
    model = SphericalChannelNetwork(**kwargs)
    _warn_config_mismatch(ckpt.get(TRAINED_CONFIG_KEY), model.model_config)
    state = _strip_prefix(ckpt["state_dict"])
    _check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    ema = ckpt.get("ema")
    ema_enabled = (config.get("optim") or {}).get("ema_decay") is not None
    if use_ema is None:
        use_ema = ema is not None and ema_enabled
    if use_ema:
        if ema is None:
            raise ValueError("use_ema=True but the checkpoint holds no EMA weights")
        _load_ema(model, ema)
    model.normalizers = normalizers_from_checkpoint(ckpt)
    if map_location is not None:
        model.to(map_location)
    return model.eval()


def save_checkpoint(
    path: str | os.PathLike,
    model: SphericalChannelNetwork,
    *,
    normalizers: Mapping[str, Mapping[str, float]] | None = None,
    ema_shadow: Iterable[torch.Tensor] | None = None,
    ema_decay: float | None = None,
    ema_num_updates: int = 0,
    optim_config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    step: int = 0,
    epoch: int = 0,
) -> None:
    """Write ``model`` in fairchem's checkpoint layout (readable by ``load_checkpoint`` and by
    fairchem): config["model"] = {"name": "scn", **constructor kwargs}, weights under ``state_dict``
    (no prefix), ``ema`` with ``shadow_params`` in ``model.parameters()`` order, ``normalizers``
    {"energy"|"forces": {"mean", "rmsd"}} as tensors. ``extra`` adds keys (optimizer, scheduler, ...).
    The file is written atomically (temporary file, then rename)."""
    module = getattr(model, "module", model)  # DDP-wrapped models save their inner module
    optim = dict(optim_config or {})
    if ema_decay is not None:
        optim["ema_decay"] = ema_decay
    ema_shadow = None if ema_shadow is None else params_to_upstream(module, list(ema_shadow))
    ckpt: dict[str, Any] = {
        "epoch": epoch,
        "step": step,
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "ema": None,
        "normalizers": {
            name: {
                "mean": torch.tensor(float(n["mean"])),
                "rmsd": torch.tensor(float(n["rmsd"])),
            }
            for name, n in (normalizers or {}).items()
        },
        "config": {
            "model": {"name": "scn", **module.model_config},
            "optim": optim,
            "trainer": "ocp",
            "outputs": {"energy": {"level": "system"}, "forces": {"level": "atom"}},
        },
    }
    ckpt[TRAINED_CONFIG_KEY] = dict(module.model_config)
    if ema_shadow is not None:
        ckpt["ema"] = {
            "decay": ema_decay,
            "num_updates": ema_num_updates,
            "shadow_params": [t.detach().cpu().clone() for t in ema_shadow],
            "collected_params": [],
        }
    if extra:
        ckpt.update(extra)
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
