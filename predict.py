"""Classify PNG/JPEG images: `python predict.py ckpt_path=... inputs=<image or folder>` (= `resnet-cifar-predict ...`).

A thin wrapper for a checkout: the command and its logic live in the package (resnet_cifar.cli),
its configs in conf/ (shipped inside the package by pip install).
"""

from resnet_cifar.cli import predict

if __name__ == "__main__":
    predict()
