"""Sweeps that survive failures and resume, and their reports: one module per job.

- :mod:`~resnet_cifar.sweeps.status`: each job's ``status.json`` (``running``, ``completed``,
  ``pruned``, ``failed``, ``terminated``), written by the job and read back. In a multirun a
  failing job is recorded and returns :func:`failed_objective` instead of raising, so the other
  jobs (and an Optuna search) go on.
- :mod:`~resnet_cifar.sweeps.summary`: ``summary.csv``, ``summary.md``, ``summary.png`` and
  ``sweep_status.json``, one row per job, sorted by the optimised metric.
- :mod:`~resnet_cifar.sweeps.folds`: a cross-validation's mean and spread over ``data.fold``.
- :mod:`~resnet_cifar.sweeps.resume`: continuing a stopped sweep (which jobs a multirun plans,
  what a job's directory holds from an earlier run, whether a sweep directory is this sweep's).
- :mod:`~resnet_cifar.sweeps.search`: what an Optuna search found (the best trial as a command
  line, the trials table, Optuna's plots).
- :mod:`~resnet_cifar.sweeps.report`: :class:`SweepReport`, the Hydra callback that writes the
  summary when a multirun ends and exits 1 if a job failed; the same report by hand::

    python -m resnet_cifar.sweeps logs/train/multiruns/<date> [--metric val/acc_best --mode max]
"""

from resnet_cifar.sweeps.folds import FOLD_KEY, fold_summary, write_fold_table
from resnet_cifar.sweeps.report import EXIT_JOBS_FAILED, SweepReport, main
from resnet_cifar.sweeps.resume import (
    EXIT_CONFLICT,
    EarlierAttempt,
    SweepConflict,
    earlier_attempt,
    planned_jobs,
    planned_overrides,
    resume_conflict,
)
from resnet_cifar.sweeps.status import (
    COMPLETED,
    NOT_ENDED,
    PRUNED,
    RUNNING,
    STATUS_FILE,
    UNKNOWN,
    failed_objective,
    in_multirun,
    load_runs,
    read_metrics,
    recorded_overrides,
    status_line,
    varying_keys,
    write_status,
)
from resnet_cifar.sweeps.summary import (
    DEFAULT_METRIC,
    SUMMARY_FILE,
    choose_metric,
    plot_runs,
    scalar_curves,
    sort_runs,
    summarize,
    write_table,
)

__all__ = [
    "COMPLETED", "DEFAULT_METRIC", "EXIT_CONFLICT", "EXIT_JOBS_FAILED", "FOLD_KEY", "NOT_ENDED", "PRUNED", "RUNNING",
    "STATUS_FILE", "SUMMARY_FILE", "UNKNOWN", "EarlierAttempt", "SweepConflict", "SweepReport", "choose_metric",
    "earlier_attempt", "failed_objective", "fold_summary", "in_multirun", "load_runs", "main", "planned_jobs",
    "planned_overrides", "plot_runs", "read_metrics", "recorded_overrides", "resume_conflict", "scalar_curves",
    "sort_runs", "status_line", "summarize", "varying_keys", "write_fold_table", "write_status", "write_table",
]  # fmt: skip
