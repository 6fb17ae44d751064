"""Summarise a Hydra multirun: one row per job (its overrides and final metrics), sorted, plus a plot.

Reads files only: ``<job>/.hydra/overrides.yaml`` and ``<job>/metrics.json``. A job
directory without ``metrics.json`` is listed as ``failed`` (it crashed, was killed, or
is still running). Run it after a sweep::

    python -m resnet_cifar.sweep_summary logs/train/multiruns/<date>

or let the Hydra callback in ``conf/hydra/default.yaml`` run it at the end of each multirun.
It writes ``summary.csv``, ``summary.md`` and ``summary.png`` into the sweep directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

DEFAULT_METRIC = "val/acc_best"
FALLBACK_METRICS = ("val/acc_best", "test/acc", "test/top1")
TABLE_METRICS = ("val/acc_best", "val/acc", "val/loss", "train/loss", "test/acc", "test/top5", "test/ece", "epochs")


def _job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and ((d / ".hydra").is_dir() or (d / "metrics.json").exists())]
    return sorted(dirs, key=lambda d: (0, int(d.name)) if d.name.isdigit() else (1, d.name))


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per job: ``job``, ``dir``, ``status`` (ok | failed), ``overrides``, ``metrics``."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir} does not exist")
    runs = []
    for d in _job_dirs(sweep_dir):
        overrides: dict[str, Any] = {}
        ov_file = d / ".hydra" / "overrides.yaml"
        if ov_file.is_file():
            for item in yaml.safe_load(ov_file.read_text()) or []:
                key, _, value = str(item).partition("=")
                overrides[key.lstrip("+~")] = _parse_value(value)
        metrics, status = {}, "failed"
        m_file = d / "metrics.json"
        if m_file.is_file():
            try:
                raw = json.loads(m_file.read_text())
                metrics = {
                    k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
                status = "ok"
            except (json.JSONDecodeError, OSError):
                status = "failed"
        runs.append({"job": d.name, "dir": str(d), "status": status, "overrides": overrides, "metrics": metrics})
    return runs


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


def write_table(runs: list[dict[str, Any]], metric: str, sweep_dir: Path) -> tuple[Path, Path]:
    keys = varying_keys(runs)
    all_metrics = sorted({k for r in runs for k in r["metrics"]})
    metric_cols = [metric, *[m for m in all_metrics if m != metric]]
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", "status", *keys, *metric_cols])
        for r in runs:
            w.writerow(
                [
                    r["job"],
                    r["status"],
                    *[r["overrides"].get(k) for k in keys],
                    *[r["metrics"].get(m) for m in metric_cols],
                ]
            )
    shown = [metric, *[m for m in TABLE_METRICS if m != metric and m in all_metrics]]
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"Sorted by `{metric}`; failed = no metrics.json in the job directory.",
        "",
    ]
    lines += ["| job | status | " + " | ".join([*keys, *shown]) + " |", "|" + "---|" * (2 + len(keys) + len(shown))]
    for r in runs:
        cells = [
            r["job"],
            r["status"],
            *[str(r["overrides"].get(k, "")) for k in keys],
            *[_fmt(r["metrics"].get(m)) for m in shown],
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
    ok = [r for r in runs if r["status"] == "ok" and metric in r["metrics"]]
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


def summarize(sweep_dir: str | Path, metric: str | None = DEFAULT_METRIC, mode: str = "max") -> list[dict[str, Any]]:
    """Write ``summary.csv``, ``summary.md`` and ``summary.png`` into ``sweep_dir``; return the sorted runs."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r} must be 'max' or 'min'")
    sweep_dir = Path(sweep_dir)
    runs = load_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"no job directories (with .hydra/ or metrics.json) in {sweep_dir}")
    metric = choose_metric(runs, metric)
    runs = sort_runs(runs, metric, mode)
    write_table(runs, metric, sweep_dir)
    plot_runs(runs, metric, sweep_dir / "summary.png")
    n_failed = sum(r["status"] != "ok" for r in runs)
    log.info("Sweep summary of %d runs (%d failed) in %s", len(runs), n_failed, sweep_dir)
    return runs


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


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object


class SweepSummary(_HydraCallback):
    """Hydra callback: :func:`summarize` the sweep directory when a multirun ends (never fails the sweep)."""

    def __init__(self, metric: str | None = None, mode: str = "max") -> None:
        self.metric, self.mode = metric, mode

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        metric = self.metric or config.get("optimized_metric") or DEFAULT_METRIC
        try:
            summarize(sweep_dir, metric, self.mode)
            print(f"Sweep summary: {sweep_dir / 'summary.md'}")
        except Exception as e:  # a summary problem must not turn a finished sweep into an error
            log.warning("could not summarise the sweep in %s: %s", sweep_dir, e)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="the multirun directory (holds one subdirectory per job)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="sort and plot by this metric (default %(default)s)")
    parser.add_argument("--mode", choices=("max", "min"), default="max")
    args = parser.parse_args(argv)
    try:
        runs = summarize(args.sweep_dir, args.metric, args.mode)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(Path(args.sweep_dir, "summary.md").read_text())
    return 0 if runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
