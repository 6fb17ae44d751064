"""Classify PNG/JPEG images: `python predict.py ckpt_path=... inputs=<image or folder>` (= `resnet-cifar-predict ...`).

A thin wrapper for a checkout: the command, its configs and its logic live in the package
(resnet_cifar.cli, resnet_cifar/conf).
"""

from resnet_cifar.cli import predict

if __name__ == "__main__":
    predict()
