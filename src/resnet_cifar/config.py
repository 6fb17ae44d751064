"""Checks on the composed config that run before anything is loaded.

Each failure is one :class:`~resnet_cifar.errors.ConfigError` line naming the key, the
bad value and what is allowed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

from resnet_cifar.errors import ConfigError
from resnet_cifar.models.factory import TORCHVISION_MODELS
from resnet_cifar.models.resnet9 import WHITENING_WIDTH
from resnet_cifar.plain import to_dict
from resnet_cifar.schema import check_schema
from resnet_cifar.training.optim import NEEDS_MAX_TIME


def validate_train_config(cfg: DictConfig) -> None:
    """Fail fast, before anything is loaded: single values (the schema), then rules between values."""
    check_schema(to_dict(cfg))  # unknown keys, names, types, ranges (resnet_cifar.schema)
    check_combinations(cfg)
    model = cfg.model
    for key in ("weights_path",):
        path = model.get(key)
        if path and not Path(path).expanduser().is_file():
            raise ConfigError(f"model.{key}={path} does not exist (or is not a file)")
    ckpt = cfg.get("ckpt_path")
    if ckpt and ckpt != "last" and not Path(ckpt).expanduser().is_file():
        raise ConfigError(f"ckpt_path={ckpt} does not exist (or is not a file)")


def check_combinations(cfg: DictConfig) -> None:
    """Values that are fine alone but not together (the one owner of cross-field rules)."""
    data, model, stage, sched = cfg.data, cfg.model, cfg.stage, cfg.scheduler
    max_epochs = cfg.trainer.get("max_epochs")
    if stage.name == "finetune" and max_epochs and max_epochs > 0 and stage.unfreeze_at_epoch >= max_epochs:
        raise ConfigError(
            f"stage.unfreeze_at_epoch={stage.unfreeze_at_epoch} must be < trainer.max_epochs={max_epochs}, "
            "or the backbone never trains (use stage=linear_probe for that)"
        )
    warmup_bb = stage.get("backbone_warmup_epochs", 0) or 0
    if warmup_bb and stage.name != "finetune":
        raise ConfigError(
            f"stage.backbone_warmup_epochs={warmup_bb} warms up a backbone that joins mid-run, "
            f"which only stage=finetune has (stage={stage.name}): set it to 0, or use scheduler.warmup_epochs"
        )
    if warmup_bb and max_epochs and max_epochs > 0 and stage.unfreeze_at_epoch + warmup_bb > max_epochs:
        raise ConfigError(
            f"stage.unfreeze_at_epoch={stage.unfreeze_at_epoch} + stage.backbone_warmup_epochs={warmup_bb} must be "
            f"<= trainer.max_epochs={max_epochs} (the backbone's warm-up never ends)"
        )
    if stage.pretrained and not (model.get("pretrained") or model.get("weights_path")):
        hint = (
            "set model.pretrained=true (ImageNet weights) or model.weights_path=<file>"
            if model.name in TORCHVISION_MODELS
            else "set model.weights_path=<checkpoint or state dict>"
        )
        raise ConfigError(f"stage={stage.name} starts from pretrained weights but {model.name} has none: {hint}")
    if model.get("stem") == "whiten" and model.widths[0] != WHITENING_WIDTH:
        raise ConfigError(
            f"model.stem=whiten makes {WHITENING_WIDTH} channels (each eigenvector of a 2x2x3 patch and its "
            f"negative), but model.widths[0]={model.widths[0]}: set model.widths[0]={WHITENING_WIDTH}"
        )
    ghost = model.get("ghost_batch") or 0
    if ghost and data.batch_size % ghost:
        raise ConfigError(
            f"model.ghost_batch={ghost} must divide data.batch_size={data.batch_size} (batch-norm statistics over "
            "equal slices of each batch): choose a divisor, or model.ghost_batch=0"
        )
    if sched.name == "multistep" and not sched.get("milestones"):
        raise ConfigError("scheduler=multistep needs scheduler.milestones: fractions of training in (0, 1)")
    if sched.get("progress") == "time" and sched.get("warmup_epochs") and sched.name != "onecycle":
        raise ConfigError(
            f"scheduler.warmup_epochs={sched.warmup_epochs} has no length under a time budget "
            "(scheduler.progress=time): set it to 0, or use scheduler=onecycle (warm-up as pct_start)"
        )
    if data.loader == "tensor":
        extra = [k for k in ("color_jitter", "autoaugment", "random_erasing") if data.augment.get(k)]
        if extra:
            raise ConfigError(f"data.augment.{extra[0]} needs the per-sample pipeline: add data.loader=torchvision")
    elif data.augment.get("alternating_flip"):
        raise ConfigError("data.augment.alternating_flip needs the batched augmentation: add data.loader=tensor")
    if data.augment.get("alternating_flip") and not data.augment.flip:
        raise ConfigError("data.augment.alternating_flip=true alternates the flip, but data.augment.flip=false")
    mixing = [k for k in ("mixup", "cutmix") if data.get(k)]
    if mixing and data.batch_size < 2:
        raise ConfigError(
            f"data.{mixing[0]}={data[mixing[0]]} mixes each image with another of its batch, but data.batch_size="
            f"{data.batch_size}: raise data.batch_size or set data.{mixing[0]}=0"
        )
    warmup = sched.get("warmup_epochs", 0) or 0
    if max_epochs and max_epochs > 0 and warmup > max_epochs:
        raise ConfigError(
            f"scheduler.warmup_epochs={warmup} must be <= trainer.max_epochs={max_epochs} (the warm-up never ends)"
        )
    if sched.get("progress") == "time" and not cfg.trainer.get("max_time"):
        raise ConfigError(NEEDS_MAX_TIME)
    if cfg.get("module", {}).get("compile") and cfg.trainer.get("sync_batchnorm"):
        raise ConfigError(
            "module.compile=true with trainer.sync_batchnorm=true: torch.compile would trace SyncBatchNorm's "
            "collectives, an untested path; set trainer.sync_batchnorm=false (the default) or module.compile=false"
        )
    check_compiler(cfg)
    if stage.name == "linear_probe" and model.get("cifar_stem") and model.get("pretrained"):
        raise ConfigError(
            "stage=linear_probe freezes the backbone, but model.cifar_stem=true replaces its pretrained stem "
            "with a random one that would never train: use stage=finetune, or model.cifar_stem=false"
        )
    monitors = [
        f"callbacks.{name}.monitor"
        for name, cb in (cfg.get("callbacks") or {}).items()
        if isinstance(cb, DictConfig) and str(cb.get("monitor") or "").startswith("val/")
    ]
    num_folds, fold = data.get("num_folds"), data.get("fold")
    if num_folds and fold is None:
        raise ConfigError(
            f"data.num_folds={num_folds} needs data.fold: the fold to validate on, 0..{num_folds - 1} "
            f"(all of them: -m 'data.fold=range(0,{num_folds})')"
        )
    if fold is not None and not num_folds:
        raise ConfigError(f"data.fold={fold} needs data.num_folds=K, the number of cross-validation folds")
    if fold is not None and fold >= num_folds:
        raise ConfigError(f"data.fold={fold} must be < data.num_folds={num_folds} (the folds are 0..{num_folds - 1})")
    if data.val_size == 0 and not num_folds and monitors:
        raise ConfigError(
            f"data.val_size=0 leaves no validation set, but {monitors[0]} watches a val/ metric: "
            "expected data.val_size >= 1, or ~callbacks.model_checkpoint"
        )


def c_compiler() -> str | None:
    """The C compiler Triton builds its launchers with (``triton.runtime.build``): ``$CC``, else gcc, else clang."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("gcc") or shutil.which("clang")


def check_compiler(cfg: DictConfig) -> None:
    """``module.compile`` needs a compiler on the machine: torch fails at the first training step without one.

    On a CPU inductor builds its kernels with a C++ compiler: this asks torch's own search (``get_cpp_compiler``,
    which honours ``$CXX``) instead of a long ``InvalidCxxCompiler`` traceback. On CUDA inductor writes Triton
    kernels, and Triton builds their launcher with a C compiler: ``$CC``, else gcc or clang on the PATH (its
    own search, ``triton.runtime.build``). Both are asked before anything loads.
    """
    if not cfg.get("module", {}).get("compile"):
        return
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    import torch

    cuda = accelerator == "cuda" or (accelerator in ("gpu", "auto") and torch.cuda.is_available())
    if cuda:
        if not c_compiler():
            raise ConfigError(
                "module.compile=true on CUDA needs a C compiler (Triton builds its kernel launcher with one) "
                "and none was found (gcc, clang, or $CC): install one, or set module.compile=false"
            )
        return
    if accelerator not in ("cpu", "auto"):
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch without it: torch.compile reports for itself
        return
    try:
        get_cpp_compiler()
    except Exception:
        raise ConfigError(
            "module.compile=true on a CPU needs a C++ compiler (torch.compile builds its CPU kernels with one) "
            "and none was found (g++, or $CXX): install one, or set module.compile=false"
        ) from None
