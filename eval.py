"""Evaluate a checkpoint on the CIFAR-10 test set: `python eval.py ckpt_path=...` (= `resnet-cifar-eval ...`).

A thin wrapper for a checkout: the command and its logic live in the package (resnet_cifar.cli),
its configs in conf/ (shipped inside the package by pip install).
"""

from resnet_cifar.cli import evaluate

if __name__ == "__main__":
    evaluate()
