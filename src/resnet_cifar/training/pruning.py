"""Pruning in an Optuna search: each validation's metric reported to the job's trial, the run stopped
when the study's pruner says the trial lags.

Optuna's own ``PyTorchLightningPruningCallback`` (optuna-integration) takes the trial object,
which only the process that asked for it holds: a job launched by submitit or SLURM never has it.
This callback finds its trial in the study's storage by number (:func:`resnet_cifar.study.open_trial`),
so a job reports from whatever process runs it.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from resnet_cifar.errors import ConfigError


class TrialPruning(pl.Callback):
    """Report ``monitor`` at each validation (step: the training step) to trial ``trial`` of the study.

    When the pruner says so, the run stops at that validation (``trainer.should_stop``, as
    early stopping does) and :attr:`pruned` holds the ``optuna.TrialPruned`` that the run raises
    once its outputs are written (:func:`resnet_cifar.run.train`). Only rank zero talks to the
    storage; the decision is broadcast to the other ranks. ``trial`` None (a run outside a search):
    nothing is reported.
    """

    def __init__(
        self, storage: str, study_name: str, trial: int | None, pruner: Any = "median", monitor: str = "val/acc"
    ) -> None:
        self.storage, self.study_name, self.trial = storage, study_name, trial
        self.pruner, self.monitor = pruner, monitor
        self.pruned: Exception | None = None
        self._trial: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.trial is not None and trainer.is_global_zero:
            from resnet_cifar.study import open_trial

            self._trial = open_trial(self.storage, self.study_name, int(self.trial), self.pruner)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.trial is None:
            return
        prune, reason = False, ""
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                raise ConfigError(
                    f"callbacks.trial_pruning.monitor={self.monitor} was not logged at validation; "
                    f"logged: {sorted(trainer.callback_metrics)}"
                )
            self._trial.report(float(value), trainer.global_step)
            prune = self._trial.should_prune()
            pruner = type(self._trial.study.pruner).__name__
            reason = f"at step {trainer.global_step} by {pruner}: {self.monitor} {float(value):.4f}"
        prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            import optuna

            self.pruned = optuna.TrialPruned(reason)
            trainer.should_stop = True
