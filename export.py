"""Export a checkpoint to ONNX, torch.export and safetensors, checked on real test images:
`python export.py ckpt_path=<run>/checkpoints/last.ckpt`."""

import hydra
from omegaconf import DictConfig

from resnet_cifar.cli import run_task
from resnet_cifar.export import export


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    run_task(export, cfg)


if __name__ == "__main__":
    main()
