"""Evaluate a checkpoint on the CIFAR-10 test set: `python eval.py ckpt_path=...` (= `resnet-cifar-eval ...`).

A thin wrapper for a checkout: the command, its configs and its logic live in the package
(resnet_cifar.cli, resnet_cifar/conf).
"""

from resnet_cifar.cli import evaluate

if __name__ == "__main__":
    evaluate()
