"""The learning-rate range test: ``python train.py tune=lr_find`` (Lightning's ``Tuner.lr_find``).

Trains the composed config for ``tune.num_training`` steps while the learning rate grows
exponentially from ``tune.min_lr`` to ``tune.max_lr`` (Smith 2017), then writes the loss
against the LR (``lr_find.png``) and the suggestion (``lr_find.json``: a tenth of the LR at the
lowest loss, :func:`suggest_lr`) to the run directory and prints the override to use. The finder sets every
parameter group to the same LR, so the suggestion is ``optimizer.lr``, the head's; the
backbone keeps its ``stage.backbone_lr_ratio`` in the real run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig

from resnet_cifar.atomic import write_json
from resnet_cifar.config import validate_train_config
from resnet_cifar.plain import to_dict

log = logging.getLogger(__name__)

SMOOTHING_BETA = 0.98  # Lightning's _LRCallback default; Tuner.lr_find does not expose it


def debias_smoothed_losses(losses: list[float], beta: float = SMOOTHING_BETA) -> list[float]:
    """Correct Lightning's smoothed LR-finder losses, whose bias correction is off by one step.

    ``_LRCallback.on_train_batch_end`` divides the running average of the first ``i + 1`` losses
    by ``1 - beta ** (global_step + 1)``, but ``global_step`` already counts the step just taken
    (it is ``i + 1``), so the first points come out at about half the real loss and the curve
    climbs for its first ~50 steps whatever the LR does (Lightning-AI/pytorch-lightning#14167,
    open). Lightning's own suggestion, the steepest descent, then follows the end of that
    artificial climb: 0.01 on ResNet-20 / CIFAR-10 (README, "Learning-rate range test"). The running average is
    recovered exactly and divided by the right factor, ``1 - beta ** (i + 1)``.
    """
    return [loss * (1 - beta ** (i + 2)) / (1 - beta ** (i + 1)) for i, loss in enumerate(losses)]


def suggest_lr(lrs: list[float], losses: list[float], skip_begin: int = 10) -> float | None:
    """A tenth of the LR at the lowest loss (fastai's ``lr_min / 10``; Smith 2017's "an order of
    magnitude below where the loss is lowest"); ``None`` when no finite loss is left.

    Not Lightning's ``suggestion()`` (the LR of the steepest loss gradient): where the loss stays
    near its starting value over most of the range, as for a network trained from scratch, that
    gradient is decided by noise: on ResNet-20 / CIFAR-10 it picked 4.6e-5, a wiggle on the flat
    start of the curve; the minimum of the curve is where the loss really falls most. The first
    ``skip_begin`` points, where the running average is still young, are ignored.
    """
    points = [(loss, lr) for lr, loss in zip(lrs[skip_begin:], losses[skip_begin:]) if math.isfinite(loss)]
    return min(points)[1] / 10 if points else None


def lr_find(cfg: DictConfig) -> dict[str, Any]:
    """Run the range test of ``cfg.tune``; return the suggestion (``None`` if the curve has none)."""
    from pytorch_lightning.tuner import Tuner

    from resnet_cifar.evaluation.figures import save_png
    from resnet_cifar.run import build_datamodule, build_module, build_trainer

    validate_train_config(cfg)
    opts = to_dict(cfg.tune)
    out_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data)
    module = build_module(cfg, datamodule)
    trainer, _ = build_trainer(cfg.trainer, [], logger=False, enable_checkpointing=False, default_root_dir=str(out_dir))
    finder = Tuner(trainer).lr_find(
        module,
        datamodule=datamodule,
        min_lr=opts["min_lr"],
        max_lr=opts["max_lr"],
        num_training=opts["num_training"],
        early_stop_threshold=opts["early_stop_threshold"],
        update_attr=False,
    )
    if finder is None:  # not rank zero
        return {}
    lrs, losses = finder.results["lr"], debias_smoothed_losses(finder.results["loss"])
    finder.results["loss"] = losses  # what the plot draws
    suggestion = suggest_lr(lrs, losses)
    fig = finder.plot(suggest=False)
    ax = fig.axes[0]
    if suggestion is not None:
        ax.axvline(suggestion, color="red", linestyle="--", label=f"suggestion {suggestion:.3g} (lowest loss / 10)")
        ax.legend()
    ax.set_title(f"LR range test: {cfg.model.name}, {len(finder.results['lr'])} steps of batch {cfg.data.batch_size}")
    save_png(fig, out_dir / "lr_find.png")
    result = {
        "suggestion": suggestion,
        "override": None if suggestion is None else f"optimizer.lr={suggestion:.3g}",
        "rule": "lr at the lowest loss / 10",
        "lr": lrs,
        "loss": losses,
        **opts,
    }
    write_json(out_dir / "lr_find.json", result, "LR finder results")
    if suggestion is None:
        print(f"The loss curve has no clear descent (see {out_dir / 'lr_find.png'}); widen tune.min_lr/max_lr")
    else:
        print(f"Suggested learning rate: {result['override']} (plot: {out_dir / 'lr_find.png'})")
    return {"lr_find/suggestion": suggestion}
