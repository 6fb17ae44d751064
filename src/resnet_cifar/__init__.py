"""Train and fine-tune ResNets on CIFAR-10 with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
