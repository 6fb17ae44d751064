"""Every option of every config group, composed: ``python compose_all.py`` prints them as JSON.

Imported by the checkout's tests and run by the interpreter of an installed package
(tests/test_commands.py), so that both list the options and compose them the same way: a config
missing from the wheel, or shipped different from ``conf/``, shows as a difference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ENTRY_CONFIGS = ("train", "eval", "predict", "export")


def choices(conf: Path) -> dict[str, list[str]]:
    """``group/option`` -> the overrides of ``train`` that choose it, for every option under ``conf``."""
    out = {}
    for path in sorted(conf.rglob("[!_]*.yaml")):
        group, option = path.parent.relative_to(conf).as_posix(), path.stem
        if group == ".":
            continue  # an entry config (train.yaml, ...)
        if group == "pretrained":  # chosen by a torchvision model with that stage, not by hand
            out[f"{group}/{option}"] = ["model=resnet18", f"stage={option.removeprefix('imagenet_')}"]
        else:
            out[f"{group}/{option}"] = [f"{group}={option}"]
    return out


def compose_all(conf: Path) -> dict[str, Any]:
    """The unresolved composed config of each entry config and of each option's ``train``.

    Hydra's own part is left out (it records the run's paths and sources), except what the
    project's configs put there: the launcher, the sweeper and the callbacks.
    """
    out = {}
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        runs = {name: (name, []) for name in ENTRY_CONFIGS}
        runs.update({choice: ("train", overrides) for choice, overrides in choices(conf).items()})
        for key, (name, overrides) in runs.items():
            cfg = compose(name, overrides=overrides, return_hydra_config=True)
            own = OmegaConf.to_container(cfg)  # unresolved: ${...} and ??? as written
            hydra = own.pop("hydra")
            own["hydra"] = {k: hydra[k] for k in ("launcher", "sweeper", "callbacks")}
            out[key] = own
    return out


if __name__ == "__main__":
    from resnet_cifar import CONFIG_DIR

    print(json.dumps({"config_dir": str(CONFIG_DIR), "composed": compose_all(CONFIG_DIR)}))
