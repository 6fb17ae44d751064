"""The transfer study: pretrain on CIFAR-10 classes 0-4, transfer to classes 5-9.

One command runs it all at 32x32: the source run (``experiment=transfer_source``), then for
every label budget and seed one target run per stage (scratch / linear_probe / finetune),
each from the source's best checkpoint; with ``--variants``, finetune variants (backbone LR
warm-up on/off, ``stage.backbone_lr_ratio``) as extra rows. It writes a markdown table of
target TEST accuracy (mean +- sample std over the seeds, and each cell's wall-clock), a PNG
plot with error bars, ``results.json``, and can fill the results block of BENCHMARKS.md (``--readme``)::

    python bench/transfer_study.py --plan                      # the planned compute, runs nothing
    RESNET_CIFAR_DATA=/path/to/cifar10 python bench/transfer_study.py --variants --variant-budgets 50 250 all \\
        --out logs/transfer_study --plot docs/transfer_study.png --readme BENCHMARKS.md

Every finished (cell, seed) is kept (``<out>/<row>_<budget>/seed<k>/cell.json``) and a run
stopped mid-way resumes from its ``last.ckpt``: run the same command again to continue.
Extra Hydra overrides go to every run, e.g. ``--set trainer.accelerator=gpu``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))  # _common, also when the tests import this file by path

import torch  # noqa: E402
from _common import machine  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from resnet_cifar import CONFIG_DIR  # noqa: E402
from resnet_cifar.models.weights import safe_load  # noqa: E402
from resnet_cifar.run import build_datamodule, train  # noqa: E402

log = logging.getLogger("transfer_study")

STAGES = ("scratch", "linear_probe", "finetune")
ALL = "all"
BUDGETS = ("50", "250", ALL)
SEEDS = (0, 1, 2)
BEGIN, END = "<!-- transfer-study:begin -->", "<!-- transfer-study:end -->"

# ---------------------------------------------------------------- the plan
# Length of a target run: ONE rule for every stage, budget and seed (so that the stages differ
# only in their initialisation and what trains), in optimizer steps of data.batch_size images:
#   steps = min(MAX_STEPS, source_steps, max(MIN_STEPS, EPOCHS_OVER_BUDGET * steps_per_epoch)),
# rounded up to whole epochs over the budget's images. Why each bound:
# - EPOCHS_OVER_BUDGET: a run must converge on its labels. Each labelled image is seen ~30
#   times (with random crops and flips), which lets scratch fit a small budget and lets a
#   finetuned backbone adapt, under the one-cycle schedule that ends at ~0 LR.
# - MIN_STEPS: a small budget has few steps per epoch (50 labels x 5 classes = 250 images:
#   1 step of 128). 30 epochs would be 30 steps, too few for the new head to converge, even on
#   frozen features (linear_probe), and for the one-cycle schedule to have its shape.
# - MAX_STEPS: at "all" labels (4,750 per class, as many images as the source had), 30 epochs
#   would be 5,550 steps. The cap is 6 epochs (1,110 steps): each "all" run costs ~13 minutes
#   on the 2-core CPU and that column is already most of the study. The source trains longer
#   (10 epochs, to reach >= 85 % on its classes), so scratch at "all" gets 60 % of the source
#   recipe's steps on the target classes: the table states the steps of every cell.
# - source_steps: no target run trains longer than the source did (binds only in smoke runs).
EPOCHS_OVER_BUDGET = 30
MIN_STEPS = 100
MAX_STEPS = 1110
# finetune: the head trains alone for this fraction of the epochs (at least 1 epoch), then the
# backbone joins; with --variants' warm-up, its LR ramps up over the same fraction.
HEAD_ONLY_FRACTION = 0.1
WARMUP_FRACTION = 0.1
# --variants: extra finetune rows; stage overrides ("{warmup}" is the plan's warm-up length).
# The `finetune` row runs the stage's defaults (backbone LR x1, no warm-up: these rows showed x1
# better from 250 labels per class on and the warm-up within the seed spread); the variants are
# the alternatives.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "warmup": ("finetune, backbone LR warm-up", ["stage.backbone_warmup_epochs={warmup}"]),
    "ratio0.1": ("finetune, backbone LR x0.1", ["stage.backbone_lr_ratio=0.1"]),
    "ratio0.1_warmup": (
        "finetune, backbone LR x0.1 + warm-up",
        ["stage.backbone_lr_ratio=0.1", "stage.backbone_warmup_epochs={warmup}"],
    ),
}
# The variants run at 50 and 250 labels per class by default: at "all", each run costs as much
# as the source (the plan above), which would double the study's time (--variant-budgets all).
VARIANT_BUDGETS = ("50", "250")

# ------------------------------------------------------------ cost model
# Seconds a cell takes, predicted from the images it processes (print with --plan). Relative
# costs of the three kinds of image work, on ResNet-20 32x32 with channels_last on the 2-core CPU
# (forward+backward+SGD step at batch 128 = 1; measured at 183 images/s by
# `python bench/transfer_study.py --calibrate`, with other jobs on the machine):
FROZEN_COST = 0.28  # linear_probe / finetune's head-only epochs: backbone forward under no_grad, head step
EVAL_COST = 0.33  # validation / test forward (batch 500); flip TTA doubles the images
START_S = 6.0  # per run: composing, loading CIFAR-10, building the Trainer, writing checkpoints
TRAIN_IMAGES_PER_S = 180.0  # train.py's path on the 2-core CPU (BENCHMARKS.md); --images-per-s


@dataclass(frozen=True)
class Plan:
    """The length of the target runs at one label budget (the same for every stage and seed)."""

    budget: str
    images: int  # labelled training images (classes x budget)
    classes: int
    steps_per_epoch: int
    epochs: int
    unfreeze_at_epoch: int  # finetune
    warmup_epochs: float  # the --variants warm-up

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def make_plan(
    budget: str, images: int, classes: int, batch_size: int, max_steps: int, min_steps: int = MIN_STEPS
) -> Plan:
    """The rule above, for a budget of ``images`` training images."""
    per_epoch = images // batch_size  # the training loader drops the last partial batch
    if per_epoch == 0:
        raise SystemExit(
            f"error: budget {budget} has {images} training images, fewer than one batch of {batch_size}: "
            "raise the budget or lower data.batch_size (--set)"
        )
    steps = min(max_steps, max(min_steps, EPOCHS_OVER_BUDGET * per_epoch))
    epochs = max(2, math.ceil(steps / per_epoch))  # >= 2: finetune's backbone joins at epoch >= 1
    unfreeze = min(epochs - 1, max(1, round(HEAD_ONLY_FRACTION * epochs)))
    warmup = round(min(epochs - unfreeze, max(1.0, WARMUP_FRACTION * epochs)), 3)
    return Plan(budget, images, classes, per_epoch, epochs, unfreeze, warmup)


def compose_cfg(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        extra = [f"paths.output_dir={output_dir}"] if output_dir else []
        return compose("train", overrides=[*overrides, *extra])


def split_sizes(cfg: DictConfig) -> dict[str, int]:
    """Images of the train / val / test splits of a composed config (reads the data set once)."""
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    return {k: len(v) for k, v in dm.splits.items()}


@dataclass(frozen=True)
class Cell:
    """One target run: a row of the table (a stage or a finetune variant), a budget, a seed."""

    row: str
    stage: str
    budget: str
    seed: int
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.row}_{self.budget}"

    def predicted_seconds(self, plan: Plan, batch: int, eval_images: int, ips: float) -> float:
        return predicted_seconds(self.stage, plan, batch, eval_images, ips)


def predicted_seconds(stage: str, plan: Plan, batch: int, eval_images: int, ips: float) -> float:
    """The cost model above: full steps, frozen-backbone steps, evaluation, start-up."""
    frozen_epochs = {"scratch": 0, "linear_probe": plan.epochs, "finetune": plan.unfreeze_at_epoch}[stage]
    frozen = frozen_epochs * plan.steps_per_epoch * batch
    full = plan.steps * batch - frozen
    return START_S + (full + FROZEN_COST * frozen + EVAL_COST * eval_images) / ips


def eval_images(cfg: DictConfig, val_images: int, test_images: int, validations: int) -> int:
    tta = 2 if cfg.module.tta_flip else 1
    return tta * (validations * val_images + test_images)


def target_cells(
    budgets: list[str], seeds: list[int], plans: dict[str, Plan], variants: list[str], variant_budgets: list[str]
) -> list[Cell]:
    """Every (row, budget, seed), in running order: budget by budget, the seeds of a cell together."""
    cells = []
    for budget in budgets:
        plan = plans[budget]
        rows = [(s, s, []) for s in STAGES]
        if budget in variant_budgets:
            rows += [(f"finetune-{v}", "finetune", VARIANTS[v][1]) for v in variants]
        for row, stage, extra in rows:
            for seed in seeds:
                ov = [
                    f"experiment=transfer_{stage}",
                    f"data.train_per_class={'null' if budget == ALL else budget}",
                    f"seed={seed}",
                ]
                ov += [e.format(warmup=f"{plan.warmup_epochs:g}") for e in extra]
                cells.append(Cell(row, stage, budget, seed, tuple(ov)))
    return cells


def plan_overrides(cell: Cell, plan: Plan, source_ckpt: str) -> list[str]:
    """What the plan sets; appended last so that --set cannot change a run's length by accident."""
    ov = [f"trainer.max_epochs={plan.epochs}", f"trainer.check_val_every_n_epoch={plan.epochs}"]
    if cell.stage == "finetune":
        ov.append(f"stage.unfreeze_at_epoch={plan.unfreeze_at_epoch}")
    if cell.stage != "scratch":
        ov.append(f"model.weights_path={source_ckpt}")
    return ov


# ------------------------------------------------------------------ runs
class LoadPeak:
    """The highest 1-minute load average seen while a run trains (sampled every 5 s).

    The run's own training keeps about as many cores busy as torch has threads (2 on the 2-core
    CPU); a peak well above that means something else was computing and the run's time is not
    trustworthy (its accuracy is: seeded runs give the same numbers under any load).
    """

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s, self.peak, self._stop = every_s, os.getloadavg()[0], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, os.getloadavg()[0])

    def __enter__(self) -> LoadPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, os.getloadavg()[0])


def run_one(name: str, overrides: list[str], run_dir: Path, report_only: bool = False) -> dict | None:
    """Train one run in-process (or reuse its finished result); return its summary.

    A run that was stopped continues from its ``last.ckpt`` (``ckpt_path=last``).
    """
    done = run_dir / "cell.json"
    if done.is_file():
        return json.loads(done.read_text())
    if report_only:
        return None
    last = run_dir / "checkpoints" / "last.ckpt"
    resumed_at = int(safe_load(last).get("global_step", 0)) if last.is_file() else 0
    cfg = compose_cfg([*overrides, *(["ckpt_path=last"] if last.is_file() else [])], run_dir)
    log.info("%s: python train.py %s", name, " ".join(overrides))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with LoadPeak() as load:
        metrics = train(cfg)
    seconds = time.perf_counter() - start
    steps = int(safe_load(last).get("global_step", -1)) if last.is_file() else -1
    result = {
        "name": name,
        "overrides": overrides,
        "test_acc": metrics.get("test/acc"),
        "val_acc_best": metrics.get("val/acc_best"),
        "best_ckpt": metrics.get("best_ckpt"),
        "steps": steps,
        "seconds": seconds,
        "resumed_at_step": resumed_at,  # > 0: `seconds` covers only the part after the restart
        "load_before": round(load_before, 2),  # 1-minute load average
        "load_peak": round(load.peak, 2),
        "machine": machine(with_load=False),
    }
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


class Progress:
    """One line on stderr after each run: runs done / total, its time, the time left.

    The time left is the plan's prediction for the remaining runs that are not already finished
    (``kept``: runs later in the plan may have finished in an earlier session), scaled by how the
    runs of this session compared with their predictions (so a faster or slower machine, or a
    GPU, corrects the estimate as the study goes).
    """

    def __init__(self, predicted: list[float], kept: list[bool]) -> None:
        self.kept = kept
        self.predicted = [0.0 if k else p for p, k in zip(predicted, kept, strict=True)]
        self.done, self.actual, self.expected = 0, 0.0, 0.0

    def update(self, name: str, result: dict | None) -> None:
        """After the next run of the plan: ``result`` is None where it did not run (--report-only)."""
        i, self.done = self.done, self.done + 1
        ran = result is not None and not self.kept[i]
        if ran:
            self.actual, self.expected = self.actual + result["seconds"], self.expected + self.predicted[i]
        scale = self.actual / self.expected if self.expected else 1.0
        left = scale * sum(self.predicted[self.done :])
        acc = f"test acc {result['test_acc']:.4f}" if result and result.get("test_acc") is not None else "not run"
        took = f"{result['seconds'] / 60:.1f} min" if result else "-"
        how = "ran" if ran else "kept"
        log.info(
            "[%d/%d] %s (%s): %s, %s; about %s left", self.done, len(self.predicted), name, how, acc, took, hm(left)
        )


def hm(seconds: float) -> str:
    m = round(seconds / 60)
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min"


# ------------------------------------------------------------- reporting
def aggregate(results: list[dict]) -> dict[str, Any]:
    """Mean, sample standard deviation (n-1; 0 for one seed), min and max of the test accuracy."""
    accs = [r["test_acc"] for r in results]
    return {
        "n": len(accs),
        "mean": statistics.fmean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "min": min(accs),
        "max": max(accs),
        "seconds_mean": statistics.fmean(r["seconds"] for r in results),
        "seconds_total": sum(r["seconds"] for r in results),
        "steps": results[0]["steps"],
        "seeds": [r.get("seed") for r in results],
    }


def budget_label(budget: str, plans: dict[str, Plan]) -> str:
    if budget == ALL and budget in plans:
        return f"all ({plans[budget].images // plans[budget].classes:,}) / class"
    return f"{budget} / class"


def row_label(row: str, finetune_cfg: DictConfig) -> str:
    if row == "finetune":
        stage = finetune_cfg.stage
        w = stage.backbone_warmup_epochs
        warm = f"backbone LR warm-up {w:g} epochs" if w else "no warm-up"
        return f"`finetune` (backbone LR x{stage.backbone_lr_ratio:g}, {warm})"
    if row.startswith("finetune-"):
        return VARIANTS[row.removeprefix("finetune-")][0]
    return f"`{row}`"


def table(
    rows: list[str],
    budgets: list[str],
    agg: dict[tuple[str, str], dict],
    plans: dict[str, Plan],
    finetune_cfg: DictConfig,
) -> str:
    """Markdown: rows are stages (and variants), columns budgets; 'mean ± std % (time per run, steps)'."""
    lines = [
        "| target stage | " + " | ".join(budget_label(b, plans) for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for row in rows:
        cells = []
        for b in budgets:
            a = agg.get((row, b))
            cells.append(
                f"{100 * a['mean']:.1f} ± {100 * a['std']:.1f} % ({a['seconds_mean'] / 60:.1f} min, {a['steps']} steps)"
                if a
                else "–"
            )
        lines.append(f"| {row_label(row, finetune_cfg)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[str], budgets: list[str], agg: dict, plans: dict, finetune_cfg: DictConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.6), dpi=110)
    xs = list(range(len(budgets)))
    for i, row in enumerate(rows):
        pts = [(x, agg[(row, b)]) for x, b in zip(xs, budgets) if (row, b) in agg]
        if not pts:
            continue
        shift = (i - (len(rows) - 1) / 2) * 0.04  # side by side, so that the error bars do not overlap
        ax.errorbar(
            [x + shift for x, _ in pts],
            [100 * a["mean"] for _, a in pts],
            yerr=[100 * a["std"] for _, a in pts],
            marker="osDv^<>"[i % 7],
            capsize=3,
            label=row_label(row, finetune_cfg).replace("`", ""),
            linestyle="-" if row in STAGES else ":",
        )
    ax.set_xticks(xs, [budget_label(b, plans) for b in budgets])
    ax.set_xlabel("target label budget (classes 5-9)")
    ax.set_ylabel("target test accuracy (%), mean ± std")
    ax.set_title("ResNet-20 32x32 transfer: CIFAR-10 classes 0-4 -> 5-9")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def load_note(source: dict, results: dict[tuple[str, str], list[dict]]) -> str:
    """The load the runs saw (recorded per run since the script samples it), in one sentence."""
    runs = [source, *(r for v in results.values() for r in v)]
    seen = [r for r in runs if "load_peak" in r]
    text = (
        f"1-minute load average over {len(seen)} run(s): at most {max(r['load_before'] for r in seen):.2f} "
        f"when one started, peak {max(r['load_peak'] for r in seen):.2f} during one (its own training "
        f"keeps ~{torch.get_num_threads()} cores busy)."
        if seen
        else ""
    )
    if len(seen) < len(runs):
        text += f" {len(runs) - len(seen)} run(s) ran before the script recorded the load."
    return text.strip()


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {readme} has no {BEGIN} ... {END} block to fill")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{block}\n{END}", text))


def command_line(argv: list[str]) -> str:
    """This command as typed, with absolute paths under the checkout made relative (no machine paths)."""
    shown = [str(Path(a).relative_to(REPO)) if a.startswith(str(REPO) + "/") else a for a in argv]
    shown = [a for a in shown if a != "--report-only"]  # the command that trains what is reported
    return "python bench/transfer_study.py " + shlex.join(shown)


def calibrate(batch: int = 128, eval_batch: int = 500, repeats: int = 15) -> dict[str, float]:
    """Measure FROZEN_COST and EVAL_COST: seconds per image of each kind of work over a training step's."""
    import torch

    from resnet_cifar.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=5, shortcut="B").to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    x, y, xe = images(batch), torch.randint(0, 5, (batch,)), images(eval_batch)

    def full() -> None:
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def frozen() -> None:
        model.backbone.eval()
        with torch.no_grad():
            f = model.backbone(x)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.head(f), y).backward()
        opt.step()

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            model(xe)

    # interleaved and median: a load that comes and goes hits the three kinds alike
    kinds = {"full": (full, batch), "frozen": (frozen, batch), "eval": (evaluate, eval_batch)}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for fn, _ in kinds.values():
        fn()  # warm-up
    for _ in range(repeats):
        for k, (fn, n) in kinds.items():
            start = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - start) / n)
    t_full, t_frozen, t_eval = (statistics.median(times[k]) for k in kinds)
    return {"train_images_per_s": 1 / t_full, "frozen_cost": t_frozen / t_full, "eval_cost": t_eval / t_full}


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "logs" / "transfer_study", help="run directories and results")
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS), help="labels per class: integers or 'all'")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="training seeds of every cell")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=None, help="finetune variants (all)")
    p.add_argument("--variant-budgets", nargs="+", default=list(VARIANT_BUDGETS), help="budgets of the variants")
    p.add_argument("--min-steps", type=int, default=MIN_STEPS, help="the plan's floor (smoke runs: lower)")
    p.add_argument("--max-steps", type=int, default=MAX_STEPS, help="the plan's cap (also: the source's steps)")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default <out>/transfer_study.png)")
    p.add_argument("--readme", type=Path, default=None, help="fill this README's transfer-study block")
    p.add_argument("--plan", action="store_true", help="print the plan and its predicted time; train nothing")
    p.add_argument("--images-per-s", type=float, default=TRAIN_IMAGES_PER_S, help="training speed for --plan")
    p.add_argument("--calibrate", action="store_true", help="measure the cost model's ratios here, then exit")
    p.add_argument("--report-only", action="store_true", help="train nothing: report the finished cells")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="Hydra overrides for every run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.calibrate:
        print(json.dumps(calibrate(), indent=2))
        return
    for b in [*args.budgets, *args.variant_budgets]:
        if b != ALL and not (b.isdigit() and int(b) > 0):
            raise SystemExit(f"error: budget {b!r}: expected a positive integer (labels per class) or 'all'")
    variants = list(VARIANTS) if args.variants == [] else (args.variants or [])
    variant_budgets = [b for b in args.variant_budgets if b in args.budgets] if variants else []
    out = args.out.resolve()
    # no sanity-check validation (each run validates on schedule), no per-run report or progress bar
    common = [
        "~callbacks.progress_bar",
        "~callbacks.model_summary",
        "++trainer.num_sanity_val_steps=0",
        "report=none",
        *args.set,
    ]

    # The plan: the source's length and every budget's training images, read from the composed
    # configs and the data (so that --set data.* is taken into account).
    source_ov = ["experiment=transfer_source", *common]
    source_cfg = compose_cfg(source_ov)
    batch = int(source_cfg.data.batch_size)
    source_steps = source_cfg.trainer.max_epochs * (split_sizes(source_cfg)["train"] // batch)
    max_steps = min(args.max_steps, source_steps)
    target_all = compose_cfg(["experiment=transfer_scratch", "data.train_per_class=null", *common])
    sizes = split_sizes(target_all)
    n_all, val_images, test_images = sizes["train"], sizes["val"], sizes["test"]
    n_classes = len(target_all.data.classes)
    finetune_cfg = compose_cfg(["experiment=transfer_finetune", *common])
    plans = {
        b: make_plan(b, n_all if b == ALL else int(b) * n_classes, n_classes, batch, max_steps, args.min_steps)
        for b in args.budgets
    }
    source_eval = eval_images(source_cfg, val_images, test_images, source_cfg.trainer.max_epochs)
    cells = target_cells(args.budgets, args.seeds, plans, variants, variant_budgets)
    ips = args.images_per_s
    predicted = [predicted_seconds("scratch", Plan(ALL, 0, 1, source_steps, 1, 0, 0), batch, source_eval, ips)]
    predicted += [
        c.predicted_seconds(plans[c.budget], batch, eval_images(target_all, val_images, test_images, 1), ips)
        for c in cells
    ]
    print_plan(plans, cells, predicted, batch, source_steps, ips)
    if args.plan:
        return

    out.mkdir(parents=True, exist_ok=True)
    source_dir = out / "source"
    run_dirs = [source_dir] + [out / c.name / f"seed{c.seed}" for c in cells]
    kept = [(d / "cell.json").is_file() for d in run_dirs]  # finished in an earlier session
    progress = Progress(predicted, kept)
    start = time.perf_counter()
    source = run_one("source", source_ov, source_dir, args.report_only)
    progress.update("source", source)
    if not source or not source.get("best_ckpt"):
        raise SystemExit("error: the source run saved no checkpoint; check callbacks.model_checkpoint")
    if source["test_acc"] is not None and source["test_acc"] < 0.85:
        log.warning("the source reached %.1f %% test accuracy, below the study's 85 %%", 100 * source["test_acc"])

    results: dict[tuple[str, str], list[dict]] = {}
    for cell, run_dir in zip(cells, run_dirs[1:], strict=True):
        ov = [*cell.overrides, *common, *plan_overrides(cell, plans[cell.budget], source["best_ckpt"])]
        result = run_one(f"{cell.name} seed {cell.seed}", ov, run_dir, args.report_only)
        progress.update(f"{cell.name} seed {cell.seed}", result)
        if result:
            results.setdefault((cell.row, cell.budget), []).append({**result, "seed": cell.seed})
    session = time.perf_counter() - start

    rows = list(dict.fromkeys(c.row for c in cells))
    agg = {k: aggregate(v) for k, v in results.items()}
    n_runs = sum(len(v) for v in results.values())
    total = source["seconds"] + sum(r["seconds"] for v in results.values() for r in v)
    resumed = sum(r.get("resumed_at_step", 0) > 0 for v in results.values() for r in [source, *v])
    md = table(rows, args.budgets, agg, plans, finetune_cfg)
    machines = sorted({r["machine"] for r in [source, *(r for v in results.values() for r in v)] if "machine" in r})
    machine_line = "; ".join(machines) or machine(with_load=False)
    seeds = ", ".join(map(str, args.seeds))
    notes = [
        f"Target test accuracy on the 5,000 test images of classes 5-9: mean ± sample standard deviation "
        f"(n-1) over seeds {seeds}, then the mean wall-clock of one run (fit, validation and test) and its "
        "optimizer steps. The seed changes initialisation, order and augmentation; the labelled images of "
        "a budget are the same for every seed (`data.split_seed`), and every seed starts from the one source.",
        f"Source (`experiment=transfer_source`, classes 0-4): {100 * source['test_acc']:.1f} % test accuracy on "
        f"the source classes, {source['steps']} steps, {source['seconds'] / 60:.1f} min.",
        f"Total: {total / 60:.1f} min of training and testing over {n_runs + 1} runs (each timed around "
        f"`train()`), at {source_cfg.data.image_size}x{source_cfg.data.image_size}, batch {batch}.",
        f"Command: `{command_line(argv)}`",
        f"Machine: {machine_line}. {load_note(source, results)}",
    ]
    missing = len(cells) - n_runs
    if missing:
        notes.append(f"{missing} run(s) not finished yet (– where a cell has none).")
    if resumed:
        notes.append(f"{resumed} run(s) were resumed after a stop: their time covers the part after it.")
    block = md + "\n\n" + "\n\n".join(notes)
    plot_path = args.plot or out / "transfer_study.png"
    plot(rows, args.budgets, agg, plans, finetune_cfg, plot_path)
    summary = {
        "source": source,
        "plans": {b: asdict(pl) | {"steps": pl.steps} for b, pl in plans.items()},
        "cells": {f"{r}_{b}": {"runs": results[(r, b)], **agg[(r, b)]} for (r, b) in results},
        "total_train_seconds": total,
        "session_seconds": session,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "transfer_study.md").write_text(block + "\n")
    print(block)
    print(f"\nwrote {out / 'results.json'}, {out / 'transfer_study.md'}, {plot_path}")
    if args.readme:
        update_readme(args.readme, block)
        print(f"updated {args.readme}")


def print_plan(
    plans: dict[str, Plan], cells: list[Cell], predicted: list[float], batch: int, source_steps: int, ips: float
) -> None:
    """The planned compute: per budget the run length, per row the images and predicted minutes."""
    lines = [
        f"Plan (batch {batch}; source: {source_steps} steps, {source_steps * batch:,} images, "
        f"{predicted[0] / 60:.1f} min predicted at {ips:g} training images/s):"
    ]
    for b, pl in plans.items():
        lines.append(
            f"  budget {b}: {pl.images:,} images, {pl.steps_per_epoch} steps/epoch x {pl.epochs} epochs = {pl.steps} "
            f"steps = {pl.steps * batch:,} images per run; finetune unfreezes at epoch {pl.unfreeze_at_epoch}, "
            f"warm-up variant {pl.warmup_epochs:g} epochs"
        )
    by_row: dict[tuple[str, str], list[float]] = {}
    for c, s in zip(cells, predicted[1:]):
        by_row.setdefault((c.row, c.budget), []).append(s)
    for (row, b), secs in by_row.items():
        lines.append(f"  {row:24s} {b:>5s}: {len(secs)} run(s) x {secs[0] / 60:5.1f} min = {sum(secs) / 60:6.1f} min")
    lines.append(f"  total: {1 + len(cells)} runs, {hm(sum(predicted))} predicted")
    log.info("\n".join(lines))


if __name__ == "__main__":
    main()
