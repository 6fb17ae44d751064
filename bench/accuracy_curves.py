"""Accuracy against wall-clock minutes of finished training runs, from their TensorBoard logs.

For each run directory: ``val/acc`` at each validation, timed from the start of the command
(the moment Hydra wrote ``.hydra/config.yaml``), and the final ``test/acc`` of ``metrics.json``
at the moment it was written. Prints a table per run and draws one plot.

    python bench/accuracy_curves.py logs/cpu_30min/runs/<run> logs/usual_resnet18/runs/<run> \\
        --out docs/accuracy_vs_time.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _common import print_table  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def curve(run: Path) -> tuple[list[tuple[float, int, float]], tuple[float, float] | None]:
    """``[(minutes, step, val/acc)]`` and ``(minutes, test/acc)`` of one run."""
    start = (run / ".hydra" / "config.yaml").stat().st_mtime
    points = []
    for events in sorted((run / "tensorboard").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "val/acc" in acc.Tags()["scalars"]:
            points += [((e.wall_time - start) / 60, e.step, e.value) for e in acc.Scalars("val/acc")]
    metrics_file = run / "metrics.json"
    test = None
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        if "test/acc" in metrics:
            test = ((metrics_file.stat().st_mtime - start) / 60, float(metrics["test/acc"]))
    return sorted(points), test


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (logs/<task>/runs/<run>)")
    p.add_argument("--labels", nargs="*", help="one label per run (default: the task name)")
    p.add_argument("--out", type=Path, default=Path("accuracy_vs_time.png"))
    args = p.parse_args()
    labels = args.labels or [r.parent.parent.name for r in args.runs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, label in zip(args.runs, labels, strict=True):
        points, test = curve(run)
        print(f"\n{label} ({run.name})\n")
        rows = [(f"{m:.1f}", s, f"{100 * a:.2f}%") for m, s, a in points]
        if test:
            rows.append((f"{test[0]:.1f}", "test/acc (end of the command)", f"{100 * test[1]:.2f}%"))
        print_table(["minutes", "step", "val/acc"], rows)
        line = ax.plot([m for m, _, _ in points], [100 * a for _, _, a in points], marker="o", label=label)[0]
        if test:
            ax.plot([test[0]], [100 * test[1]], marker="*", markersize=14, color=line.get_color())
    ax.set_xlabel("wall-clock minutes since the command started")
    ax.set_ylabel("accuracy (%): validation (o), test at the end (*)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
