"""What ``train.py`` and ``eval.py`` do, importable for tests: build, fit, test, write metrics."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.utilities.exceptions import SIGTERMException

from resnet_cifar import trackers
from resnet_cifar.atomic import write_json
from resnet_cifar.config import validate_train_config
from resnet_cifar.data.datamodule import CIFAR10DataModule
from resnet_cifar.errors import ConfigError, WeightsError
from resnet_cifar.evaluation.calibration import TEMPERATURE_KEY, TemperatureScaling
from resnet_cifar.evaluation.report import save_report, tta_name
from resnet_cifar.models.weights import safe_load
from resnet_cifar.plain import to_dict
from resnet_cifar.progress import trainer_progress
from resnet_cifar.schema import DataSchema, check_against
from resnet_cifar.sweeps import in_multirun
from resnet_cifar.training.budget import BudgetTimer
from resnet_cifar.training.checkpointing import atomic_torch_save, resolve_ckpt_path
from resnet_cifar.training.module import ImageClassifier
from resnet_cifar.training.precision import apply_auto_precision, checkpoint_auto
from resnet_cifar.training.progress_bar import TrainProgressBar
from resnet_cifar.training.pruning import TrialPruning

log = logging.getLogger(__name__)


def build_datamodule(data_cfg: DictConfig | dict) -> CIFAR10DataModule:
    try:
        return CIFAR10DataModule(**to_dict(data_cfg))
    except TypeError as e:
        raise ConfigError(f"data config: {e}") from None


def build_module(cfg: DictConfig, datamodule: CIFAR10DataModule) -> ImageClassifier:
    return ImageClassifier(
        model=to_dict(cfg.model),
        optimizer=to_dict(cfg.optimizer),
        scheduler=to_dict(cfg.scheduler),
        stage=to_dict(cfg.stage),
        num_classes=datamodule.num_classes,
        label_smoothing=cfg.label_smoothing,
        class_names=datamodule.class_names,
        **to_dict(cfg.get("module")),
    )


def build_trainer(
    trainer_cfg: DictConfig, callbacks: list[Any], auto: tuple[str, str] | None = None, **kwargs: Any
) -> tuple[pl.Trainer, dict[str, str]]:
    """The Trainer of ``trainer_cfg`` (``precision: auto`` resolved in place first) and the precision it runs.

    ``auto``: ``(precision, reason)`` that ``auto`` means here instead of the machine's fastest.
    Returns ``{"precision": ..., "precision_reason": ...}`` for ``metrics.json``.
    """
    precision, reason = apply_auto_precision(trainer_cfg, auto)
    trainer = hydra.utils.instantiate(trainer_cfg, **kwargs, **trainer_progress(trainer_cfg, callbacks))
    return trainer, {"precision": precision, "precision_reason": reason}


def _instantiate_all(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a callbacks/logger group."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def log_hyperparameters(trainer: pl.Trainer, cfg: DictConfig, module: pl.LightningModule) -> None:
    """The run's config (minus Hydra/paths), with the metrics TensorBoard's HPARAMS tab compares."""
    params = {k: v for k, v in to_dict(cfg).items() if k not in ("paths", "hydra", "callbacks", "logger")}
    params = flatten(params)
    params["model/params_total"] = sum(p.numel() for p in module.parameters())
    params["model/params_trainable"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    for logger in trainer.loggers:
        if isinstance(logger, pl.loggers.TensorBoardLogger):
            logger.log_hyperparams(params, metrics={"val/acc_best": 0.0, "test/acc": 0.0})
        else:
            logger.log_hyperparams(params)


def check_resume_checkpoint(path: str) -> None:
    ckpt = safe_load(path, "ckpt_path")
    if "state_dict" not in ckpt or "loops" not in ckpt:
        raise WeightsError(
            f"ckpt_path {path} is not a Lightning training checkpoint (no loops/optimizer state); "
            "to start from its weights use model.weights_path instead"
        )


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    write_json(path, metrics, "metrics")


def _floats(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()}


def temperature_scaling(cfg: DictConfig, stored: float | None = None) -> TemperatureScaling | None:
    """The calibration callback when the report is on with ``report.calibrate`` (the default), else None."""
    report = cfg.get("report")
    return TemperatureScaling(stored) if report and report.get("calibrate", True) else None


def budget_timer(cfg: DictConfig) -> BudgetTimer | None:
    """The Timer of ``trainer.max_time`` (None without one), over training or the whole command (``budget``)."""
    max_time = cfg.trainer.get("max_time")
    if not max_time:
        return None
    budget = to_dict(cfg.get("budget") or {})
    return BudgetTimer(
        to_dict(max_time) if not isinstance(max_time, str) else max_time, test=cfg.get("test", True), **budget
    )


def store_temperature(path: str | Path, temperature: float) -> None:
    """Write the fitted temperature into the checkpoint it was fitted for (atomically: the file stays whole)."""
    ckpt = safe_load(path, "ckpt_path")
    ckpt[TEMPERATURE_KEY] = float(temperature)
    atomic_torch_save(ckpt, path)


def summary(metrics: dict[str, Any], out_dir: Path) -> list[str]:
    """What a person reads at the end of the log; the whole record is ``metrics.json``."""
    lines = []
    report = metrics.get("report") or {}
    if "test/acc" in metrics:
        tta = report.get("tta", {})
        if report.get("tta_flip") or report.get("tta_translate"):
            flip_only = report.get("tta_translate") and "top1_flip_tta" in tta
            flip = f", flip only {tta['top1_flip_tta']:.4f}" if flip_only else ""
            other = f" (without it {tta['top1_no_tta']:.4f}{flip})" if "top1_no_tta" in tta else ""
            lines.append(f"test accuracy {metrics['test/acc']:.4f} with {tta_name(report)}{other}")
        else:
            other = f" (with flip TTA {tta['top1_flip_tta']:.4f})" if "top1_flip_tta" in tta else ""
            lines.append(f"test accuracy {metrics['test/acc']:.4f} without TTA{other}")
    if "test/ece" in metrics:
        raw = f"ECE {metrics['test/ece']:.4f}, NLL {metrics['test/nll']:.4f}"
        if "test/ece_calibrated" in metrics:
            source = (report.get("calibration") or {}).get("source", "")
            lines.append(
                f"calibrated ECE {metrics['test/ece_calibrated']:.4f}, NLL {metrics['test/nll_calibrated']:.4f} "
                f"(temperature {report['temperature']:.4f}, {source}; softmax before it: {raw})"
            )
        else:
            why = (report.get("calibration") or {}).get("skipped", "report.calibrate=false")
            lines.append(f"{raw}; not calibrated: {why}")
    if metrics.get("best_ckpt"):
        best = f" (val/acc_best {metrics['val/acc_best']:.4f})" if "val/acc_best" in metrics else ""
        lines.append(f"best checkpoint {metrics['best_ckpt']}{best}")
    files = [f"metrics {out_dir / 'metrics.json'}"]
    if (out_dir / "report" / "report.md").is_file():
        files.append(f"report {out_dir / 'report' / 'report.md'}")
    lines.append("; ".join(files))
    return lines


def log_summary(metrics: dict[str, Any], out_dir: Path) -> None:
    log.info("Summary:\n  %s", "\n  ".join(summary(metrics, out_dir)))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint, write ``metrics.json``; return the metrics.

    A trial that an Optuna search's pruner stopped (:class:`TrialPruning`) is not tested: its
    ``metrics.json`` holds what it reached, then its ``optuna.TrialPruned`` is raised.
    """
    validate_train_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out_dir, callbacks)
    if ckpt_path:
        check_resume_checkpoint(ckpt_path)
    pl.seed_everything(cfg.seed, workers=True)
    log.info(
        "model=%s stage=%s: inputs %dx%d normalised with mean %s std %s; lr %s (backbone x%s)",
        cfg.model.name, cfg.stage.name, cfg.data.image_size, cfg.data.image_size,
        list(cfg.data.mean), list(cfg.data.std), cfg.optimizer.lr, cfg.stage.backbone_lr_ratio,
    )  # fmt: skip

    datamodule = build_datamodule(cfg.data)
    module = build_module(cfg, datamodule)
    loggers = _instantiate_all(cfg.get("logger"))
    if not loggers:  # nothing to log learning rates to (LearningRateMonitor would refuse to start)
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    plugins = _instantiate_all(cfg.get("plugins"))
    scaling = temperature_scaling(cfg)  # fits the temperature at the start of the test (evaluation/calibration.py)
    if scaling is not None:
        callbacks = [*callbacks, scaling]
    timer = budget_timer(cfg)  # in the callbacks, Lightning adds no Timer of its own
    if timer is not None:
        callbacks = [*callbacks, timer]
    # Before the hyperparameters are logged: they show the precision that runs, not "auto".
    trainer, precision = build_trainer(cfg.trainer, callbacks, logger=loggers or False, plugins=plugins or None)
    failed = True
    try:
        if loggers:
            log_hyperparameters(trainer, cfg, module)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:  # Lightning stops at a batch end; LastCheckpoint has saved last.ckpt
            log.warning("Resume with: python train.py <same overrides> ckpt_path=last hydra.run.dir=%s", out_dir)
            raise  # run_task records "terminated" and exits with EXIT_TERMINATED
        metrics = _floats({k: v for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))})
        checkpoint_cb = trainer.checkpoint_callback
        score = getattr(checkpoint_cb, "best_model_score", None)
        if "val/acc_best" not in metrics and score is not None and getattr(checkpoint_cb, "monitor", "") == "val/acc":
            # resumed after its last epoch (killed during the test or the report): fit had nothing left to
            # do and logged nothing; the best checkpoint's score, restored with it, is val/acc_best
            metrics["val/acc_best"] = float(score)

        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        pruned = next((c.pruned for c in callbacks if isinstance(c, TrialPruning) and c.pruned), None)
        if cfg.get("test", True) and not trainer.interrupted and pruned is None:
            ckpt = best if best else None
            if ckpt is None:
                log.warning("No best checkpoint was saved; testing the weights at the end of training")
            if scaling is not None and ckpt:  # the last validation's logits, when they are the tested weights'
                scaling.reuse(module.validation_logits_of(ckpt))
            if cfg.get("report"):  # accumulated in the test loop, over every process's share
                module.enable_report(to_dict(cfg.report))
            results = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
            metrics.update(_floats(results[0]) if results else {})
            if scaling is not None and scaling.temperature is not None and trainer.is_global_zero:
                if ckpt:  # eval.py, predict.py and export.py read it from the checkpoint that was tested
                    store_temperature(ckpt, scaling.temperature)
                else:
                    log.warning("No best checkpoint to store the temperature in: the fitted temperature is lost")
            if cfg.get("report") and trainer.is_global_zero:  # the tested weights: confusion matrix, ECE, figures
                metrics.update(save_report(module, datamodule, trainer, out_dir / "report", to_dict(cfg.report)))
        failed = False
    finally:  # W&B's run stays open after the Trainer (see trackers.finish)
        trackers.finish(loggers, failed)
    metrics["best_ckpt"] = best
    metrics["epochs"] = trainer.current_epoch
    metrics.update(precision)
    if trainer.is_global_zero:
        write_metrics(out_dir / "metrics.json", metrics)
        log_summary(metrics, out_dir)
    if pruned is not None:
        raise pruned
    return metrics


def objective(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    """The value a Hydra sweeper optimises (``optimized_metric``).

    Missing (e.g. validation turned off) it fails a multirun job, whose sweeper needs it, and
    is only a warning for a single run, which has finished its work.
    """
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        message = f"optimized_metric={name!r} was not logged; logged: {sorted(metrics)}"
        if in_multirun():
            raise ConfigError(message)
        log.warning("%s (nothing to optimise outside a sweep)", message)
        return None
    value = float(metrics[name])
    return value if math.isfinite(value) else None


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test a checkpoint on the official test set with the data settings it was trained with."""
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is required: python eval.py ckpt_path=<path to .ckpt>")
    check_against(DataSchema, to_dict(cfg.data), "data.")  # root, eval_batch_size: the rest is the checkpoint's
    overrides = {k: cfg[k] for k in ("tta_flip", "tta_translate") if cfg.get(k) is not None}
    module, data_hp = ImageClassifier.load_trained(cfg.ckpt_path, **overrides)
    datamodule = build_datamodule({**data_hp, **to_dict(cfg.data)})
    # auto: the checkpoint's precision where this device runs it natively (eval.py repeats its numbers)
    auto = checkpoint_auto(module.trained_precision, cfg.trainer.get("accelerator", "auto"))
    # a stored temperature is applied as it is (the training run's numbers); without one it is fitted here
    scaling = temperature_scaling(cfg, module.temperature)
    callbacks = [TrainProgressBar(), *([scaling] if scaling else [])]  # the bar on stderr, not Lightning's on stdout
    trainer, precision = build_trainer(cfg.trainer, callbacks, auto=auto, logger=False)
    if cfg.get("report"):
        module.enable_report(to_dict(cfg.report))
    results = trainer.test(module, datamodule=datamodule)
    metrics = {**_floats(results[0]), "ckpt_path": str(cfg.ckpt_path), **precision}
    if cfg.get("report") and trainer.is_global_zero:
        out_dir = Path(cfg.paths.output_dir)
        report_kw = {"tb_dir": out_dir / "tensorboard"}
        metrics.update(save_report(module, datamodule, trainer, out_dir / "report", to_dict(cfg.report), **report_kw))
    if trainer.is_global_zero:
        write_metrics(Path(cfg.paths.output_dir) / "metrics.json", metrics)
        log_summary(metrics, Path(cfg.paths.output_dir))
    return metrics
