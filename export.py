"""Export a checkpoint to ONNX, torch.export and safetensors: `python export.py ckpt_path=...`
(= `resnet-cifar-export ...`).

A thin wrapper for a checkout: the command and its logic live in the package (resnet_cifar.cli),
its configs in conf/ (shipped inside the package by pip install).
"""

from resnet_cifar.cli import export

if __name__ == "__main__":
    export()
