"""Checks on the composed config that run before anything is loaded.

Each failure is one :class:`~resnet_cifar.errors.ConfigError` line naming the key, the
bad value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from resnet_cifar.errors import ConfigError
from resnet_cifar.models.factory import CIFAR_MODELS, MODELS
from resnet_cifar.schema import check_schema
from resnet_cifar.stages import FreezeSchedule
from resnet_cifar.training.optim import NEEDS_MAX_TIME, check_optimizer, check_scheduler


def to_dict(cfg: DictConfig | dict | None) -> dict[str, Any]:
    """A resolved plain-Python copy (safe to pickle into checkpoints with ``weights_only``)."""
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def _positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer")


def validate_train_config(cfg: DictConfig) -> None:
    """Fail fast on values that would otherwise fail minutes later (or silently)."""
    check_schema(to_dict(cfg))  # unknown keys, types, ranges (resnet_cifar.schema)
    check_combinations(cfg)
    model = to_dict(cfg.model)
    name = model.get("name")
    if name not in MODELS:
        raise ConfigError(f"model.name={name!r} is unknown; choose one of {', '.join(MODELS)}")
    schedule = FreezeSchedule(**to_dict(cfg.stage))
    check_optimizer(to_dict(cfg.optimizer))
    check_scheduler(to_dict(cfg.scheduler))
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs is not None and max_epochs != -1:
        _positive_int("trainer.max_epochs", max_epochs)
    schedule.check_epochs(max_epochs)
    has_weights = bool(model.get("pretrained")) or bool(model.get("weights_path"))
    if schedule.pretrained and not has_weights:
        hint = (
            "set model.weights_path=<checkpoint or state dict>"
            if name in CIFAR_MODELS
            else "set model.pretrained=true (ImageNet weights) or model.weights_path=<file>"
        )
        raise ConfigError(f"stage={schedule.name} starts from pretrained weights but {name} has none: {hint}")
    ls = cfg.get("label_smoothing", 0.0)
    if not isinstance(ls, (int, float)) or not 0 <= ls < 1:
        raise ConfigError(f"label_smoothing={ls!r} must be in [0, 1)")
    data = cfg.data
    _positive_int("data.batch_size", data.batch_size)
    _positive_int("data.eval_batch_size", data.eval_batch_size)
    for key in ("weights_path",):
        path = model.get(key)
        if path and not Path(path).expanduser().is_file():
            raise ConfigError(f"model.{key}={path} does not exist (or is not a file)")
    ckpt = cfg.get("ckpt_path")
    if ckpt and ckpt != "last" and not Path(ckpt).expanduser().is_file():
        raise ConfigError(f"ckpt_path={ckpt} does not exist (or is not a file)")


def check_combinations(cfg: DictConfig) -> None:
    """Values that are fine alone but not together."""
    data = cfg.data
    max_epochs = cfg.trainer.get("max_epochs")
    warmup = cfg.scheduler.get("warmup_epochs", 0) or 0
    if max_epochs and max_epochs > 0 and warmup > max_epochs:
        raise ConfigError(
            f"scheduler.warmup_epochs={warmup} must be <= trainer.max_epochs={max_epochs} (the warm-up never ends)"
        )
    if cfg.scheduler.get("progress") == "time" and not cfg.trainer.get("max_time"):
        raise ConfigError(NEEDS_MAX_TIME)
    model, stage = cfg.model, cfg.stage
    if stage.get("name") == "linear_probe" and model.get("cifar_stem") and model.get("pretrained"):
        raise ConfigError(
            "stage=linear_probe freezes the backbone, but model.cifar_stem=true replaces its pretrained stem "
            "with a random one that would never train: use stage=finetune, or model.cifar_stem=false"
        )
    monitors = [
        f"callbacks.{name}.monitor"
        for name, cb in (cfg.get("callbacks") or {}).items()
        if isinstance(cb, DictConfig) and str(cb.get("monitor") or "").startswith("val/")
    ]
    if data.val_size == 0 and monitors:
        raise ConfigError(
            f"data.val_size=0 leaves no validation set, but {monitors[0]} watches a val/ metric: "
            "expected data.val_size >= 1, or ~callbacks.model_checkpoint"
        )
