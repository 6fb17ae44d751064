"""Sweeps that survive failures and resume, and their report: the one module for job status and summaries.

Every job of a Hydra run or multirun leaves ``status.json`` in its directory (rank zero
only), with the job's overrides: ``running`` from its start (still so after a SIGKILL),
then ``completed``, ``failed`` (with ``error`` and ``error_type``) or ``terminated``
(SIGTERM); a job directory without one is ``unknown``. In a multirun a failing job is
recorded and returns :func:`failed_objective` instead of raising, so the other jobs (and an
Optuna search) go on. At the end, :class:`SweepReport` runs :func:`summarize`:
``summary.csv``, ``summary.md`` and ``summary.png`` (one row per job: status, the overrides
that vary, the final metrics, sorted by the optimised metric; with ``data.fold`` among the
varied overrides also the mean and sample standard deviation over the folds of each other
setting) and ``sweep_status.json``; it exits with status 1 if any job did not complete. The
same report by hand::

    python -m resnet_cifar.sweeps logs/train/multiruns/<date> [--metric val/acc_best --mode max]

The same ``-m`` command run again with the same ``hydra.sweep.dir`` continues the sweep: each
job reads what an earlier run left in its own directory (:func:`earlier_attempt`): a job that
completed is skipped, one that was interrupted resumes from its ``last.ckpt``, the others
run. Deciding inside each job, from its own directory, works with every launcher (the basic
one, submitit, SLURM) and needs no state outside the sweep directory; :class:`SweepReport`
checks first that the directory holds this very sweep (:func:`resume_conflict`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from resnet_cifar.atomic import write_json
from resnet_cifar.errors import UserError
from resnet_cifar.progress import show_progress

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
SUMMARY_FILE = "sweep_status.json"
EXIT_JOBS_FAILED = 1
EXIT_CONFLICT = 2  # a user error (resnet_cifar.cli.EXIT_USER_ERROR): this sweep directory holds another sweep
COMPLETED = "completed"
RUNNING = "running"  # written when a job starts: a job that still says so is running, or was killed
UNKNOWN = "unknown"  # no status.json: killed before it could write one (or written by an older version)
NOT_ENDED = (RUNNING, UNKNOWN)
FOLD_KEY = "data.fold"  # a sweep over it is a cross-validation: the summary aggregates over folds
DEFAULT_METRIC = "val/acc_best"
FALLBACK_METRICS = ("val/acc_best", "test/acc", "test/top1")
TABLE_METRICS = ("val/acc_best", "val/acc", "val/loss", "train/loss", "test/acc", "test/top5", "test/ece", "epochs")


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _is_rank_zero() -> bool:
    """Lightning's rank once it is imported; before that (a config error), no other rank exists
    yet unless a launcher set a rank (torchrun, SLURM tasks, Lightning's DDP subprocesses)."""
    rank_zero = sys.modules.get("lightning_fabric.utilities.rank_zero")
    if rank_zero is not None:
        return getattr(rank_zero.rank_zero_only, "rank", 0) == 0
    return all(int(os.environ.get(k) or 0) == 0 for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK"))


def write_status(
    status: str, error: BaseException | None = None, message: str | None = None, extra: dict[str, Any] | None = None
) -> Path | None:
    """Write this Hydra job's ``status.json`` (rank zero only); ``None`` outside Hydra.

    ``extra``: more fields, e.g. ``resumed_from`` (the checkpoint a continued sweep job resumed from).
    """
    if not HydraConfig.initialized() or not _is_rank_zero():
        return None
    hc = HydraConfig.get()
    data: dict[str, Any] = {"status": status, "overrides": list(hc.overrides.task)}
    if hc.mode == RunMode.MULTIRUN:
        data["job"] = hc.job.num
    data.update(extra or {})
    if error is not None:
        data["error_type"] = type(error).__name__
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        data["error"] = message or first_line
    path = Path(hc.runtime.output_dir) / STATUS_FILE
    write_json(path, data)
    return path


def failed_objective() -> float:
    """What a failed job returns to the sweeper: the worst value for its direction.

    Optuna rejects NaN (hydra-optuna-sweeper then aborts the search), so a failed trial is told
    ``-inf`` when maximising (``+inf`` when minimising): the search goes on and never picks it.
    """
    direction = OmegaConf.select(HydraConfig.get(), "sweeper.direction", default="maximize")
    return math.inf if "min" in str(direction).lower() else -math.inf


def _job_dirs(sweep_dir: Path) -> list[Path]:
    marks = (".hydra", STATUS_FILE, "metrics.json")
    dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and any((d / m).exists() for m in marks)]
    return sorted(dirs, key=lambda d: (0, int(d.name)) if d.name.isdigit() else (1, d.name))


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def load_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per job directory, in job order: ``job``, ``dir``, ``status`` (of its ``status.json``,
    else ``unknown``), ``error``/``error_type`` when it failed, ``overrides`` (key -> value) and
    ``metrics`` (the numbers of its ``metrics.json``)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    runs = []
    for d in _job_dirs(sweep_dir):
        status = _read_json(d / STATUS_FILE) or {}
        overrides = {}
        for item in recorded_overrides(d) or []:
            key, _, value = str(item).partition("=")
            overrides[key.lstrip("+~")] = _parse_value(value)
        row = {"job": d.name, "dir": str(d), "status": status.get("status", UNKNOWN), "overrides": overrides}
        row.update({k: status[k] for k in ("error", "error_type", "resumed_from") if k in status})
        runs.append({**row, "metrics": read_metrics(d)})
    return runs


def recorded_overrides(job_dir: Path) -> list[str] | None:
    """The overrides a job ran with: its ``.hydra/overrides.yaml``, else its ``status.json``'s; None if neither."""
    ov_file = job_dir / ".hydra" / "overrides.yaml"
    if ov_file.is_file():
        return [str(o) for o in yaml.safe_load(ov_file.read_text()) or []]
    status = _read_json(job_dir / STATUS_FILE)
    return [str(o) for o in status["overrides"]] if status and "overrides" in status else None


def read_metrics(job_dir: Path) -> dict[str, float]:
    """The numbers of a job's ``metrics.json`` (empty without one)."""
    raw = _read_json(job_dir / "metrics.json") or {}
    return {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def status_line(runs: list[dict[str, Any]], total: int | None = None, unknown: str = "running") -> str:
    """One line of progress: ``sweep: 3/5 done, 1 failed, 1 running``.

    ``done`` counts the jobs that ended (completed or not), ``failed`` those of them that did not
    complete, ``unknown`` names the jobs that have not ended (``running``, or no ``status.json`` yet).
    """
    ended = [r for r in runs if r["status"] not in NOT_ENDED]
    failed = sum(r["status"] != COMPLETED for r in ended)
    line = f"sweep: {len(ended)}{f'/{total}' if total else ''} done, {failed} failed"
    pending = len(runs) - len(ended)
    return line + (f", {pending} {unknown}" if pending else "")


def _sweeper(config: DictConfig) -> str:
    return str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")


def planned_jobs(config: DictConfig) -> int | None:
    """How many jobs the multirun of ``config`` (its ``multirun.yaml``) launches, if known up front.

    The basic sweeper's grid (:func:`planned_overrides`), or an Optuna search's ``n_trials``;
    ``None`` for other sweepers.
    """
    if "optuna" in _sweeper(config).lower():
        return int(OmegaConf.select(config, "hydra.sweeper.n_trials", default=0) or 0) or None
    jobs = planned_overrides(config)
    return None if jobs is None else len(jobs)


def planned_overrides(config: DictConfig) -> list[list[str]] | None:
    """The overrides of each job of the basic sweeper's grid, in job order; None for other sweepers.

    Computed with the sweeper's own :meth:`BasicSweeper.split_arguments` (a ``glob(...)`` needs
    the running app's config loader).
    """
    sweeper = OmegaConf.select(config, "hydra.sweeper", default=None)
    if sweeper is None or not _sweeper(config).endswith("BasicSweeper"):
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


def resume_conflict(config: DictConfig) -> str | None:
    """Why this multirun cannot continue the sweep already in its ``hydra.sweep.dir``, else None.

    Run before the sweeper writes anything (``on_multirun_start``), so that a command pointed at
    another sweep's directory stops before it overwrites a job's ``.hydra/`` record. Each job of
    the basic sweeper's grid must have the overrides its directory recorded. An Optuna search
    asks for new trials on every launch (its own resume is its storage), so it never continues a
    sweep directory. Other sweepers are checked job by job (:func:`earlier_attempt`).
    """
    sweep_dir = OmegaConf.select(config, "hydra.sweep.dir", default=None)
    if sweep_dir is None or not Path(str(sweep_dir)).is_dir():
        return None
    earlier = {d.name: recorded_overrides(d) for d in _job_dirs(Path(str(sweep_dir)))}
    if not earlier:
        return None
    where = f"hydra.sweep.dir={sweep_dir} holds an earlier sweep"
    fix = "rerun that sweep's own command to continue it, or choose a new hydra.sweep.dir"
    if "optuna" in _sweeper(config).lower():
        return (
            f"{where}, and an Optuna search continues through its storage, not its directory: run it again with "
            "the same hydra.sweeper.storage and a new hydra.sweep.dir (hydra.sweeper.n_trials: the trials still wanted)"
        )
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

    status: str  # its status.json's: completed, failed, terminated, or running (killed while running)
    metrics: dict[str, float]  # its metrics.json's numbers (empty without one)


def earlier_attempt(output_dir: str | os.PathLike, overrides: list[str]) -> EarlierAttempt | None:
    """The earlier attempt of the job with ``overrides`` in ``output_dir``, or None (a new job).

    Raises :class:`SweepConflict` when the directory's ``status.json`` records other overrides:
    its results belong to another job, and must neither be returned for this one nor overwritten.
    """
    job_dir = Path(output_dir)
    status = _read_json(job_dir / STATUS_FILE)
    if not status or "status" not in status:
        return None
    if sorted(map(str, status.get("overrides", []))) != sorted(overrides):
        raise SweepConflict(
            f"{job_dir} holds another job ({' '.join(map(str, status.get('overrides', [])))}) than this sweep's "
            f"({' '.join(overrides)}): rerun that sweep's own command to continue it, or choose a new hydra.sweep.dir"
        )
    return EarlierAttempt(status=str(status["status"]), metrics=read_metrics(job_dir))


def varying_keys(runs: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs (all keys when there is one job)."""
    keys = sorted({k for r in runs for k in r["overrides"]})
    if len(runs) < 2:
        return keys
    # a key set to one value in every job that has it is not swept (e.g. data.root, absent in a crashed job)
    return [
        k for k in keys if len({json.dumps(r["overrides"][k], default=str) for r in runs if k in r["overrides"]}) > 1
    ]


def choose_metric(runs: list[dict[str, Any]], metric: str | None) -> str:
    present = {k for r in runs for k in r["metrics"]}
    if metric and metric in present:
        return metric
    for m in FALLBACK_METRICS:
        if m in present:
            return m
    return metric or DEFAULT_METRIC


def sort_runs(runs: list[dict[str, Any]], metric: str, mode: str = "max") -> list[dict[str, Any]]:
    """Best first by ``metric``; failed runs and runs without the metric last, by job number."""

    def key(r: dict[str, Any]) -> tuple:
        v = r["metrics"].get(metric)
        if v is None or not math.isfinite(v):
            return (1, 0.0)
        return (0, -v if mode == "max" else v)

    return sorted(runs, key=key)


def _fmt(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1:
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"
    return "" if v is None else str(v)


def fold_summary(runs: list[dict[str, Any]], metric: str, mode: str = "max") -> list[dict[str, Any]]:
    """A cross-validation's results: one row per setting of the varied overrides other than ``data.fold``.

    Each row has the ``overrides`` of its setting, the ``folds`` that completed, ``n_jobs`` (its
    jobs, completed or not), and the ``mean`` and sample standard deviation ``std`` (n-1; None for
    one fold) of each metric over the completed folds. Sorted best first by the mean of ``metric``.
    Empty unless ``data.fold`` varies between the jobs.
    """
    keys = varying_keys(runs)
    if FOLD_KEY not in keys or len(runs) < 2:
        return []
    others = [k for k in keys if k != FOLD_KEY]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(json.dumps([r["overrides"].get(k) for k in others], default=str), []).append(r)
    rows = []
    for members in groups.values():
        done = [r for r in members if r["status"] == COMPLETED]
        mean, std = {}, {}
        for m in sorted({m for r in done for m in r["metrics"]}):
            values = [r["metrics"][m] for r in done if m in r["metrics"]]
            mean[m] = statistics.fmean(values)
            std[m] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(
            {
                "overrides": {k: members[0]["overrides"].get(k) for k in others},
                "folds": sorted((r["overrides"].get(FOLD_KEY) for r in done), key=str),
                "n_jobs": len(members),
                "mean": mean,
                "std": std,
            }
        )

    def key(row: dict[str, Any]) -> tuple:
        v = row["mean"].get(metric)
        return (1, 0.0) if v is None or not math.isfinite(v) else (0, -v if mode == "max" else v)

    return sorted(rows, key=key)


def write_fold_table(rows: list[dict[str, Any]], metric: str, sweep_dir: Path) -> tuple[Path, list[str]]:
    """``summary_folds.csv`` (every metric's mean and std) and the markdown lines of the fold table."""
    keys = list(rows[0]["overrides"])
    all_metrics = sorted({m for row in rows for m in row["mean"]})
    metric_cols = [metric, *[m for m in all_metrics if m != metric]]
    path = sweep_dir / "summary_folds.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*keys, "folds_completed", "jobs", *[f"{m}_{s}" for m in metric_cols for s in ("mean", "std")]])
        for row in rows:
            stats = [row[s].get(m) for m in metric_cols for s in ("mean", "std")]
            w.writerow([*[row["overrides"][k] for k in keys], len(row["folds"]), row["n_jobs"], *stats])
    shown = [metric, *[m for m in TABLE_METRICS if m != metric and m in all_metrics]]
    lines = [
        "",
        f"## Over the folds ({FOLD_KEY})",
        "",
        "Mean ± sample standard deviation (n-1) over each setting's completed folds; `folds`: completed / jobs.",
        "",
    ]
    header = [*keys, "folds", *shown]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        stats = []
        for m in shown:
            mean, std = row["mean"].get(m), row["std"].get(m)
            stats.append("" if mean is None else _fmt(mean) + ("" if std is None else f" ± {_fmt(std)}"))
        folds = f"{len(row['folds'])}/{row['n_jobs']}"
        lines.append("| " + " | ".join([*[str(row["overrides"][k]) for k in keys], folds, *stats]) + " |")
    return path, lines


def write_table(runs: list[dict[str, Any]], metric: str, sweep_dir: Path) -> tuple[Path, Path]:
    keys = varying_keys(runs)
    all_metrics = sorted({k for r in runs for k in r["metrics"]})
    metric_cols = [metric, *[m for m in all_metrics if m != metric]]
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", "status", *keys, *metric_cols, "error"])
        for r in runs:
            w.writerow(
                [
                    r["job"],
                    r["status"],
                    *[r["overrides"].get(k) for k in keys],
                    *[r["metrics"].get(m) for m in metric_cols],
                    r.get("error", ""),
                ]
            )
    shown = [metric, *[m for m in TABLE_METRICS if m != metric and m in all_metrics]]
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"Sorted by `{metric}`; status from each job's status.json (`running`: still running, or killed; "
        "`unknown`: the job wrote none).",
        "",
    ]
    header = ["job", "status", *keys, *shown, "error"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        cells = [
            r["job"],
            r["status"],
            *[str(r["overrides"].get(k, "")) for k in keys],
            *[_fmt(r["metrics"].get(m)) for m in shown],
            f"{r.get('error_type', '')}: {r['error']}" if r.get("error") else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_runs(runs: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """``metric`` against the one numeric swept value (log axis for wide ranges), else a bar per job."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    keys = varying_keys(runs)
    ok = [r for r in runs if r["status"] == COMPLETED and metric in r["metrics"]]
    failed = [r for r in runs if r not in ok]
    numeric = len(keys) == 1 and all(isinstance(r["overrides"].get(keys[0]), (int, float)) for r in runs)
    if numeric:
        k = keys[0]
        pts = sorted((float(r["overrides"][k]), r["metrics"][metric]) for r in ok)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=metric)
        xs = [float(r["overrides"][k]) for r in runs]
        if min(xs) > 0 and max(xs) / min(xs) >= 5:
            ax.set_xscale("log")
        ax.set_xticks(sorted(set(xs)), labels=[f"{v:g}" for v in sorted(set(xs))])  # the swept values
        ax.minorticks_off()
        for r in failed:
            ax.axvline(
                float(r["overrides"][k]), color="tab:red", linestyle=":", label=f"failed: {k}={r['overrides'][k]}"
            )
        ax.set_xlabel(k)
    else:
        labels = [
            r["job"] + ("\n" + ", ".join(f"{k}={r['overrides'].get(k)}" for k in keys) if keys else "") for r in runs
        ]
        values = [r["metrics"].get(metric, 0.0) if r in ok else 0.0 for r in runs]
        colours = ["tab:blue" if r in ok else "tab:red" for r in runs]
        ax.bar(range(len(runs)), values, color=colours)
        ax.set_xticks(range(len(runs)), labels=labels, fontsize=7, rotation=30, ha="right")
        for i, r in enumerate(runs):
            if r not in ok:
                ax.text(i, 0, "failed", ha="center", va="bottom", color="tab:red", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} of {len(ok)} runs" + (f" ({len(failed)} failed)" if failed else ""))
    ax.grid(True, alpha=0.3)
    if numeric and (ok or failed):
        ax.legend(fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    return path


def summarize(sweep_dir: str | Path, metric: str | None = DEFAULT_METRIC, mode: str = "max") -> dict[str, Any]:
    """Write the sweep's report into ``sweep_dir``: ``summary.csv``, ``summary.md``, ``summary.png``
    (jobs sorted by ``metric``) and ``sweep_status.json`` (jobs in job order); return the latter.

    A cross-validation (``data.fold`` varies) adds :func:`fold_summary`: a table in ``summary.md``,
    ``summary_folds.csv`` and ``folds`` in ``sweep_status.json``.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r} must be 'max' or 'min'")
    sweep_dir = Path(sweep_dir)
    runs = load_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"no job directories (with .hydra/, status.json or metrics.json) in {sweep_dir}")
    metric = choose_metric(runs, metric)
    ranked = sort_runs(runs, metric, mode)
    _, md_path = write_table(ranked, metric, sweep_dir)
    folds = fold_summary(runs, metric, mode)
    if folds:
        md_path.write_text(md_path.read_text() + "\n".join(write_fold_table(folds, metric, sweep_dir)[1]) + "\n")
    try:
        plot_runs(ranked, metric, sweep_dir / "summary.png")
    except Exception as e:  # a figure problem must not hide the table and the statuses
        log.warning("could not plot the sweep in %s: %s", sweep_dir, e)
    failed = [r["job"] for r in runs if r["status"] != COMPLETED]
    jobs = [{k: v for k, v in r.items() if k != "metrics"} | r["metrics"] for r in runs]
    summary = {"metric": metric, "n_jobs": len(runs), "n_failed": len(failed), "failed": failed, "jobs": jobs}
    if folds:
        summary["folds"] = folds
    write_json(sweep_dir / SUMMARY_FILE, summary)
    log.info("Sweep %s: %d jobs, %d did not complete", sweep_dir, len(runs), len(failed))
    return summary


def scalar_curves(run_dir: str | Path, tags: list[str] | None = None) -> dict[str, tuple[list[int], list[float]]]:
    """Scalar curves ``tag -> (steps, values)`` from a run's TensorBoard events (``<run>/tensorboard``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, tuple[list[int], list[float]]] = {}
    for events in sorted(Path(run_dir).glob("tensorboard/**/events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tags is None or tag in tags:
                steps, values = curves.setdefault(tag, ([], []))
                for e in acc.Scalars(tag):
                    steps.append(e.step)
                    values.append(e.value)
    return curves


class SweepReport(Callback):
    """Hydra callback: :func:`summarize` the sweep when a multirun ends, and report failed jobs.

    Args:
        metric: sort and plot by this metric; None: the run's ``optimized_metric``.
        mode: ``max`` or ``min``.
        fail_on_error: exit with status 1 after the sweep when any job did not complete (the
            finished jobs' results are all kept), so scripts and CI notice.
    """

    def __init__(self, metric: str | None = None, mode: str = "max", fail_on_error: bool = True) -> None:
        self.metric, self.mode, self.fail_on_error = metric, mode, fail_on_error
        self.total: int | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Before the sweeper writes anything: stop (exit 2) if ``hydra.sweep.dir`` holds another sweep."""
        conflict = resume_conflict(config)
        if conflict:
            print(f"error: {conflict}", file=sys.stderr, flush=True)
            sys.exit(EXIT_CONFLICT)
        self.total = planned_jobs(config)
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir", default=None)
        earlier = load_runs(sweep_dir) if sweep_dir is not None and Path(str(sweep_dir)).is_dir() else []
        if earlier:
            done = sum(r["status"] == COMPLETED for r in earlier)
            log.info(
                "Continuing the sweep in %s: %d of its jobs completed earlier and are skipped; %d run again, "
                "from their last.ckpt where they have one",
                sweep_dir, done, len(earlier) - done,
            )  # fmt: skip

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """After each job of a multirun, one status line on stderr (when progress is shown)."""
        if not in_multirun() or not show_progress():
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir():
            print(status_line(load_runs(sweep_dir), self.total), file=sys.stderr, flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        summary = summarize(sweep_dir, self.metric or config.get("optimized_metric") or DEFAULT_METRIC, self.mode)
        log.info("\n%s", (sweep_dir / "summary.md").read_text())
        print(f"Sweep report: {sweep_dir / 'summary.md'} ({summary['n_jobs']} jobs, {summary['n_failed']} failed)")
        if summary["n_failed"] and self.fail_on_error:
            message = (
                f"{summary['n_failed']} of {summary['n_jobs']} jobs failed (jobs {', '.join(summary['failed'])}); "
                f"the others' results are kept; see {sweep_dir / SUMMARY_FILE}"
            )
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(EXIT_JOBS_FAILED)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Summarise a Hydra multirun: a table and a plot of its jobs.")
    parser.add_argument("sweep_dir", help="the multirun directory (holds one subdirectory per job)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="sort and plot by this metric (default %(default)s)")
    parser.add_argument("--mode", choices=("max", "min"), default="max")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.sweep_dir, args.metric, args.mode)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if show_progress():  # where a sweep that is still running stands
        saved, total = Path(args.sweep_dir, "multirun.yaml"), None
        if saved.is_file():
            from hydra import initialize_config_dir

            from resnet_cifar import CONFIG_DIR

            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):  # to expand a glob(...)
                total = planned_jobs(OmegaConf.load(saved))
        print(status_line(summary["jobs"], total, unknown="running or killed"), file=sys.stderr)
    print(Path(args.sweep_dir, "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
