"""MixUp and CutMix of training batches (``data.mixup``, ``data.cutmix``), reproducible like the augmentation.

torchvision's ``transforms.v2.MixUp`` / ``CutMix`` do the mixing (one ``lambda`` per batch, each
image paired with its neighbour in the shuffled batch; with both, ``RandomChoice`` picks one per
batch) and return soft targets ``(B, num_classes)`` that sum to 1. Their random draws come from
torch's global CPU generator; here that generator is forked and seeded with a hash of
``(seed, epoch, batch index within the epoch)`` around each call, so the mixing of a batch is a
function of those three numbers only (like the crop and flip of an image: :mod:`.augment`): it
is the same on any device, and a resumed run, which replays the batches of its epoch, replays
their mixing too. The global generator (dropout, ...) is left exactly as it was.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from resnet_cifar.data.augment import random_bits

_STREAM = 5  # augment.py's per-image draws use streams 0-4


class BatchMix:
    """Mix a normalised float batch and turn its labels into soft targets.

    Args:
        num_classes: width of the soft targets.
        mixup: alpha of MixUp's Beta(alpha, alpha); 0 leaves it out.
        cutmix: alpha of CutMix's Beta(alpha, alpha); 0 leaves it out (at least one must be > 0).
        seed: seed of the draws (``data.seed``).
    """

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, seed: int = 0) -> None:
        options: list[v2.Transform] = []
        if mixup > 0:
            options.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix > 0:
            options.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        if not options:
            raise ValueError("BatchMix needs mixup > 0 or cutmix > 0")
        self.transform = options[0] if len(options) == 1 else v2.RandomChoice(options)
        self.seed = seed

    def batch_seed(self, epoch: int, batch: int) -> int:
        return int(random_bits(torch.tensor([batch]), self.seed, epoch, _STREAM)[0])

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, epoch: int, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mixed images, soft targets)`` of batch number ``batch`` (0-based, within the epoch) of ``epoch``."""
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: torchvision draws there
            torch.default_generator.manual_seed(self.batch_seed(epoch, batch))
            return self.transform(images, labels)
