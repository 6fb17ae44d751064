"""The typed schema of ``conf/train.yaml``: every key, its type and its allowed range.

The one place where single values are checked (names against the registries of models,
stages, optimizers, schedulers and loaders; types; ranges); rules between values are in
:func:`resnet_cifar.config.check_combinations`. Constructors trust what passed both.

:func:`check_schema` walks the composed config against these dataclasses before anything
is built or loaded, and raises one :class:`~resnet_cifar.errors.ConfigError` line for the
first problem: an unknown key, a value of the wrong type, or a value out of range, e.g.::

    optimizer.lr=-0.1: expected a number in (0, 10]

A new config key must be added here (with its type and range) to be accepted.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from resnet_cifar.data.loader import LOADERS
from resnet_cifar.errors import ConfigError
from resnet_cifar.models.factory import MODELS
from resnet_cifar.models.resnet9 import ACTIVATIONS, STEMS, TAILS
from resnet_cifar.stages import STAGES
from resnet_cifar.training.optim import LR_SCALING, OPTIMIZERS, SCHEDULERS

_MISSING = object()


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _rng(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """A range check for ``field(metadata=...)``: ``(predicate, description)``."""

    def ok(v: Any) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))

    if lo is not None and hi is not None:
        text = f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"{'>' if lo_open else '>='} {_num(lo)}"
    else:
        text = f"{'<' if hi_open else '<='} {_num(hi)}"
    return ok, text


def _choice(*options: str):
    return (lambda v: v in options), "one of " + ", ".join(options)


def f(check: tuple | None = None, each: tuple | None = None) -> Any:
    """A schema field: ``check`` applies to the value, ``each`` to every item of a list.

    No defaults: the YAML files are the one source of default values; the schema only says
    what a value may be.
    """
    return field(metadata={"check": check, "each": each})


POSITIVE = _rng(1)
NON_NEGATIVE = _rng(0)
FRACTION = _rng(0, 1)


@dataclass
class AugmentSchema:
    crop_padding: int = f(check=_rng(0, 16))
    padding_mode: str = f(check=_choice("zeros", "reflect"))
    flip: bool = f()
    alternating_flip: bool = f()
    cutout: int = f(check=_rng(0, 32))
    color_jitter: float = f(check=_rng(0, 1))
    autoaugment: bool = f()
    random_erasing: float = f(check=FRACTION)


@dataclass
class DataSchema:
    root: str = f()
    download: bool = f()
    val_size: int = f(check=_rng(0, 49_999))
    split_seed: int = f(check=NON_NEGATIVE)
    seed: int = f(check=NON_NEGATIVE)
    batch_size: int = f(check=_rng(1, 65_536))
    eval_batch_size: int = f(check=_rng(1, 65_536))
    loader: str = f(check=_choice(*LOADERS))
    num_workers: int = f(check=_rng(0, 256))
    pin_memory: bool | None = f()
    on_device: bool | None = f()
    mean: list[float] = f(check=((lambda v: len(v) == 3), "3 values"), each=FRACTION)
    std: list[float] = f(check=((lambda v: len(v) == 3), "3 values"), each=_rng(0, 1, lo_open=True))
    image_size: int = f(check=_rng(8, 1024))
    augment: AugmentSchema = f()
    classes: list[int] | None = f(
        check=((lambda v: len(v) >= 2 and len(set(v)) == len(v)), "at least 2 distinct class ids"), each=_rng(0, 9)
    )
    train_per_class: int | None = f(check=_rng(1, 5000))
    strict_sizes: bool = f()
    num_folds: int | None = f(check=_rng(2, 1000))
    fold: int | None = f(check=_rng(0, 999))
    mixup: float = f(check=_rng(0, 100))
    cutmix: float = f(check=_rng(0, 100))


@dataclass
class ModelSchema:
    name: str = f(check=_choice(*MODELS))
    # CIFAR ResNets
    block: str = f(check=_choice("basic", "bottleneck"))
    shortcut: str = f(check=_choice("A", "B"))
    # torchvision ResNets
    pretrained: bool = f()
    weights: str = f()
    cifar_stem: bool = f()
    # ResNet-9 (models/resnet9.py)
    widths: list[int] = f(check=((lambda v: len(v) == 4), "4 values"), each=_rng(1, 4096))
    activation: str = f(check=_choice(*ACTIVATIONS))
    celu_alpha: float = f(check=_rng(0, 10, lo_open=True))
    pool_before_bn: bool = f()
    output_scale: float = f(check=_rng(0, 100, lo_open=True))
    bn_scale_trainable: bool = f()
    stem: str = f(check=_choice(*STEMS))
    tails: list[str] = f(check=((lambda v: len(v) == 3), "3 values"), each=_choice(*TAILS))
    ghost_batch: int = f(check=_rng(0, 65_536))
    bn_momentum: float = f(check=_rng(0, 1, lo_open=True))
    bn_eps: float = f(check=_rng(0, 1, lo_open=True))
    dirac_init: bool = f()
    # all
    weights_path: str | None = f()
    load_head: bool = f()
    dropout: float = f(check=_rng(0, 1, hi_open=True))


@dataclass
class StageSchema:
    name: str = f(check=_choice(*STAGES))
    pretrained: bool = f()
    unfreeze_at_epoch: int = f(check=_rng(0, 100_000))
    backbone_lr_ratio: float = f(check=_rng(0, 10, lo_open=True))
    backbone_warmup_epochs: float = f(check=_rng(0, 100_000))


@dataclass
class OptimizerSchema:
    name: str = f(check=_choice(*OPTIMIZERS))
    lr: float = f(check=_rng(0, 10, lo_open=True))
    weight_decay: float = f(check=_rng(0, 1))
    no_decay_bn_bias: bool = f()
    bn_lr_ratio: float = f(check=_rng(0, 1000, lo_open=True))
    # sgd
    momentum: float = f(check=_rng(0, 1, hi_open=True))
    nesterov: bool = f()
    # muon (training/muon.py)
    muon_lr: float = f(check=_rng(0, 10, lo_open=True))
    muon_momentum: float = f(check=_rng(0, 1, hi_open=True))
    muon_nesterov: bool = f()
    muon_ns_steps: int = f(check=_rng(1, 20))
    muon_weight_decay: float = f(check=_rng(0, 1))
    muon_normalize: bool = f()
    # adamw
    betas: list[float] = f(check=((lambda v: len(v) == 2), "2 values"), each=_rng(0, 1, hi_open=True))
    eps: float = f(check=_rng(0, 1, lo_open=True))


@dataclass
class SchedulerSchema:
    name: str = f(check=_choice(*SCHEDULERS))
    warmup_epochs: float = f(check=_rng(0, 100_000))
    warmup_start: float = f(check=FRACTION)
    min_lr_ratio: float = f(check=FRACTION)
    milestones: list[float] = f(each=_rng(0, 1, lo_open=True, hi_open=True))
    gamma: float = f(check=_rng(0, 1, lo_open=True))
    pct_start: float = f(check=_rng(0, 1, lo_open=True, hi_open=True))
    div_factor: float = f(check=_rng(1))
    final_div_factor: float = f(check=_rng(1))
    anneal_strategy: str = f(check=_choice("linear", "cos"))
    cycle_momentum: bool = f()
    progress: str = f(check=_choice("steps", "time"))


@dataclass
class ModuleSchema:
    channels_last: bool = f()
    tta_flip: bool = f()
    tta_translate: int = f(check=_rng(0, 8))
    tta_val: bool | str = f(check=((lambda v: v is True or v is False or v == "last"), "true, false or last"))
    eval_chunk: int = f(check=NON_NEGATIVE)
    compile: bool = f()
    compile_mode: str = f(check=_choice("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    compile_dynamic: bool | None = f()
    lr_scaling: str = f(check=_choice(*LR_SCALING))


@dataclass
class BudgetSchema:
    whole_command: bool = f()
    safety: float = f(check=_rng(1, 10))
    fixed_s: float = f(check=_rng(0, 3600))


@dataclass
class TrainSchema:
    task_name: str = f()
    run_name: str | int | None = f(check=((lambda v: "/" not in str(v) and str(v) not in ("", ".", "..")), "a name"))
    seed: int = f(check=_rng(0, 2**32 - 1))
    ckpt_path: str | None = f()
    test: bool = f()
    label_smoothing: float = f(check=_rng(0, 1, hi_open=True))
    optimized_metric: str | None = f()
    data: DataSchema = f()
    model: ModelSchema = f()
    stage: StageSchema = f()
    optimizer: OptimizerSchema = f()
    scheduler: SchedulerSchema = f()
    module: ModuleSchema = f()
    budget: BudgetSchema = f()
    # Free-form groups: instantiated objects (``_target_`` entries) and paths.
    trainer: dict = f()
    callbacks: dict | None = f()
    logger: dict | None = f()
    plugins: dict | None = f()
    paths: dict = f()
    # The evaluation report after testing (conf/report/; checked by the report itself).
    report: dict | None = f()
    # The LR range test (conf/tune/lr_find.yaml; read by resnet_cifar.tune).
    tune: dict | None = f()
    # Values shared by the transfer-study presets (conf/_experiment_transfer.yaml).
    transfer: dict | None = f()


# Trainer arguments checked beyond "is an argument of pytorch_lightning.Trainer".
TRAINER_CHECKS: dict[str, tuple[type | tuple[type, ...], tuple | None]] = {
    "max_epochs": (int, ((lambda v: v == -1 or v >= 1), ">= 1 (or -1: no limit)")),
    "max_steps": (int, ((lambda v: v == -1 or v >= 1), ">= 1 (or -1: no limit)")),
    "log_every_n_steps": (int, POSITIVE),
    "check_val_every_n_epoch": (int, POSITIVE),
    "accumulate_grad_batches": (int, POSITIVE),
    "deterministic": (bool, None),
    "gradient_clip_val": ((int, float), _rng(0, lo_open=True)),
    "num_nodes": (int, POSITIVE),
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _is_type(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_is_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_is_type(v, typing.get_args(tp)[0]) for v in value)
    if dataclasses.is_dataclass(tp) or tp is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: expected {expected}")


def _check_value(key: str, value: Any, check: tuple | None, tp: Any = None) -> None:
    if check is not None and value is not None:
        ok, text = check
        if not ok(value):
            is_range = text.startswith(("in ", ">", "<"))
            scalar = int if tp is int or (tp is None and isinstance(value, int)) else float
            raise _fail(key, value, f"{_type_name(scalar)} {text}" if is_range else text)


def check_against(schema: type, values: dict[str, Any], prefix: str) -> None:
    """Unknown keys, types and ranges of ``values`` (a plain dict) against a schema dataclass."""
    fields = {fl.name: fl for fl in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(
                f"{full} is not a known key (known keys of {prefix.rstrip('.') or 'the config'}: {known})"
            )
        tp = hints[key]
        if not _is_type(value, tp):
            raise _fail(full, value, _type_name(tp))
        meta = fields[key].metadata
        nested = tp if dataclasses.is_dataclass(tp) else None
        if nested is not None:
            check_against(nested, value, full + ".")
            continue
        _check_value(full, value, meta.get("check"), tp)
        if meta.get("each") and isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                _check_value(f"{full}[{i}]", item, meta["each"], (typing.get_args(tp) or (None,))[0])


def precisions() -> tuple[str, ...]:
    """``trainer.precision`` values: ``auto`` (:mod:`resnet_cifar.training.precision`) and Lightning's own."""
    from lightning_fabric.plugins.precision.precision import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    from resnet_cifar.training.precision import AUTO

    return (AUTO, *typing.get_args(_PRECISION_INPUT_STR), *typing.get_args(_PRECISION_INPUT_STR_ALIAS))


def check_trainer(trainer: dict[str, Any]) -> None:
    import pytorch_lightning as pl

    allowed = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    precision = trainer.get("precision")
    if precision is not None and str(precision) not in precisions():
        raise _fail("trainer.precision", precision, "one of " + ", ".join(precisions()))
    for key, value in trainer.items():
        if key.startswith("_") and key.endswith("_"):  # _target_, _partial_, ...
            continue
        if key not in allowed:
            raise ConfigError(
                f"trainer.{key} is not an argument of pytorch_lightning.Trainer "
                "(see https://lightning.ai/docs/pytorch/stable/common/trainer.html)"
            )
        if key in TRAINER_CHECKS and value is not None:
            tp, check = TRAINER_CHECKS[key]
            if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
                raise _fail(f"trainer.{key}", value, _type_name(tp if isinstance(tp, type) else float))
            _check_value(f"trainer.{key}", value, check)


def check_schema(cfg: dict[str, Any]) -> None:
    """Check a resolved train config (plain dict) against :class:`TrainSchema` and the Trainer's arguments."""
    check_against(TrainSchema, cfg, "")
    check_trainer(cfg.get("trainer") or {})
