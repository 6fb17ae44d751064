"""The sweeper's config, ``hydra/sweeper=optuna`` (the project's search sets it: conf/hparams_search/optuna.yaml)."""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in
# sys.modules, where dataclasses looks string annotations up.
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.resnet_cifar_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    # an Optuna sampler's config (_target_ and its arguments); null: TPESampler with its defaults, unseeded
    sampler: Any = None
    direction: str = "maximize"  # or minimize: the job's return value (the project's optimized_metric)
    # An RDB URL, through which each trial's job reports to the pruner (also from a SLURM job): SQLite
    # for one machine; a database server (postgresql://, mysql://) for workers on several machines.
    storage: str | None = "sqlite:///${hydra.sweep.dir}/optuna.db"
    study_name: str = "resnet_cifar"  # the same storage and study_name continue a search
    n_trials: int = 20  # the study's trials that end (completed or pruned), over every launch
    n_jobs: int = 1  # trials launched at once (with the basic launcher they run one after another)
    # Optimisation space: override -> Hydra sweep syntax, e.g. optimizer.lr: tag(log, interval(0.01, 0.5));
    # an entry set to null is not searched (the config's value), e.g. to drop one of a preset's
    params: dict[str, Any] | None = None
    # median (Optuna's MedianPruner), hyperband, none; or a pruner's config with _target_
    pruner: Any = "median"
    # Seconds between the heartbeats the sweeper records for its running trials; a trial whose
    # heartbeat is older than twice this (its search was killed) is failed by the next launch.
    heartbeat_interval: int = 60
    # Set by the sweeper in each trial's job (the trial it reports to); null in the sweeper itself.
    trial: int | None = None


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="resnet_cifar")
