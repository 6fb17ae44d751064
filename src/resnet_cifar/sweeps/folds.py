"""A cross-validation's table: a sweep over ``data.fold`` summarised per setting, mean and spread over its folds."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from resnet_cifar.sweeps.status import COMPLETED, varying_keys
from resnet_cifar.sweeps.table import TABLE_METRICS, fmt, markdown_table

FOLD_KEY = "data.fold"  # a sweep over it is a cross-validation: the summary aggregates over folds


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
    cells = []
    for row in rows:
        stats = []
        for m in shown:
            mean, std = row["mean"].get(m), row["std"].get(m)
            stats.append("" if mean is None else fmt(mean) + ("" if std is None else f" ± {fmt(std)}"))
        folds = f"{len(row['folds'])}/{row['n_jobs']}"
        cells.append([*[str(row["overrides"][k]) for k in keys], folds, *stats])
    return path, lines + markdown_table([*keys, "folds", *shown], cells)
