"""Freeze schedules (``stage=scratch | linear_probe | finetune``).

The schedule is a pure function of the epoch: the optimizer is built once, up front,
with separate parameter groups (and learning rates) for the head and the backbone, and
the schedule only decides whether the backbone runs with gradients. Nothing is added to
the optimizer mid-run, so checkpoint resume, DDP and every LR scheduler see the same
optimizer from the first step to the last.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("scratch", "linear_probe", "finetune")


@dataclass(frozen=True)
class FreezeSchedule:
    """Which parts train when.

    - ``scratch``: everything trains from the first step.
    - ``linear_probe``: the backbone is frozen for the whole run (weights and batch-norm
      statistics); only the head trains.
    - ``finetune``: the head trains alone for ``unfreeze_at_epoch`` epochs, then the
      backbone joins at ``backbone_lr_ratio`` times the head's learning rate; with
      ``backbone_warmup_epochs`` > 0 the backbone's rate ramps up linearly from 0 over that
      many epochs from the unfreeze point (see :class:`~resnet_cifar.training.optim.BackboneWarmup`).
    """

    name: str = "scratch"
    pretrained: bool = False
    unfreeze_at_epoch: int = 0
    backbone_lr_ratio: float = 1.0
    backbone_warmup_epochs: float = 0.0

    @property
    def backbone_in_optimizer(self) -> bool:
        return self.name != "linear_probe"

    def backbone_trainable(self, epoch: int) -> bool:
        if self.name == "scratch":
            return True
        if self.name == "linear_probe":
            return False
        return epoch >= self.unfreeze_at_epoch
