"""The sweep's summary: one row per job (status, the overrides that vary, final metrics), a table and a plot."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

from resnet_cifar.atomic import write_json
from resnet_cifar.sweeps.folds import fold_summary, write_fold_table
from resnet_cifar.sweeps.status import COMPLETED, ENDED_WELL, PRUNED, load_runs, varying_keys
from resnet_cifar.sweeps.table import TABLE_METRICS, fmt, markdown_table

log = logging.getLogger(__name__)

SUMMARY_FILE = "sweep_status.json"
DEFAULT_METRIC = "val/acc_best"
FALLBACK_METRICS = ("val/acc_best", "test/acc", "test/top1")


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


def _note(run: dict[str, Any]) -> str:
    if run.get("error"):
        return f"{run.get('error_type', '')}: {run['error']}"
    return f"pruned {run['pruned']}" if run.get("pruned") else ""


def write_table(runs: list[dict[str, Any]], metric: str, sweep_dir: Path) -> tuple[Path, Path]:
    keys = varying_keys(runs)
    all_metrics = sorted({k for r in runs for k in r["metrics"]})
    metric_cols = [metric, *[m for m in all_metrics if m != metric]]
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", "status", *keys, *metric_cols, "error", "pruned"])
        for r in runs:
            w.writerow(
                [
                    r["job"],
                    r["status"],
                    *[r["overrides"].get(k) for k in keys],
                    *[r["metrics"].get(m) for m in metric_cols],
                    r.get("error", ""),
                    r.get("pruned", ""),
                ]
            )
    shown = [metric, *[m for m in TABLE_METRICS if m != metric and m in all_metrics]]
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"Sorted by `{metric}`; status from each job's status.json (`running`: still running, or killed; "
        "`pruned`: stopped early by the search, its metrics are those it reached; `unknown`: the job wrote none).",
        "",
    ]
    cells = [
        [
            r["job"],
            r["status"],
            *[str(r["overrides"].get(k, "")) for k in keys],
            *[fmt(r["metrics"].get(m)) for m in shown],
            _note(r),
        ]
        for r in runs
    ]
    md_path.write_text("\n".join(lines + markdown_table(["job", "status", *keys, *shown, "note"], cells)) + "\n")
    return csv_path, md_path


def plot_runs(runs: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """``metric`` against the one numeric swept value (log axis for wide ranges), else a bar per job.

    Pruned jobs are drawn apart (grey, at the value they reached), failed ones marked in red.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    keys = varying_keys(runs)
    ok = [r for r in runs if r["status"] == COMPLETED and metric in r["metrics"]]
    pruned = [r for r in runs if r["status"] == PRUNED and metric in r["metrics"]]
    failed = [r for r in runs if r not in ok and r not in pruned]
    numeric = len(keys) == 1 and all(isinstance(r["overrides"].get(keys[0]), (int, float)) for r in runs)
    if numeric:
        k = keys[0]
        pts = sorted((float(r["overrides"][k]), r["metrics"][metric]) for r in ok)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=metric)
        if pruned:
            ax.plot([float(r["overrides"][k]) for r in pruned], [r["metrics"][metric] for r in pruned],
                    "x", color="tab:gray", label="pruned")  # fmt: skip
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
        values = [r["metrics"].get(metric, 0.0) if r not in failed else 0.0 for r in runs]
        colours = ["tab:blue" if r in ok else "tab:gray" if r in pruned else "tab:red" for r in runs]
        ax.bar(range(len(runs)), values, color=colours)
        ax.set_xticks(range(len(runs)), labels=labels, fontsize=7, rotation=30, ha="right")
        for i, r in enumerate(runs):
            if r in failed or r in pruned:
                colour = "tab:red" if r in failed else "tab:gray"
                ax.text(i, 0, "failed" if r in failed else "pruned", ha="center", va="bottom", color=colour, fontsize=8)
    ax.set_ylabel(metric)
    notes = [f"{len(pruned)} pruned"] * bool(pruned) + [f"{len(failed)} failed"] * bool(failed)
    ax.set_title(f"{metric} of {len(ok)} runs" + (f" ({', '.join(notes)})" if notes else ""))
    ax.grid(True, alpha=0.3)
    if numeric and (ok or failed or pruned):
        ax.legend(fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    return path


def summarize(sweep_dir: str | Path, metric: str | None = DEFAULT_METRIC, mode: str = "max") -> dict[str, Any]:
    """Write the sweep's report into ``sweep_dir``: ``summary.csv``, ``summary.md``, ``summary.png``
    (jobs sorted by ``metric``) and ``sweep_status.json`` (jobs in job order); return the latter.

    ``n_failed`` counts the jobs that did not end well (neither completed nor pruned). A
    cross-validation (``data.fold`` varies) adds :func:`~resnet_cifar.sweeps.folds.fold_summary`: a
    table in ``summary.md``, ``summary_folds.csv`` and ``folds`` in ``sweep_status.json``.
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
    failed = [r["job"] for r in runs if r["status"] not in ENDED_WELL]
    pruned = [r["job"] for r in runs if r["status"] == PRUNED]
    jobs = [{k: v for k, v in r.items() if k != "metrics"} | r["metrics"] for r in runs]
    summary = {
        "metric": metric,
        "n_jobs": len(runs),
        "n_failed": len(failed),
        "failed": failed,
        "n_pruned": len(pruned),
        "pruned": pruned,
        "jobs": jobs,
    }
    if folds:
        summary["folds"] = folds
    write_json(sweep_dir / SUMMARY_FILE, summary)
    log.info("Sweep %s: %d jobs, %d failed, %d pruned", sweep_dir, len(runs), len(failed), len(pruned))
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
