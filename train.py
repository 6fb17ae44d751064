"""Train a ResNet on CIFAR-10: `python train.py model=resnet18 stage=finetune`.

Composes the Hydra config in conf/, fits, tests the best checkpoint, and returns the
value that Hydra sweepers optimise. The logic lives in resnet_cifar.run.
"""

import hydra
from omegaconf import DictConfig

from resnet_cifar.cli import run_task
from resnet_cifar.preflight import check_output_dirs
from resnet_cifar.run import objective, train
from resnet_cifar.sweep import failed_objective, in_multirun


def train_and_score(cfg: DictConfig) -> float | None:
    return objective(cfg, train(cfg))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # In a sweep a failed job returns the worst value instead of stopping the others.
    return run_task(train_and_score, cfg, failed_value=failed_objective() if in_multirun() else None)


if __name__ == "__main__":
    check_output_dirs()  # before Hydra creates the run directory
    main()
