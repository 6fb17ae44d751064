"""Benchmark 2: framework overhead of ``Trainer.fit`` against a bare PyTorch loop.

Every arm trains the same model (ResNet-20) with the same optimizer and per-step LR schedule on
the same batches of the tensor data path (indexing, augmentation and normalisation included), for
``--steps`` batches of one epoch: a bare loop, a bare ``Trainer.fit``, and ``Trainer.fit`` with
each of train.py's additions (logger, LR monitor, checkpoints, progress bar) and with all of them.
Arms alternate round by round; the table gives the median wall-clock and CPU seconds over the
rounds and their ratio to the bare loop.

    RESNET_CIFAR_DATA=<dir holding cifar-10-batches-py> python bench/framework_overhead.py --steps 351 --repeats 1
    RESNET_CIFAR_DATA=<dir holding cifar-10-batches-py> python bench/framework_overhead.py --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import tempfile
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _common import DATA_ROOT, cpu_seconds, machine, median, print_table
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger

from resnet_cifar.data.datamodule import CIFAR10DataModule
from resnet_cifar.training.checkpointing import LastCheckpoint
from resnet_cifar.training.module import ImageClassifier

OPTIMIZER = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
SCHEDULER = {"name": "cosine", "warmup_epochs": 0.1}


def _module() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(model={"name": "resnet20"}, optimizer=OPTIMIZER, scheduler=SCHEDULER)


class _FakeTrainer:
    """What ``configure_optimizers`` reads from a Trainer, so the bare loop gets the same optimizer."""

    def __init__(self, steps: int) -> None:
        self.estimated_stepping_batches, self.max_epochs = steps, 1
        self.world_size, self.callbacks = 1, []  # LR scaling under DDP; the Timer of a time budget


def bare_loop(dm: CIFAR10DataModule, steps: int) -> None:
    module = _module()
    model = module.model
    module._trainer = _FakeTrainer(steps)  # only for configure_optimizers
    cfg = module.configure_optimizers()
    module._trainer = None
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    model.train()
    for i, batch in enumerate(dm.train_dataloader()):
        if i == steps:
            break
        x, y = dm.transform_batch(batch, train=True, epoch=0)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


# What train.py adds to a bare Trainer (conf/callbacks/default.yaml, conf/logger/tensorboard.yaml),
# one arm per addition so that the table says which costs what. The LR monitor needs a logger: its
# arm is TensorBoard + LR monitor (its own cost is that arm minus the TensorBoard arm).
ADDITIONS = {
    "TensorBoard logger": ("tb",),
    "TensorBoard + LR monitor": ("tb", "lr"),
    "checkpoints (best + last.ckpt)": ("ckpt",),
    "progress bar": ("bar",),
    "all of the above (train.py)": ("tb", "lr", "ckpt", "bar"),
}


def lightning_fit(dm: CIFAR10DataModule, steps: int, parts: tuple[str, ...]) -> None:
    module = _module()
    tmp = tempfile.TemporaryDirectory()
    callbacks: list = []
    if "ckpt" in parts:
        callbacks += [ModelCheckpoint(dirpath=tmp.name), LastCheckpoint(dirpath=tmp.name, every_n_minutes=10)]
    if "lr" in parts:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if "bar" in parts:
        callbacks.append(TQDMProgressBar(refresh_rate=20))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        log_every_n_steps=20,
        logger=TensorBoardLogger(tmp.name, name="tb") if "tb" in parts else False,
        enable_checkpointing="ckpt" in parts,
        enable_progress_bar="bar" in parts,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=dm)
    tmp.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="training batches (of one epoch)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"machine: {machine()}\n")
    dm = CIFAR10DataModule(root=DATA_ROOT, download=False, batch_size=args.batch_size, seed=0)
    dm.setup("fit")  # read once, outside the timing (fit's setup is then a no-op)
    runs = {
        "bare PyTorch loop": lambda: bare_loop(dm, args.steps),
        "Trainer.fit, no logger/checkpoint/progress bar": lambda: lightning_fit(dm, args.steps, ()),
    }
    for name, parts in ADDITIONS.items():
        runs[f"Trainer.fit + {name}"] = lambda parts=parts: lightning_fit(dm, args.steps, parts)
    bare_loop(dm, 2)  # warm-up: allocator, oneDNN primitives
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), cpu_seconds()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(cpu_seconds() - c0)
    base_w, base_c = median(wall["bare PyTorch loop"]), median(cpu["bare PyTorch loop"])
    rows = [
        (
            name,
            f"{median(wall[name]):.1f}",
            f"{min(wall[name]):.1f}-{max(wall[name]):.1f}",
            f"{median(wall[name]) / base_w:.3f}x",
            f"{median(cpu[name]):.1f}",
            f"{median(cpu[name]) / base_c:.3f}x",
        )
        for name in runs
    ]
    print(
        f"ResNet-20, batch {args.batch_size}, {args.steps} steps per run, median of {args.repeats} alternating runs\n"
    )
    print_table(["loop", "wall s", "range", "ratio (wall)", "CPU s", "ratio (CPU)"], rows)


if __name__ == "__main__":
    main()
