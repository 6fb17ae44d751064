"""Evaluation samplers for multi-process runs: every image on exactly one rank.

Lightning's default for val/test under DDP is a ``DistributedSampler``, which pads the split
with repeated images until it divides by the number of processes: accuracy would then be
computed on a few images twice and differ from a single-process evaluation. Here each rank
gets ``indices[rank::world_size]`` (ranks may differ by one image); the torchmetrics states
are sums, so their sync gives exactly the single-process numbers.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, Sampler

from resnet_cifar.errors import ConfigError


def eval_sampler(dataset: Dataset, trainer: Any | None) -> Sampler | None:
    """An un-padded shard of ``dataset`` for this rank, or ``None`` (sequential) in one process."""
    world_size = getattr(trainer, "world_size", 1) if trainer is not None else 1
    if world_size <= 1:
        return None
    if len(dataset) < world_size:
        raise ConfigError(
            f"an evaluation split has {len(dataset)} images, fewer than the {world_size} processes; "
            "use fewer trainer.devices or a larger split"
        )
    return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=trainer.global_rank, shuffle=False)
