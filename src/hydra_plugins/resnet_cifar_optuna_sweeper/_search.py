"""The search: ask the study for trials, launch them as jobs, tell it what they returned.

Through the storage only: each job gets its trial's number (``hydra.sweeper.trial``) and finds
the study by ``storage`` and ``study_name``, so a job in another process or on another machine
reports to its trial and asks the pruner there (:mod:`resnet_cifar.study`). Trial ``N`` runs in
``<sweep dir>/N``: a continued search, or several launches sharing the study, never reuse a
directory. While its trials run, the sweeper records their heartbeats; a trial whose heartbeat
stopped (its search was killed) is failed by the next launch, and another trial takes its place.
A launch with nothing left to ask waits for the trials still running elsewhere, so that the study
has its ``n_trials`` when it ends and its report covers them.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from optuna.trial import TrialState

from resnet_cifar.errors import ConfigError
from resnet_cifar.study import display_url, make_pruner, open_storage
from resnet_cifar.sweeps.resume import record_study
from resnet_cifar.sweeps.search import METRIC_ATTR, write_search_report
from resnet_cifar.sweeps.status import mark_failed

from ._space import search_space

log = logging.getLogger(__name__)

ENDED = (TrialState.COMPLETE, TrialState.PRUNED)  # what n_trials counts
IN_FLIGHT = (TrialState.RUNNING, TrialState.WAITING)


@contextmanager
def heartbeats(storage: optuna.storages.RDBStorage, trial_ids: Sequence[int], interval: int) -> Iterator[None]:
    """Record the trials' heartbeats now and every ``interval`` seconds until the block ends."""

    def beat() -> None:
        for trial_id in trial_ids:
            try:
                storage.record_heartbeat(trial_id)
            except Exception as e:  # a busy database: the next beat comes before the grace period ends
                log.warning("could not record the heartbeat of a trial: %s", e)

    beat()
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            beat()

    thread = threading.Thread(target=loop, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_stale_trials(study: optuna.Study, grace_s: int) -> None:
    """Fail the running trials whose heartbeat is older than ``grace_s`` (their search was killed),
    in Optuna and in their job's ``status.json``."""
    running = {t.number for t in study.get_trials(deepcopy=False, states=IN_FLIGHT)}
    if not running:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if t.number in running:
            why = (f"killed while running: its search stopped (no heartbeat for {grace_s} s), "
                   f"so Optuna failed trial {t.number} and the search asks for another")  # fmt: skip
            log.warning("Trial %d: %s", t.number, why)
            if t.user_attrs.get("job_dir"):
                mark_failed(t.user_attrs["job_dir"], "SearchStopped", why)


def tell(study: optuna.Study, trial: optuna.Trial, ret: JobReturn) -> None:
    """Tell the study what the trial's job returned: its value, pruned, or failed."""
    if ret.status == JobStatus.COMPLETED:
        try:
            value = float(ret.return_value)
        except (TypeError, ValueError):
            value = math.nan
        if math.isnan(value):
            log.warning("Trial %d returned %r, not a number: recorded as failed", trial.number, ret.return_value)
            study.tell(trial, state=TrialState.FAIL)
        else:  # a failed job returns the worst value (resnet_cifar.sweeps.status.failed_objective)
            study.tell(trial, value)
        return
    raised = ret._return_value  # what the job raised (JobReturn.return_value would raise it again)
    if isinstance(raised, optuna.TrialPruned):
        study.tell(trial, state=TrialState.PRUNED)  # Optuna records its last reported value
    else:
        log.error("Trial %d raised %s: recorded as failed", trial.number, f"{type(raised).__name__}: {raised}")
        study.tell(trial, state=TrialState.FAIL)


def job_overrides(trial: optuna.Trial, fixed: list[str], sweep_dir: Path) -> list[str]:
    """The trial's job: its parameters and the fixed overrides; its directory and trial number (Hydra's part)."""
    task = [*(f"{name}={value}" for name, value in trial.params.items()), *fixed]
    trial.set_user_attr("overrides", task)  # the best trial's command line, for any launch's report
    trial.set_user_attr("job_dir", os.path.abspath(sweep_dir / str(trial.number)))
    return [*task, f"hydra.sweep.subdir={trial.number}", f"hydra.sweeper.trial={trial.number}"]


def check_settings(sweeper: Any) -> None:
    """The sweeper's numbers and direction, said in one line before anything runs."""
    for key in ("n_trials", "n_jobs", "heartbeat_interval"):
        if getattr(sweeper, key) < 1:
            raise ConfigError(f"hydra.sweeper.{key}={getattr(sweeper, key)} must be >= 1")
    if sweeper.direction not in ("maximize", "minimize"):
        raise ConfigError(f"hydra.sweeper.direction={sweeper.direction}: expected maximize or minimize")


def search(sweeper: Any, arguments: list[str]) -> None:
    """Run trials until the study has ``n_trials`` that ended (over every launch), then write its report."""
    config = sweeper.config
    check_settings(sweeper)
    pruner = make_pruner(sweeper.pruner)  # a bad pruner stops the search before its first trial
    params = [f"{k}={v}" for k, v in (sweeper.params or {}).items() if v is not None]  # null: not searched
    space, fixed = search_space([*params, *arguments])
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)  # the default SQLite file lives there
    storage = open_storage(sweeper.storage, sweeper.heartbeat_interval)
    study = optuna.create_study(
        storage=storage,
        study_name=sweeper.study_name,
        sampler=sweeper.sampler,
        pruner=pruner,
        direction=sweeper.direction,
        load_if_exists=True,
    )
    study_id = storage.get_study_id_from_name(study.study_name)
    study.set_user_attr(METRIC_ATTR, str(config.get("optimized_metric") or "value"))
    record_study(sweep_dir, study.study_name, display_url(sweeper.storage))
    grace_s = 2 * sweeper.heartbeat_interval  # Optuna's grace period
    fail_stale_trials(study, grace_s)
    earlier = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    log.info(
        "Study %r in %s (%s, %s pruner): %s; %d trials wanted",
        study.study_name, display_url(sweeper.storage), type(study.sampler).__name__, type(pruner).__name__,
        ", ".join(f"{n} {s}" for s, n in sorted(earlier.items())) or "new", sweeper.n_trials,
    )  # fmt: skip
    launched, waiting_said = 0, False
    while launched < sweeper.n_trials:
        fail_stale_trials(study, grace_s)
        now = study.get_trials(deepcopy=False)
        ended = sum(t.state in ENDED for t in now)
        in_flight = [t for t in now if t.state in IN_FLIGHT]
        to_go = min(sweeper.n_trials - ended - len(in_flight), sweeper.n_trials - launched)
        if to_go <= 0:
            # Trials asked by a sweeper (they have a job_dir) beat until they end; those of a killed
            # search stop beating and are failed above, then others take their place here.
            beating = [t.number for t in in_flight if "job_dir" in t.user_attrs]
            if ended >= sweeper.n_trials or not beating:
                break
            if not waiting_said:
                log.info("Waiting for trials %s, running in another launch or a killed search's (failed once "
                         "their heartbeat is %d s old, then replaced)", beating, grace_s)  # fmt: skip
                waiting_said = True
            time.sleep(sweeper.heartbeat_interval)
            continue
        with warnings.catch_warnings():  # the heartbeats are ours (heartbeats()), not Study.optimize's
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trials = [study.ask(space) for _ in range(min(sweeper.n_jobs, to_go))]
        ids = [storage.get_trial_id_from_study_id_trial_number(study_id, t.number) for t in trials]
        try:
            with heartbeats(storage, ids, sweeper.heartbeat_interval):  # the first beat before the job_dir
                overrides = [job_overrides(t, fixed, sweep_dir) for t in trials]
                returns = sweeper.launcher.launch(overrides, initial_job_idx=trials[0].number)
        except BaseException:  # interrupted or the launcher failed: these trials will never be told
            for t in trials:
                study.tell(t, state=TrialState.FAIL, skip_if_finished=True)
            raise
        for trial, ret in zip(trials, returns):
            tell(study, trial, ret)
        launched += len(trials)
    write_search_report(study, sweep_dir)
