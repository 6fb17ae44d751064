"""Benchmark: evaluation images/s per view against training images/s, for the presets' networks.

A forward pass costs about a third of a training step (forward + backward), so an evaluation view
should run at ~3x the training rate per image. This prints, for each network as its preset builds it
(``train.py``'s config: channels_last, the precision ``auto`` picks here, the preset's batch sizes),
the training rate (forward, backward, SGD update), the evaluation rate per view of the preset's TTA
(``predict_logits``, as the test runs it under ``torch.inference_mode``) with ``module.eval_chunk``
images per forward (0: the whole concatenation of views in one call), and their ratio. Each figure
is the fastest of ``--repeats`` timings (the least disturbed).

    PYTHONPATH=src python bench/eval_speed.py
    PYTHONPATH=src python bench/eval_speed.py --chunks 0 128 256 512 --presets default cpu_10min
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from _common import compose, machine, print_table

from resnet_cifar.run import build_module
from resnet_cifar.training.precision import resolve_precision

# name -> train.py overrides (the preset's network; compile off: the bench times eager kernels, and the
# default recipe's compiled step is in BENCHMARKS.md 6.1)
PRESETS = {
    "default": ["module.compile=false"],  # ResNet-20, the default recipe
    "cpu_10min": ["experiment=cpu_10min"],  # the airbench94 layout
    "cpu_30min": ["experiment=cpu_30min"],  # airbench95's widths
}


class FakeData:
    """``num_classes``/``class_names`` of the datamodule, without reading the data set."""

    num_classes = 10
    class_names = [str(i) for i in range(10)]


def fastest(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(name: str, chunks: list[int], repeats: int, autocast) -> list[list[object]]:
    """The rows of one preset: its training rate, then its evaluation rate per view at each chunk size."""
    cfg = compose(PRESETS[name])
    module = build_module(cfg, FakeData())
    batch, eval_batch = int(cfg.data.batch_size), int(cfg.data.eval_batch_size)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        with autocast():
            loss = F.cross_entropy(module(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    module.train()
    step()  # warm-up: oneDNN primitives, allocator
    train_rate = batch / fastest(step, repeats)
    module.eval()
    xe = torch.randn(eval_batch, 3, 32, 32)
    views = module.eval_views()

    def evaluate() -> None:
        with torch.inference_mode(), autocast():
            module.predict_logits(xe)

    rows = []
    network = str(tuple(cfg.model.get("widths") or ()) or cfg.model.name)
    for chunk in chunks:
        module.hparams.eval_chunk = chunk
        evaluate()
        eval_rate = eval_batch * views / fastest(evaluate, repeats)
        ratio = f"{eval_rate / train_rate:.2f}x"
        rows.append([name, network, batch, f"{train_rate:.0f}", f"{eval_batch} x {views}", chunk or "one call"])
        rows[-1] += [f"{eval_rate:.0f}", ratio]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--chunks", nargs="+", type=int, default=[0, 256], help="module.eval_chunk values (0: one call)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="auto", help="trainer.precision (auto: what train.py picks here)")
    args = p.parse_args()
    torch.manual_seed(0)
    precision, reason = resolve_precision(args.precision, "cpu")
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16-mixed" else (lambda: nullcontext())
    )
    print(f"# {machine()}")
    print(f"# precision {precision} ({reason}); fastest of {args.repeats} timings each")
    rows = []
    for name in args.presets:
        for row in measure(name, args.chunks, args.repeats, autocast):
            rows.append(row)
            print(" | ".join(str(c) for c in row), flush=True)
    print()
    headers = ["preset", "network", "train batch", "train img/s", "eval images x views", "eval_chunk"]
    print_table([*headers, "eval views/s", "eval / train"], rows)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# load average {load:.1f} at the end")


if __name__ == "__main__":
    main()
