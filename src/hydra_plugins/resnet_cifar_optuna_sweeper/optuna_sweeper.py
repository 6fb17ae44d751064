"""The Hydra sweeper ``hydra/sweeper=optuna``: a thin plugin class, the search itself in ``_search``."""

from __future__ import annotations

import sys
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """An Optuna study over the jobs of a multirun (its settings: ``config.OptunaSweeperConf``).

    Each batch of ``n_jobs`` trials is asked from the study, launched as jobs by the configured
    launcher (basic, submitit, SLURM), and told its job's return value; a job that its pruner
    stopped is told pruned. ``trial`` is the key through which each job learns its trial.
    """

    def __init__(
        self,
        sampler: Any,
        direction: str,
        storage: str | None,
        study_name: str,
        n_trials: int,
        n_jobs: int,
        params: DictConfig | None,
        pruner: Any,
        heartbeat_interval: int,
        trial: int | None = None,
    ) -> None:
        self.sampler, self.direction, self.storage, self.study_name = sampler, direction, storage, study_name
        self.n_trials, self.n_jobs, self.params, self.pruner = n_trials, n_jobs, params, pruner
        self.heartbeat_interval = heartbeat_interval
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        from resnet_cifar.cli import EXIT_USER_ERROR
        from resnet_cifar.errors import UserError

        from ._search import search

        try:
            search(self, arguments)
        except UserError as e:  # a bad setting: said in one line, before or between trials
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
