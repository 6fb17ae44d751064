"""Where a training step of ``python train.py`` spends its time: py-spy samples, grouped by phase.

Runs ``train.py`` (one short epoch, any overrides) under the sampling profiler py-spy (``pip install
py-spy``; sampling adds no cost to the Python code it watches, unlike ``cProfile``), keeps the
samples taken inside Lightning's training epoch loop and sorts each into one phase by the frames on
its stack: the model's forward, the backward pass, the optimizer update, the data (loader, batch
transfer, augmentation), validation, and everything else, which is the framework (Lightning's loop,
logging, callbacks, the LR schedule). The table gives each phase's share and milliseconds per step,
then the framework's heaviest call sites.

    RESNET_CIFAR_DATA=<dir holding cifar-10-batches-py> python bench/step_profile.py
    ... python bench/step_profile.py data.batch_size=8 --steps 600   # small batches: the framework shows
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from _common import DATA_ROOT, machine, print_table

REPO = Path(__file__).resolve().parents[1]
RATE = 100  # samples per second
# A sample belongs to the first phase whose marker frame is on its stack (checked in this order).
PHASES = (
    ("validation", ("_EvaluationLoop.run",)),
    ("backward", ("_engine_run_backward",)),
    ("forward", ("ImageClassifier.forward",)),
    ("data", ("_DataFetcher.__next__", "on_after_batch_transfer", "_PrefetchDataFetcher", "ResumableLoader")),
    ("optimizer update", ("SGD.step", "AdamW.step")),
)
LOOP = "_TrainingEpochLoop.run"
FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>.*?):\d+\)$")


def phase(frames: list[str]) -> str:
    for name, markers in PHASES:
        if any(m in f for f in frames for m in markers):
            return name
    return "framework (Lightning, logging, callbacks, schedule)"


def framework_site(frames: list[str]) -> str:
    """The innermost frame below Lightning's loop that belongs to this project, Lightning or torchmetrics."""
    for f in reversed(frames):
        m = FRAME.match(f)
        if m and any(k in m["file"] for k in ("resnet_cifar", "pytorch_lightning", "lightning_fabric", "torchmetrics")):
            return f"{m['name']} ({m['file'].split('site-packages/')[-1].split('/src/')[-1]})"
    return frames[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="train.py overrides")
    p.add_argument("--steps", type=int, default=80, help="training steps profiled")
    args = p.parse_args()
    if shutil.which("py-spy") is None:
        sys.exit("step_profile: py-spy is not installed: pip install py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "samples.txt"
        cmd = [
            *("py-spy", "record", "--format", "raw", "--rate", str(RATE), "--nonblocking", "-o", str(raw), "--"),
            *(sys.executable, str(REPO / "train.py"), f"data.root={DATA_ROOT}", "trainer.max_epochs=1"),
            *(f"trainer.limit_train_batches={args.steps}", "trainer.limit_val_batches=1", "test=false"),
            *(f"hydra.run.dir={tmp}/run", *args.overrides),
        ]
        print(f"machine: {machine()}\n$ {' '.join(cmd)}\n", flush=True)
        subprocess.run(cmd, check=True, capture_output=True)
        phases: Counter[str] = Counter()
        sites: Counter[str] = Counter()
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            if not any(LOOP in f for f in frames):
                continue
            name = phase(frames)
            phases[name] += int(count)
            if name.startswith("framework"):
                sites[framework_site(frames)] += int(count)
    total = sum(phases.values())
    ms = 1000 / RATE / args.steps
    rows = [(name, f"{100 * n / total:.1f}%", f"{n * ms:.1f}") for name, n in phases.most_common()]
    print(f"{args.steps} training steps, {total} samples at {RATE}/s inside Lightning's training loop\n")
    print_table(["phase", "share", "ms per step"], rows)
    print("\nThe framework's heaviest call sites:\n")
    print_table(["call site", "ms per step"], [(s, f"{n * ms:.2f}") for s, n in sites.most_common(10)])


if __name__ == "__main__":
    main()
