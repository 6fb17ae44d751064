"""Train and fine-tune ResNets on CIFAR-10 with PyTorch Lightning and Hydra."""

from pathlib import Path

__version__ = "0.1.0"

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT_CONF = _PACKAGE.parents[1] / "conf"  # <checkout>/src/resnet_cifar -> <checkout>/conf

# The Hydra configs: conf/ at the repository root, the one copy. A checkout (PYTHONPATH=src or an
# editable install) reads it there; a wheel ships it inside the package (pyproject.toml maps
# resnet_cifar.conf to conf/), so that the console commands work after `pip install .`. A path, not
# importlib.resources or Hydra's pkg://: setuptools' editable finder cannot import a mapped folder
# without __init__.py, and PYTHONPATH=src cannot see conf/ as part of the package at all.
CONFIG_DIR = _CHECKOUT_CONF if _PACKAGE.parent.name == "src" and _CHECKOUT_CONF.is_dir() else _PACKAGE / "conf"
