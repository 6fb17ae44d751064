"""Freeze schedules (``stage=scratch | linear_probe | finetune``).

The schedule is a pure function of the epoch: the optimizer is built once, up front,
with separate parameter groups (and learning rates) for the head and the backbone, and
the schedule only decides whether the backbone runs with gradients. Nothing is added to
the optimizer mid-run, so checkpoint resume, DDP and every LR scheduler see the same
optimizer from the first step to the last.
"""

from __future__ import annotations

from dataclasses import dataclass

from resnet_cifar.errors import ConfigError

STAGES = ("scratch", "linear_probe", "finetune")


@dataclass(frozen=True)
class FreezeSchedule:
    """Which parts train when.

    - ``scratch``: everything trains from the first step.
    - ``linear_probe``: the backbone is frozen for the whole run (weights and batch-norm
      statistics); only the head trains.
    - ``finetune``: the head trains alone for ``unfreeze_at_epoch`` epochs, then the
      backbone joins at ``backbone_lr_ratio`` times the head's learning rate.
    """

    name: str = "scratch"
    pretrained: bool = False
    unfreeze_at_epoch: int = 0
    backbone_lr_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in STAGES:
            raise ConfigError(f"stage {self.name!r} is unknown; choose one of {', '.join(STAGES)}")
        if not isinstance(self.unfreeze_at_epoch, int) or self.unfreeze_at_epoch < 0:
            raise ConfigError(f"stage.unfreeze_at_epoch={self.unfreeze_at_epoch!r} must be an integer >= 0")
        if not self.backbone_lr_ratio > 0:
            raise ConfigError(f"stage.backbone_lr_ratio={self.backbone_lr_ratio!r} must be > 0")

    @property
    def backbone_in_optimizer(self) -> bool:
        return self.name != "linear_probe"

    def backbone_trainable(self, epoch: int) -> bool:
        if self.name == "scratch":
            return True
        if self.name == "linear_probe":
            return False
        return epoch >= self.unfreeze_at_epoch

    def check_epochs(self, max_epochs: int | None) -> None:
        """``finetune`` must unfreeze before training ends."""
        if self.name == "finetune" and max_epochs and max_epochs > 0 and self.unfreeze_at_epoch >= max_epochs:
            raise ConfigError(
                f"stage.unfreeze_at_epoch={self.unfreeze_at_epoch} must be < trainer.max_epochs={max_epochs}, "
                "or the backbone never trains (use stage=linear_probe for that)"
            )
