"""Benchmark 1: augmented, normalised training images per second delivered to the model.

Every pipeline does the same augmentation (random 32x32 crop of the 4-pixel zero-padded image,
horizontal flip with p=1/2, per-sample; then uint8 -> float and normalisation), except the
torchvision.transforms.v2-on-a-batch row, which draws ONE crop and flip for the whole batch
(v2 transforms treat a batch as one image) and is listed only for its speed.

    RESNET_CIFAR_DATA=<dir holding cifar-10-batches-py> python bench/data_pipeline.py
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools

import torch
from _common import DATA_ROOT, machine, median, print_table, timed

from resnet_cifar.data.datamodule import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule


def _datamodule(loader: str, batch_size: int, num_workers: int = 0) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(
        root=DATA_ROOT, download=False, loader=loader, batch_size=batch_size, num_workers=num_workers, seed=0
    )
    dm.setup("fit")
    return dm


def _cycle(loader):
    """Batches forever (a new epoch of the loader when one ends)."""
    while True:
        yield from loader


def tensor_path(batch_size: int):
    dm = _datamodule("tensor", batch_size)
    batches = _cycle(dm.train_dataloader())

    def step() -> int:
        x, _ = dm.transform_batch(next(batches), train=True, epoch=0)
        return len(x)

    return step


def torchvision_path(batch_size: int, workers: int):
    dm = _datamodule("torchvision", batch_size, workers)
    batches = _cycle(dm.train_dataloader())
    next(batches)  # start the workers outside the timing

    def step() -> int:
        x, _, _ = next(batches)
        return len(x)

    return step


def kornia_path(batch_size: int):
    import kornia.augmentation as K

    dm = _datamodule("tensor", batch_size)
    batches = _cycle(dm.train_dataloader())
    aug = torch.nn.Sequential(
        K.RandomCrop((32, 32), padding=4),  # per-sample parameters (same_on_batch=False)
        K.RandomHorizontalFlip(),
        K.Normalize(torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)),
    )

    def step() -> int:
        images, _, _ = next(batches)
        with torch.no_grad():
            x = aug(images.float().div_(255))
        return len(x)

    return step


def v2_batched_path(batch_size: int):
    from torchvision.transforms import v2

    dm = _datamodule("tensor", batch_size)
    batches = _cycle(dm.train_dataloader())
    aug = v2.Compose(
        [
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(CIFAR10_MEAN), list(CIFAR10_STD)),
        ]
    )

    def step() -> int:
        images, _, _ = next(batches)
        return len(aug(images))

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--seconds", type=float, default=3.0, help="minimum seconds per measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--no-kornia", action="store_true")
    args = p.parse_args()
    print(f"machine: {machine()}\n")

    b = args.batch_size
    pipelines = {"tensor path: BatchAugment (ours, default)": (tensor_path(b), "yes")}
    for w in args.workers:
        pipelines[f"torchvision per-sample v2, {w} DataLoader workers"] = (torchvision_path(b, w), "yes")
    if args.no_kornia:
        pass
    elif importlib.util.find_spec("kornia") is None:
        print("kornia is not installed (not a dependency of this project): its row is left out\n")
    else:
        pipelines["kornia.augmentation on the uint8 batch"] = (kornia_path(b), "yes")
    pipelines["torchvision v2 on the whole batch"] = (v2_batched_path(b), "no: one crop per batch")

    wall: dict[str, list[float]] = {k: [] for k in pipelines}
    cpu: dict[str, list[float]] = {k: [] for k in pipelines}
    for _, name in itertools.product(range(args.repeats), pipelines):
        w, c = timed(pipelines[name][0], args.seconds)
        wall[name].append(w)
        cpu[name].append(c)
    base_name = f"torchvision per-sample v2, {max(args.workers)} DataLoader workers"
    base_w, base_c = median(wall[base_name]), median(cpu[base_name])
    rows = [
        (
            name,
            per_sample,
            f"{median(wall[name]):,.0f}",
            f"{min(wall[name]):,.0f}-{max(wall[name]):,.0f}",
            f"{median(wall[name]) / base_w:.1f}x",
            f"{median(cpu[name]):,.0f}",
            f"{median(cpu[name]) / base_c:.1f}x",
        )
        for name, (_, per_sample) in pipelines.items()
    ]
    print(f"batch {b}; median of {args.repeats} interleaved rounds of >= {args.seconds:.0f} s each\n")
    headers = [
        "pipeline",
        "per-sample random",
        "images/s (wall)",
        "range",
        "ratio (wall)",
        "images/CPU-s",
        "ratio (CPU)",
    ]
    print_table(headers, rows)


if __name__ == "__main__":
    main()
