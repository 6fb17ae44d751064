"""Classify PNG/JPEG images with a trained checkpoint:
`python predict.py ckpt_path=<run>/checkpoints/last.ckpt inputs=<image or folder>`."""

import hydra
from omegaconf import DictConfig

from resnet_cifar.cli import run_task
from resnet_cifar.inference import predict


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    run_task(predict, cfg)


if __name__ == "__main__":
    main()
