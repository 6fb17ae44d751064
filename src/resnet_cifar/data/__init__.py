"""CIFAR-10: reading, splits, batched augmentation and the LightningDataModule (``datamodule``).

Nothing is imported here: the config check imports ``data.loader`` and must not pay for
Lightning's import (~6 s on a 2-core CPU) before it can reject a bad value.
"""
