"""Train a ResNet on CIFAR-10: `python train.py model=resnet18 stage=finetune` (= `resnet-cifar-train ...`).

A thin wrapper for a checkout: the command, its configs and its logic live in the package
(resnet_cifar.cli, resnet_cifar/conf).
"""

from resnet_cifar.cli import train

if __name__ == "__main__":
    train()
