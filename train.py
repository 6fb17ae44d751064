"""Train a ResNet on CIFAR-10: `python train.py model=resnet18 stage=finetune` (= `resnet-cifar-train ...`).

A thin wrapper for a checkout: the command and its logic live in the package (resnet_cifar.cli),
its configs in conf/ (shipped inside the package by pip install).
"""

from resnet_cifar.cli import train

if __name__ == "__main__":
    train()
