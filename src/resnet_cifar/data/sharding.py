"""Samplers for multi-process runs.

- Evaluation: every image on exactly one rank. Lightning's default for val/test under DDP is a
  ``DistributedSampler``, which pads the split with repeated images until it divides by the number
  of processes: accuracy would then be computed on a few images twice and differ from a
  single-process evaluation. Here each rank gets ``indices[rank::world_size]`` (ranks may differ by
  one image); the torchmetrics states are sums, so their sync gives exactly the single-process numbers.
- Training: the epoch's order (``EpochShuffle``) dealt out to the ranks in turn, not shuffled again.
  Lightning's own wrapper for the training loader is built with ``shuffle=True``, which permutes the
  order once more (its docstring says the flag has no effect; it has): step ``k`` of N processes with
  ``batch_size`` b then trains on other images than step ``k`` of one process with N * b. Dealt out in
  turn, it trains on the same ones, so DDP's steps are the single-process steps of the global batch.
"""

from __future__ import annotations

from typing import Any

from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
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


def train_sampler(sampler: Sampler, trainer: Any | None) -> Sampler:
    """``sampler`` in one process; under several, this rank's share of its order, every world_size-th index.

    A ``DistributedSampler`` already, so Lightning leaves it in place (and forwards ``set_epoch`` to
    ``sampler`` through it); padded like Lightning's, by repeating the first indices of the order.
    """
    world_size = getattr(trainer, "world_size", 1) if trainer is not None else 1
    if world_size <= 1:
        return sampler
    return DistributedSamplerWrapper(sampler, num_replicas=world_size, rank=trainer.global_rank, shuffle=False)
