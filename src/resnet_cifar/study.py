"""An Optuna study in an RDB storage, as the search's sweeper and each trial's job open it.

The sweeper (``hydra_plugins.resnet_cifar_optuna_sweeper``) asks the study for trials and tells
it their results; each trial's job, in whatever process runs it (a SLURM job on another machine
included), finds its trial in the same storage by study name and number, reports its validation
accuracy there and asks the pruner, which compares it with the other trials' reports read from
the storage. Nothing passes through memory, so a storage every process can reach is the one
requirement: SQLite on one machine, a database server across machines.

Optuna (the ``search`` extra) is imported inside the functions.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from resnet_cifar.errors import ConfigError

if TYPE_CHECKING:
    import optuna

# hydra.sweeper.pruner's names: Optuna's pruners with their own defaults.
PRUNERS = {"median": "MedianPruner", "hyperband": "HyperbandPruner", "none": "NopPruner"}
SQLITE_TIMEOUT_S = 60  # SQLite's lock wait (Python's default 5 s): the sweeper and the jobs write to one file


def display_url(url: str) -> str:
    """``url`` with its password hidden, for logs and the files a search writes."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def open_storage(url: str | None, heartbeat_interval: int | None = None) -> optuna.storages.RDBStorage:
    """The RDB storage at ``url``; with ``heartbeat_interval`` (seconds), trials whose heartbeat stopped
    for twice that long can be failed (:func:`optuna.storages.fail_stale_trials`)."""
    import optuna
    import sqlalchemy.exc

    if not url or not isinstance(url, str):
        raise ConfigError(
            f"hydra.sweeper.storage={url!r}: a search needs a database URL (e.g. sqlite:///optuna.db), "
            "through which each trial's job reports to the pruner"
        )
    kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_interval)
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"hydra.sweeper.storage={display_url(url)} cannot be opened: {first}") from None


def make_pruner(spec: str | Mapping[str, Any] | optuna.pruners.BasePruner | None) -> optuna.pruners.BasePruner:
    """The pruner of ``hydra.sweeper.pruner``: a name of :data:`PRUNERS`, or any pruner's config with ``_target_``."""
    import optuna

    if isinstance(spec, optuna.pruners.BasePruner):
        return spec
    if spec is None or isinstance(spec, str):
        name = "none" if spec is None else spec
        if name not in PRUNERS:
            raise ConfigError(
                f"hydra.sweeper.pruner={spec}: expected {', '.join(PRUNERS)}, or a pruner's config with _target_"
            )
        return getattr(optuna.pruners, PRUNERS[name])()
    from hydra.utils import instantiate

    pruner = instantiate(spec)
    if not isinstance(pruner, optuna.pruners.BasePruner):
        raise ConfigError(f"hydra.sweeper.pruner: {spec.get('_target_')} is not an Optuna pruner")
    return pruner


def open_trial(storage: str, study_name: str, number: int, pruner: Any) -> optuna.Trial:
    """Trial ``number`` of the study, running, with the study's pruner, as a job reports to it."""
    import optuna

    rdb = open_storage(storage)
    try:
        study = optuna.load_study(
            study_name=study_name,
            storage=rdb,
            pruner=make_pruner(pruner),
            sampler=optuna.samplers.RandomSampler(),  # samples nothing: the job's parameters came as overrides
        )
        trial_id = rdb.get_trial_id_from_study_id_trial_number(rdb.get_study_id_from_name(study_name), number)
    except KeyError:
        raise ConfigError(f"the study {study_name!r} in {display_url(storage)} has no trial {number}") from None
    state = rdb.get_trial(trial_id).state
    if state != optuna.trial.TrialState.RUNNING:
        raise ConfigError(f"trial {number} of the study {study_name!r} is {state.name}, not running: nothing to report")
    return optuna.trial.Trial(study, trial_id)
