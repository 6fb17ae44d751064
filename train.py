"""Train a ResNet on CIFAR-10: `python train.py model=resnet18 stage=finetune`.

Composes the Hydra config in conf/, fits, tests the best checkpoint, and returns the
value that Hydra sweepers optimise. The logic lives in resnet_cifar.run.
"""

import hydra
from omegaconf import DictConfig

from resnet_cifar.cli import run_task
from resnet_cifar.preflight import check_output_dirs
from resnet_cifar.run import objective, train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run_task(train, cfg)
    return objective(cfg, metrics)


if __name__ == "__main__":
    check_output_dirs()  # before Hydra creates the run directory
    main()
