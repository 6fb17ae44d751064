"""The transfer study: pretrain on CIFAR-10 classes 0-4, transfer to classes 5-9.

One command runs it all: the source run (``experiment=transfer_source``), then one target
run per stage (scratch / linear_probe / finetune) and label budget, each from the
source's best checkpoint. It prints and writes a markdown table and a PNG plot of target
TEST accuracy with the wall-clock cost of each cell, and can fill the README's block::

    RESNET_CIFAR_DATA=/path/to/cifar10 python bench/transfer_study.py \\
        --out logs/transfer_study --plot docs/transfer_study.png --readme README.md

Finished cells are kept (``<out>/<cell>/cell.json``): run the same command again to
continue a study that was stopped. Extra Hydra overrides go to every run, e.g.
``--set data.image_size=32 trainer.accelerator=gpu``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from hydra import compose, initialize_config_dir  # noqa: E402

from resnet_cifar import CONFIG_DIR  # noqa: E402
from resnet_cifar.models.weights import safe_load  # noqa: E402
from resnet_cifar.run import train  # noqa: E402

log = logging.getLogger("transfer_study")

STAGES = ("scratch", "linear_probe", "finetune")
ALL = "all"


@dataclass(frozen=True)
class Plan:
    """Training length of the target runs at one label budget (same for every stage)."""

    epochs: int
    val_every: int = 1
    batches_per_epoch: int | None = None  # cap (a fresh permutation each epoch); None: the whole budget


# Sized for a 2-core CPU shared with other jobs (16x16 inputs, batch 64): 27 / 38 / 48
# optimizer steps per cell, one validation at the end. Small budgets get many short epochs;
# "all" gets 3 epochs of 16 batches (3,072 draws from the 23,750 images). With more compute,
# raise these (and use data.image_size=32 on a GPU).
PLANS = {
    "50": Plan(epochs=9, val_every=9),
    "250": Plan(epochs=2, val_every=2),
    ALL: Plan(epochs=3, val_every=3, batches_per_epoch=16),
}
BEGIN, END = "<!-- transfer-study:begin -->", "<!-- transfer-study:end -->"


def run_cell(name: str, overrides: list[str], out: Path, report_only: bool = False) -> dict | None:
    """Train one run in-process (or reuse its finished result); return its summary."""
    cell_dir = out / name
    done = cell_dir / "cell.json"
    if done.is_file():
        log.info("%s: already done, reusing %s", name, done)
        return json.loads(done.read_text())
    if report_only:
        log.warning("%s: not run yet, left out of the report", name)
        return None
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={cell_dir}"])
    log.info("%s: python train.py %s", name, " ".join(overrides))
    start = time.perf_counter()
    metrics = train(cfg)
    seconds = time.perf_counter() - start
    last = cell_dir / "checkpoints" / "last.ckpt"
    steps = int(safe_load(last).get("global_step", -1)) if last.is_file() else -1
    result = {
        "name": name,
        "overrides": overrides,
        "test_acc": metrics.get("test/acc"),
        "val_acc_best": metrics.get("val/acc_best"),
        "best_ckpt": metrics.get("best_ckpt"),
        "steps": steps,
        "seconds": seconds,
    }
    done.write_text(json.dumps(result, indent=2) + "\n")
    log.info("%s: test acc %.4f in %.0f s (%d steps)", name, result["test_acc"] or float("nan"), seconds, steps)
    return result


def target_overrides(stage: str, budget: str, source_ckpt: str, extra: list[str]) -> list[str]:
    plan = PLANS[budget]
    ov = [
        f"experiment=transfer_{stage}",
        f"data.train_per_class={'null' if budget == ALL else budget}",
        f"trainer.max_epochs={plan.epochs}",
        f"trainer.check_val_every_n_epoch={plan.val_every}",
    ]
    if plan.batches_per_epoch:
        ov.append(f"++trainer.limit_train_batches={plan.batches_per_epoch}")
    if stage != "scratch":
        ov.append(f"model.weights_path={source_ckpt}")
    return [*ov, *extra]


def budget_label(budget: str) -> str:
    return "all (4,750) / class" if budget == ALL else f"{budget} / class"


def fmt_time(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def table(source: dict, cells: dict[tuple[str, str], dict], budgets: list[str]) -> str:
    """Markdown: rows are stages, columns label budgets, cells 'test acc (wall-clock)'."""
    lines = [
        "| target stage | " + " | ".join(budget_label(b) for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for stage in STAGES:
        row = []
        for b in budgets:
            c = cells.get((stage, b))
            row.append(f"{100 * c['test_acc']:.1f} % ({fmt_time(c['seconds'])}, {c['steps']} steps)" if c else "–")
        lines.append(f"| `{stage}` | " + " | ".join(row) + " |")
    lines.append(
        f"\nSource (`experiment=transfer_source`, classes 0-4): {100 * source['test_acc']:.1f} % test accuracy "
        f"on the source classes, {source['steps']} steps, {fmt_time(source['seconds'])}."
    )
    return "\n".join(lines)


def plot(cells: dict[tuple[str, str], dict], budgets: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    xs = list(range(len(budgets)))
    for stage, marker in zip(STAGES, "osD"):
        pts = [(x, cells[(stage, b)]) for x, b in zip(xs, budgets) if (stage, b) in cells]
        if not pts:
            continue
        ax.plot([x for x, _ in pts], [100 * c["test_acc"] for _, c in pts], marker=marker, label=stage)
        for x, c in pts:
            ax.annotate(
                f"{100 * c['test_acc']:.1f}%\n{c['seconds'] / 60:.1f} min",
                (x, 100 * c["test_acc"]),
                textcoords="offset points",
                xytext=(8, {"scratch": -4, "linear_probe": -22, "finetune": 6}[stage]),
                fontsize=7,
            )
    ax.set_xticks(xs, [budget_label(b) for b in budgets])
    ax.set_xlim(-0.3, len(budgets) - 0.5)
    ax.set_xlabel("target label budget (classes 5-9)")
    ax.set_ylabel("target test accuracy (%)")
    ax.set_title("ResNet-20 transfer: CIFAR-10 classes 0-4 -> 5-9")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {readme} has no {BEGIN} ... {END} block to fill")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{block}\n{END}", text))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "logs" / "transfer_study", help="run directories and results")
    p.add_argument("--budgets", nargs="+", default=list(PLANS), choices=list(PLANS), help="per-class label budgets")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default <out>/transfer_study.png)")
    p.add_argument("--readme", type=Path, default=None, help="fill this README's transfer-study block")
    p.add_argument("--report-only", action="store_true", help="train nothing: report the finished cells")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Hydra overrides for every run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # no sanity-check validation: each run validates on schedule anyway
    common = ["~callbacks.progress_bar", "~callbacks.model_summary", "++trainer.num_sanity_val_steps=0", *args.set]

    start = time.perf_counter()
    source = run_cell("source", ["experiment=transfer_source", *common], out, args.report_only)
    if not source or not source.get("best_ckpt"):
        raise SystemExit("error: the source run saved no checkpoint; check callbacks.model_checkpoint")
    cells = {}
    for budget in args.budgets:
        for stage in STAGES:
            name = f"{stage}_{budget}"
            cell = run_cell(name, target_overrides(stage, budget, source["best_ckpt"], common), out, args.report_only)
            if cell:
                cells[(stage, budget)] = cell
    total = source["seconds"] + sum(c["seconds"] for c in cells.values())
    session = time.perf_counter() - start

    md = table(source, cells, args.budgets)
    plot_path = args.plot or out / "transfer_study.png"
    plot(cells, args.budgets, plot_path)
    summary = {
        "source": source,
        "cells": {f"{s}_{b}": c for (s, b), c in cells.items()},
        "total_train_seconds": total,
        "session_seconds": session,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    missing = len(args.budgets) * len(STAGES) - len(cells)
    block = (
        f"{md}\n\nTotal: {fmt_time(total)} of training and testing (sum of the cells, "
        f"each timed around `train()`: fit, validation and test)."
        + (f" {missing} cell(s) not run yet (–)." if missing else "")
    )
    (out / "transfer_study.md").write_text(block + "\n")
    print(block)
    print(f"\nwrote {out / 'results.json'}, {out / 'transfer_study.md'}, {plot_path}")
    if args.readme:
        update_readme(args.readme, block)
        print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
