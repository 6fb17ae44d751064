"""Continuing a stopped sweep: which jobs a multirun plans, and whether a sweep directory is this sweep's.

The same ``-m`` command run again with the same ``hydra.sweep.dir`` continues a grid sweep: each
job reads what an earlier run left in its own directory (:func:`earlier_attempt`): a job that
completed is skipped, one that was interrupted resumes from its ``last.ckpt``, the others run.
Deciding inside each job, from its own directory, works with every launcher (the basic one,
submitit, SLURM) and needs no state outside the sweep directory; before the sweeper writes
anything, :func:`resume_conflict` checks that the directory holds this very sweep.

An Optuna search continues through its storage instead: each trial's directory is named after
its trial number, so a continued search adds directories and never reuses one;
``optuna_study.json`` (:func:`record_study`) says which study a sweep directory belongs to.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from resnet_cifar.atomic import write_json
from resnet_cifar.errors import UserError
from resnet_cifar.sweeps.status import STATUS_FILE, job_dirs, read_json, read_metrics, recorded_overrides

log = logging.getLogger(__name__)

EXIT_CONFLICT = 2  # a user error (resnet_cifar.cli.EXIT_USER_ERROR): this sweep directory holds another sweep
STUDY_FILE = "optuna_study.json"


def sweeper_target(config: DictConfig) -> str:
    return str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")


def is_search(config: DictConfig) -> bool:
    """Whether the multirun of ``config`` is an Optuna search."""
    return "optuna" in sweeper_target(config).lower()


def planned_jobs(config: DictConfig) -> int | None:
    """How many jobs the multirun of ``config`` (its ``multirun.yaml``) launches, if known up front.

    The basic sweeper's grid (:func:`planned_overrides`), or an Optuna search's ``n_trials`` (the
    study's trials, over every launch); ``None`` for other sweepers.
    """
    if is_search(config):
        return int(OmegaConf.select(config, "hydra.sweeper.n_trials", default=0) or 0) or None
    jobs = planned_overrides(config)
    return None if jobs is None else len(jobs)


def planned_overrides(config: DictConfig) -> list[list[str]] | None:
    """The overrides of each job of the basic sweeper's grid, in job order; None for other sweepers.

    Computed with the sweeper's own :meth:`BasicSweeper.split_arguments` (a ``glob(...)`` needs
    the running app's config loader).
    """
    sweeper = OmegaConf.select(config, "hydra.sweeper", default=None)
    if sweeper is None or not sweeper_target(config).endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    try:
        overrides = OverridesParser.create(config_loader=loader).parse_overrides(
            [*params, *OmegaConf.select(config, "hydra.overrides.task", default=[])]
        )
        return [list(job) for job in BasicSweeper.split_arguments(overrides, None)[0]]
    except Exception as e:  # Hydra itself reports a bad sweep; the plan is a nicety here
        log.debug("cannot list the jobs of the sweep: %s", e)
        return None


def record_study(sweep_dir: str | os.PathLike, study_name: str, storage: str) -> None:
    """Write which study the search in ``sweep_dir`` runs (``storage``: as shown, its password hidden)."""
    write_json(Path(sweep_dir) / STUDY_FILE, {"study_name": study_name, "storage": storage})


def _search_conflict(config: DictConfig, sweep_dir: Path) -> str | None:
    from resnet_cifar.study import display_url

    storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
    this = {"study_name": OmegaConf.select(config, "hydra.sweeper.study_name", default=None),
            "storage": display_url(str(storage))}  # fmt: skip
    recorded = read_json(sweep_dir / STUDY_FILE)
    if recorded is not None and {k: recorded.get(k) for k in this} == this:
        return None
    where = f"hydra.sweep.dir={sweep_dir} holds an earlier sweep"
    held = (f"the study {recorded.get('study_name')!r} in {recorded.get('storage')}" if recorded
            else "not an Optuna search of this version")  # fmt: skip
    return (
        f"{where} ({held}), not this search's study {this['study_name']!r} in {this['storage']}: "
        "continue a search with its own hydra.sweeper.storage and study_name, or choose a new hydra.sweep.dir"
    )


def resume_conflict(config: DictConfig) -> str | None:
    """Why this multirun cannot continue the sweep already in its ``hydra.sweep.dir``, else None.

    Run before the sweeper writes anything (``on_multirun_start``), so that a command pointed at
    another sweep's directory stops before it overwrites a job's ``.hydra/`` record. Each job of
    the basic sweeper's grid must have the overrides its directory recorded; an Optuna search
    continues only its own study (:data:`STUDY_FILE`). Other sweepers are checked job by job
    (:func:`earlier_attempt`).
    """
    sweep_dir = OmegaConf.select(config, "hydra.sweep.dir", default=None)
    if sweep_dir is None or not Path(str(sweep_dir)).is_dir():
        return None
    earlier = {d.name: recorded_overrides(d) for d in job_dirs(Path(str(sweep_dir)))}
    if not earlier:
        return None
    if is_search(config):
        return _search_conflict(config, Path(str(sweep_dir)))
    where = f"hydra.sweep.dir={sweep_dir} holds an earlier sweep"
    fix = "rerun that sweep's own command to continue it, or choose a new hydra.sweep.dir"
    planned = planned_overrides(config)
    if planned is None:
        return None
    for name, overrides in earlier.items():
        if not name.isdigit() or int(name) >= len(planned):
            return f"{where} with a job {name}, which this command does not have: {fix}"
        if overrides is not None and sorted(overrides) != sorted(planned[int(name)]):
            ran = sorted(set(overrides) - set(planned[int(name)]))
            runs = sorted(set(planned[int(name)]) - set(overrides))
            return f"{where}: its job {name} ran {' '.join(ran)}, this command's job {name} is {' '.join(runs)}; {fix}"
    return None


class SweepConflict(UserError):
    """A job directory holds another job's results (a different sweep in the same ``hydra.sweep.dir``)."""


@dataclass(frozen=True)
class EarlierAttempt:
    """What an earlier run of the same sweep left in a job's directory."""

    status: str  # its status.json's: completed, pruned, failed, terminated, or running (killed while running)
    metrics: dict[str, float]  # its metrics.json's numbers (empty without one)


def earlier_attempt(output_dir: str | os.PathLike, overrides: list[str]) -> EarlierAttempt | None:
    """The earlier attempt of the job with ``overrides`` in ``output_dir``, or None (a new job).

    Raises :class:`SweepConflict` when the directory's ``status.json`` records other overrides:
    its results belong to another job, and must neither be returned for this one nor overwritten.
    """
    job_dir = Path(output_dir)
    status = read_json(job_dir / STATUS_FILE)
    if not status or "status" not in status:
        return None
    if sorted(map(str, status.get("overrides", []))) != sorted(overrides):
        raise SweepConflict(
            f"{job_dir} holds another job ({' '.join(map(str, status.get('overrides', [])))}) than this sweep's "
            f"({' '.join(overrides)}): rerun that sweep's own command to continue it, or choose a new hydra.sweep.dir"
        )
    return EarlierAttempt(status=str(status["status"]), metrics=read_metrics(job_dir))
