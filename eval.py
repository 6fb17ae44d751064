"""Evaluate a checkpoint on the CIFAR-10 test set: `python eval.py ckpt_path=...`."""

import hydra
from omegaconf import DictConfig

from resnet_cifar.cli import run_task
from resnet_cifar.preflight import check_output_dirs
from resnet_cifar.run import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_task(evaluate, cfg)


if __name__ == "__main__":
    check_output_dirs()  # before Hydra creates the run directory
    main()
