"""CIFAR-10: reading, splits, batched augmentation and the LightningDataModule."""

from resnet_cifar.data.datamodule import CIFAR10DataModule

__all__ = ["CIFAR10DataModule"]
