"""Benchmark 4 (report): test accuracy against wall-clock minutes of the runs of bench/accuracy_runs.sh.

Each checkpoint a run wrote (every N steps and every epoch) is tested on the official test set;
its minute is its file time minus the run's start (Hydra's ``.hydra/config.yaml``), so it counts
everything the run did (data loading, validation, checkpointing). The test set only reports here:
nothing was chosen by it.

    PYTHONPATH=src RESNET_CIFAR_DATA=/work/shared/data/cifar10 \\
        python bench/accuracy_vs_time.py /work/runs/issue3/resnet20_cpu /work/runs/issue3/usual_resnet18
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _common import DATA_ROOT, machine, print_table

from resnet_cifar.data.datamodule import CIFAR10DataModule
from resnet_cifar.models.weights import safe_load
from resnet_cifar.training.module import ImageClassifier


@torch.no_grad()
def test_accuracy(ckpt_path: Path, datamodules: dict) -> tuple[int, float]:
    ckpt = safe_load(ckpt_path, "checkpoint")
    data_hp = {**ckpt["datamodule_hyper_parameters"], "root": DATA_ROOT, "download": False, "eval_batch_size": 500}
    key = json.dumps(data_hp, sort_keys=True, default=str)
    if key not in datamodules:
        dm = CIFAR10DataModule(**data_hp)
        dm.setup("test")
        datamodules[key] = dm
    dm = datamodules[key]
    module = ImageClassifier.from_checkpoint(ckpt_path).eval()
    correct = total = 0
    for batch in dm.test_dataloader():
        x, y = dm.transform_batch(batch, train=False)
        correct += int((module.predict_logits(x).argmax(-1) == y).sum())
        total += len(y)
    return int(ckpt["global_step"]), correct / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--every", type=int, default=200, help="test the step checkpoints every N steps")
    args = p.parse_args()
    print(f"machine: {machine()}\n")
    datamodules: dict = {}
    rows = []
    for run in args.runs:
        start = (run / ".hydra" / "config.yaml").stat().st_mtime
        ckpts = [c for c in sorted((run / "step_checkpoints").glob("step*.ckpt")) if int(c.stem[4:]) % args.every == 0]
        ckpts += sorted((run / "checkpoints").glob("epoch*.ckpt"))
        ckpts.sort(key=lambda c: c.stat().st_mtime)
        for c in ckpts:
            step, acc = test_accuracy(c, datamodules)
            minutes = (c.stat().st_mtime - start) / 60
            rows.append((run.name, f"{minutes:.1f}", step, c.name, f"{acc:.4f}"))
            print(*rows[-1], sep=" | ", flush=True)
        metrics = run / "metrics.json"
        if metrics.is_file():
            m = json.loads(metrics.read_text())
            minutes = (metrics.stat().st_mtime - start) / 60
            best = Path(m.get("best_ckpt", "")).name
            rows.append(
                (
                    run.name,
                    f"{minutes:.1f} (end)",
                    "",
                    f"metrics.json: best by val = {best}",
                    f"{m.get('test/acc', float('nan')):.4f}",
                )
            )
    print()
    print_table(["run", "wall-clock min", "step", "checkpoint", "test acc"], rows)


if __name__ == "__main__":
    main()
