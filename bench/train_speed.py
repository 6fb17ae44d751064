"""Benchmark 1: steady-state training images/s of train.py's default path against a plain PyTorch loop.

Every arm trains ResNet-20 (batch 128, SGD Nesterov, the tensor data path with crop + flip) on the
real CIFAR-10 training split. The arms run in interleaved rounds; each round times ``--steps``
steps after ``--warmup`` untimed ones, and the table gives the median images/s over the rounds and
its ratio to the reference, a plain eager PyTorch loop in NCHW fp32:

- plain loop, NCHW fp32 (the reference) / channels_last / channels_last + torch.compile /
  bf16 autocast (CPU only: what it does without AMX);
- ``Trainer.fit`` with the module options of ``conf/train.yaml`` (what ``python train.py`` runs),
  and the same with ``module.compile=true`` (compiled afresh in each round, inside the warm-up steps).

Compilation is timed separately (the first call of the compiled model, forward and backward).

    RESNET_CIFAR_DATA=<dir holding cifar-10-batches-py> python bench/train_speed.py
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _common import DATA_ROOT, machine, median, print_table
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from resnet_cifar import CONFIG_DIR
from resnet_cifar.data.datamodule import CIFAR10DataModule
from resnet_cifar.models.factory import build_model
from resnet_cifar.training.module import ImageClassifier

BATCH = 128
CONF_DIR = str(CONFIG_DIR)


def default_module_options() -> dict:
    """``module:`` of the composed default config (channels_last, compile, ...)."""
    with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/job_logging=none"], return_hydra_config=False)
    return OmegaConf.to_container(cfg.module, resolve=True)


class PlainLoop:
    """A 20-line training loop: the model, SGD, cross-entropy, nothing else."""

    def __init__(self, dm: CIFAR10DataModule, channels_last: bool, compile: bool, bf16: bool) -> None:
        torch.manual_seed(0)
        self.model = build_model(name="resnet20", num_classes=10)
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.fmt).train()
        self.run = torch.compile(self.model) if compile else self.model
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self.dm, self.bf16 = dm, bf16
        self.batches = iter(dm.train_dataloader())
        self.compile_s = self.step() if compile else None  # first call: tracing + code generation

    def step(self) -> float:
        t = time.perf_counter()
        try:
            batch = next(self.batches)
        except StopIteration:
            self.batches = iter(self.dm.train_dataloader())
            batch = next(self.batches)
        x, y = self.dm.transform_batch(batch, train=True, epoch=0)
        x = x.contiguous(memory_format=self.fmt)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(self.run(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t

    def images_per_s(self, warmup: int, steps: int) -> float:
        for _ in range(warmup):
            self.step()
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        return steps * BATCH / (time.perf_counter() - t)


class _BatchClock(pl.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(time.perf_counter())


def trainer_fit(dm: CIFAR10DataModule, options: dict, warmup: int, steps: int) -> float:
    """``Trainer.fit`` of train.py's module; images/s over the batches after ``warmup``."""
    torch.manual_seed(0)
    module = ImageClassifier(
        model={"name": "resnet20"},
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        scheduler={"name": "none"},
        **options,
    )
    clock = _BatchClock()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=warmup + steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=dm)
    timed = clock.ends[warmup - 1 :]
    return (len(timed) - 1) * BATCH / (timed[-1] - timed[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per arm and round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each timing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile arms")
    p.add_argument("--no-bf16", action="store_true", help="leave out the bf16 autocast arm")
    args = p.parse_args()
    print(f"machine: {machine()}\n")
    dm = CIFAR10DataModule(root=DATA_ROOT, download=False, batch_size=BATCH, seed=0)
    dm.setup("fit")
    options = default_module_options()
    options = {k: options[k] for k in ("channels_last", "compile")}
    loops = {
        "plain loop, NCHW fp32 (reference)": PlainLoop(dm, channels_last=False, compile=False, bf16=False),
        "plain loop, channels_last": PlainLoop(dm, channels_last=True, compile=False, bf16=False),
    }
    if not args.no_bf16:
        loops["plain loop, NCHW, bf16 autocast"] = PlainLoop(dm, channels_last=False, compile=False, bf16=True)
    if not args.no_compile:
        loops["plain loop, channels_last + torch.compile"] = PlainLoop(dm, channels_last=True, compile=True, bf16=False)
    # bf16 autocast without AMX/AVX512-BF16 is ~10x slower on a CPU: fewer steps for it
    steps = {k: max(3, args.steps // 6) if lp.bf16 else args.steps for k, lp in loops.items()}
    arms: dict[str, Callable[[], float]] = {
        k: (lambda k=k, lp=lp: lp.images_per_s(min(args.warmup, steps[k]), steps[k])) for k, lp in loops.items()
    }
    fit_name = f"train.py default: Trainer.fit, {', '.join(f'{k}={v}' for k, v in options.items())}"
    arms[fit_name] = lambda: trainer_fit(dm, options, args.warmup, args.steps)
    if not args.no_compile and not options["compile"]:  # the same with module.compile=true
        arms["train.py with module.compile=true"] = lambda: trainer_fit(
            dm, {**options, "compile": True}, args.warmup, args.steps
        )
    rates: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.rounds):
        for name, fn in arms.items():
            rates[name].append(fn())
    ref = median(rates["plain loop, NCHW fp32 (reference)"])
    rows = [
        (name, f"{median(r):.0f}", f"{min(r):.0f}-{max(r):.0f}", f"{median(r) / ref:.2f}x") for name, r in rates.items()
    ]
    print(
        f"ResNet-20, batch {BATCH}, {args.steps} timed steps (bf16: {max(3, args.steps // 6)}) after "
        f"{args.warmup} warm-up steps, "
        f"median of {args.rounds} interleaved rounds\n"
    )
    print_table(["training path", "images/s", "range", "vs reference"], rows)
    compiled = loops.get("plain loop, channels_last + torch.compile")
    if compiled is not None:
        print(f"\ntorch.compile: first step (compilation) {compiled.compile_s:.0f} s")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
