"""Benchmark 1: train.py's steady-state training images/s against a bare eager loop, per precision.

Both arms train the model of the composed config (default: ``python train.py``'s ResNet-20, batch 128,
SGD, cosine schedule, the tensor data path with crop + flip) on the real CIFAR-10 training split, with
the same precision, memory format and (with ``--compile``) ``torch.compile``:

- **bare loop**: the model, the optimizer and schedule of ``training/optim.py``, the data module's
  batches, autocast (and a GradScaler under ``16-mixed``): nothing else;
- **train.py**: ``resnet_cifar.run.train`` on the composed config, as ``python train.py`` runs it
  (Trainer, callbacks, TensorBoard logger, checkpoints), with only the epoch cut to the timed steps
  and validation/test cut short (both after the timed window).

Each arm runs ``--warmup`` untimed steps, then ``--steps`` timed ones (clock read at two batch ends,
the device synchronised there only); the arms alternate in ``--rounds`` rounds; the table gives the
median images/s, its range and train.py's ratio to the bare loop of the same precision. The first
step's time in the first round is reported too (with ``--compile``: the compilation, cold if torch's
compile cache is: ``TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)``; train.py compiles its evaluation graph
in Lightning's sanity check, before that step).

    RESNET_CIFAR_DATA=<dir holding cifar-10-batches-py> python bench/train_speed.py
    ... python bench/train_speed.py --precision 32-true bf16-mixed --compile both
    ... python bench/train_speed.py model=resnet18 model.cifar_stem=true   # any train.py override

``bench/gpu_check.py`` imports :func:`bare_loop` and :func:`train_py` for the same comparison on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _common import DATA_ROOT, compose, machine, print_table
from omegaconf import DictConfig, open_dict

from resnet_cifar.models.factory import build_model
from resnet_cifar.plain import to_dict
from resnet_cifar.run import build_datamodule, train
from resnet_cifar.training.optim import build_optimizer, build_scheduler
from resnet_cifar.training.precision import resolve_precision

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(pl.Callback):
    """Wall-clock at the end of the first batch, of batch ``warmup - 1`` and of the last one (synchronised)."""

    last: StepClock | None = None

    def __init__(self, warmup: int) -> None:
        self.warmup, self.marks, self.start = warmup, {}, 0.0
        StepClock.last = self

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(pl_module.device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, _o, _b, batch_idx: int) -> None:
        if batch_idx in (0, self.warmup - 1) or batch_idx == trainer.num_training_batches - 1:
            _sync(pl_module.device)
            self.marks[batch_idx] = time.perf_counter()


class ArmStopped(RuntimeError):
    """An arm reached its deadline before its last timed step (``bench/gpu_check.py``'s time budget)."""


class Deadline(pl.Callback):
    """Stops training at the first batch end past ``deadline`` (``time.monotonic()``)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if time.monotonic() > self.deadline:
            trainer.should_stop = True


def _rates(marks: dict[int, float], start: float, warmup: int, steps: int, batch: int) -> dict[str, float]:
    return {
        "images_per_s": steps * batch / (marks[warmup + steps - 1] - marks[warmup - 1]),
        "first_step_s": marks[0] - start,
    }


def train_py(
    cfg: DictConfig, warmup: int, steps: int, callbacks: dict | None = None, deadline: float | None = None
) -> dict[str, float]:
    """Images/s of ``resnet_cifar.run.train(cfg)`` over ``steps`` steps after ``warmup`` (>= 1) untimed ones.

    ``callbacks``: more callback configs (name -> ``_target_`` and arguments) for the run.
    ``deadline``: ``time.monotonic()`` at which training stops (then :class:`ArmStopped`).
    """
    cfg = copy.deepcopy(cfg)
    with tempfile.TemporaryDirectory() as out, open_dict(cfg):
        cfg.paths.output_dir = out
        cfg.trainer.max_epochs = 1
        cfg.trainer.limit_train_batches = warmup + steps
        cfg.trainer.limit_val_batches = 1  # validation and test run after the timed window: keep them short
        cfg.test = False
        cfg.callbacks["step_clock"] = {"_target_": f"{__name__}.StepClock", "warmup": warmup}
        for name, callback in (callbacks or {}).items():
            cfg.callbacks[name] = callback
        if deadline is not None:
            cfg.callbacks["deadline"] = {"_target_": f"{__name__}.Deadline", "deadline": deadline}
        train(cfg)
    clock = StepClock.last
    if warmup + steps - 1 not in clock.marks:
        raise ArmStopped(f"stopped at the deadline after {max(clock.marks, default=-1) + 1} of {warmup + steps} steps")
    return _rates(clock.marks, clock.start, warmup, steps, cfg.data.batch_size)


def bare_loop(cfg: DictConfig, warmup: int, steps: int, deadline: float | None = None) -> dict[str, float]:
    """The same model, optimizer, schedule, data, precision, memory format and ``trainer.benchmark`` (cudnn's
    autotuner) in a plain PyTorch loop; stopped by :class:`ArmStopped` past ``deadline`` (``time.monotonic()``)."""
    precision, _ = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    accelerator = str(cfg.trainer.accelerator)
    use_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    torch.backends.cudnn.benchmark = bool(cfg.trainer.get("benchmark") or False)  # unset: off, as in a new process
    pl.seed_everything(cfg.seed, verbose=False)
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    on_device = device.type == "cuda" if cfg.data.on_device is None else cfg.data.on_device  # as the data module
    if on_device and device.type != "cpu":
        for split in dm.splits.values():
            split.images, split.labels = split.images.to(device), split.labels.to(device)
    model = build_model(num_classes=dm.num_classes, **to_dict(cfg.model)).to(device)
    fmt = torch.channels_last if cfg.module.channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()
    run = torch.compile(model) if cfg.module.compile else model
    opt = build_optimizer(to_dict(cfg.optimizer), model)
    sched = build_scheduler(to_dict(cfg.scheduler), opt, total_steps=warmup + steps, max_epochs=1)
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
    autocast = (
        torch.autocast(device.type, dtype=AUTOCAST[precision]) if precision in AUTOCAST else contextlib.nullcontext()
    )
    batches = iter(dm.train_dataloader())
    marks: dict[int, float] = {}
    _sync(device)
    start = time.perf_counter()
    for i in range(warmup + steps):
        if deadline is not None and time.monotonic() > deadline:
            raise ArmStopped(f"stopped at the deadline after {i} of {warmup + steps} steps")
        images, labels, index = next(batches)
        images, labels, index = (t.to(device, non_blocking=True) for t in (images, labels, index))
        x, y = dm.transform_batch((images, labels, index), train=True, epoch=0)
        with autocast:
            loss = F.cross_entropy(run(x.contiguous(memory_format=fmt)), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if sched is not None:
            sched.step()
        if i in (0, warmup - 1, warmup + steps - 1):
            _sync(device)
            marks[i] = time.perf_counter()
    return _rates(marks, start, warmup, steps, cfg.data.batch_size)


def interleaved(arms: dict[str, Callable[[], dict[str, float]]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Every arm once per round, round after round: slow drifts of the machine hit all arms alike."""
    results: dict[str, dict[str, list[float]]] = {name: {} for name in arms}
    for _ in range(rounds):
        for name, fn in arms.items():
            for key, value in fn().items():
                results[name].setdefault(key, []).append(value)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="train.py overrides of the measured config")
    p.add_argument("--steps", type=int, default=30, help="timed steps per arm and round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones (compilation included)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--precision",
        nargs="+",
        default=None,
        help="precisions to measure (default: 32-true, and bf16-mixed where the CPU or GPU runs bf16 natively)",
    )
    p.add_argument("--compile", choices=("off", "on", "both"), default="off", help="module.compile in the arms")
    args = p.parse_args()
    base = compose([f"data.root={DATA_ROOT}", *args.overrides])
    auto, reason = resolve_precision("auto", base.trainer.accelerator)
    precisions = args.precision or (["32-true"] if auto == "32-true" else ["32-true", auto])
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    print(f"machine: {machine()}")
    print(f"trainer.precision=auto resolves to {auto}: {reason}\n")
    arms: dict[str, Callable[[], dict[str, float]]] = {}
    for precision in precisions:
        for compiled in compiles:
            cfg = compose([f"data.root={DATA_ROOT}", *args.overrides, f"trainer.precision={precision}"])
            cfg.module.compile = compiled
            tag = f"{precision}{', compiled' if compiled else ''}"
            arms[f"bare loop, {tag}"] = lambda cfg=cfg: bare_loop(cfg, args.warmup, args.steps)
            arms[f"train.py, {tag}"] = lambda cfg=cfg: train_py(cfg, args.warmup, args.steps)
    results = interleaved(arms, args.rounds)
    rows = []
    for name, r in results.items():
        rate = statistics.median(r["images_per_s"])
        bare = statistics.median(results[name.replace("train.py", "bare loop")]["images_per_s"])
        rows.append(
            (
                name,
                f"{rate:.0f}",
                f"{min(r['images_per_s']):.0f}-{max(r['images_per_s']):.0f}",
                f"{rate / bare:.3f}x",
                f"{r['first_step_s'][0]:.1f}",
            )
        )
    m, b = base.model, base.data.batch_size
    print(
        f"{m.name} ({', '.join(f'{k}={v}' for k, v in m.items() if k != 'name')}), batch {b}, "
        f"channels_last={base.module.channels_last}; {args.steps} timed steps after {args.warmup}, "
        f"median of {args.rounds} interleaved rounds\n"
    )
    print_table(["arm", "images/s", "range", "vs bare loop", "first step s (round 1)"], rows)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
