"""Train and fine-tune ResNets on CIFAR-10 with PyTorch Lightning and Hydra."""

from pathlib import Path

__version__ = "0.1.0"

# The Hydra configs ship inside the package, so the console commands work after `pip install .`.
CONFIG_DIR = Path(__file__).resolve().parent / "conf"
