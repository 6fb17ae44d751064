"""Helpers shared by the tests: the synthetic CIFAR-10, composed configs, the scripts as a user runs them.

A plain module (``tests`` is on pytest's ``pythonpath``); the fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from resnet_cifar import CONFIG_DIR
from resnet_cifar.data.cifar10 import Split

REPO = Path(__file__).resolve().parents[1]
CONF = CONFIG_DIR
# Resolved once against the directory pytest was started from, and exported so that the
# notebooks and scripts the tests start in other working directories find the same data.
REAL_DATA = Path(os.environ.get("RESNET_CIFAR_DATA", REPO.parent / "shared" / "data" / "cifar10")).resolve()
os.environ["RESNET_CIFAR_DATA"] = str(REAL_DATA)

N_TRAIN, N_TEST = 500, 100


def import_extra(module: str, extra: str):
    """``pytest.importorskip(module)``, except under ``CI=true``, where a missing optional group fails the
    test (as the real-data tests do): CI installs ``[dev]``, so a skip there would hide a broken install."""
    import importlib

    import pytest

    if not os.environ.get("CI"):
        return pytest.importorskip(module)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{module} is missing under CI=true ({e}): pip install 'resnet-cifar[{extra}]'", pytrace=False)


def synthetic_split(n: int, seed: int) -> Split:
    """Images whose class is visible (a class-specific colour and bright quadrant) under noise.

    The class colours are the same in every split (a fixed palette); ``seed`` draws the labels'
    order and the noise. So training on one split and testing on another measures learning.
    """
    colours = torch.rand(10, 3, 1, 1, generator=torch.Generator().manual_seed(2024)) * 160 + 40
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    images = colours[labels] + torch.randn(n, 3, 32, 32, generator=g) * 30
    quad = labels % 4
    for q in range(4):
        sel = quad == q
        r, c = divmod(q, 2)
        images[sel, :, r * 16 : r * 16 + 16, c * 16 : c * 16 + 16] += 50
    return Split(images=images.clamp(0, 255).to(torch.uint8), labels=labels)


def synthetic_overrides(root: Path, precision: str | None = "32-true") -> list[str]:
    """Overrides for a fast run on the synthetic data set.

    ``precision``: fp32 by default, so that the tests' numbers do not depend on whether the CPU that
    runs them has bf16 instructions (``trainer.precision: auto``, tested on its own); None: ``auto``.
    Not compiled: ``module.compile`` (the default) costs tens of seconds per run; it is tested on its own.
    """
    return [
        *([f"trainer.precision={precision}"] if precision else []),
        "module.compile=false",
        f"data.root={root}",
        "data.strict_sizes=false",
        "data.val_size=100",
        "data.batch_size=50",
        "data.eval_batch_size=100",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "~callbacks.progress_bar",
        "~callbacks.model_summary",
    ]


def compose_cfg(overrides: list[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    """The composed config, with the run directory set (no Hydra runtime needed)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=[*overrides, f"paths.output_dir={output_dir}"])


def config_model(*overrides: str, num_classes: int = 10) -> torch.nn.Module:
    """The network ``python train.py <overrides>`` builds (``model=resnet20``: the default's shortcuts): a
    weights file the tests fine-tune from fits it whatever the defaults are."""
    from resnet_cifar.models.factory import build_model
    from resnet_cifar.plain import to_dict

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        model = to_dict(compose(config_name="train", overrides=list(overrides)).model)
    return build_model(num_classes=num_classes, **model)


def probes_env() -> dict[str, str]:
    """The environment of a ``train.py`` subprocess that may name the tests' probes (``probes.X`` callbacks):
    this checkout's package and ``tests/`` first on the path, the user's log folder left out."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    env.pop("RESNET_CIFAR_LOGS", None)
    return env


# A job that takes seconds: two training steps, one validation batch, no test (multiruns and searches).
TINY_JOB = [
    "module.compile=false",
    "scheduler=cosine",
    "scheduler.warmup_epochs=0",
    "++trainer.limit_train_batches=2",
    "++trainer.limit_val_batches=1",
    "++trainer.num_sanity_val_steps=0",
    "test=false",
]


def run_script(script: str, *overrides: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``train.py``/``eval.py`` as a user would, with this checkout's package first on the path."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HYDRA_FULL_ERROR": "0"}
    env.pop("RESNET_CIFAR_LOGS", None)
    return subprocess.run(
        [sys.executable, str(REPO / script), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_train(out_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """train.py in a subprocess with this run directory, the fault-injection callback importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={out_dir}"],
        cwd=out_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
