"""The config groups a user chooses from: only real options, no private bases.

The shared bases of the presets (``conf/_model_*.yaml``, ``conf/_pretrained_imagenet.yaml``,
``conf/_experiment_transfer*.yaml``) live at the root of ``conf/``, outside every group, so
``--help``, tab completion and ``experiment=glob(*)`` list only what a user may choose, while
the options that include them compose as before.
"""

from __future__ import annotations

import pytest
from helpers import CONF
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

GROUPS = ("model", "pretrained", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def base(name: str) -> dict:
    """A base file's own values (its defaults list left out)."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    cfg.pop("defaults", None)
    return cfg


def help_text() -> str:
    """What ``python train.py --help`` prints (Hydra's own help code and template), in-process."""
    from hydra._internal.utils import get_args_parser

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
        return GlobalHydra.instance().hydra.get_help(cfg.hydra.help, cfg, get_args_parser(), resolve=False)


def test_help_lists_only_the_public_options():
    groups_part = help_text().split("== Config ==")[0]
    listed = {line.split(": ")[0]: line.split(": ")[1].split(", ") for line in groups_part.splitlines() if ": " in line}
    for group in GROUPS:
        assert sorted(listed[group]) == options(group), group
    listed_options = {o for opts in listed.values() for o in opts}
    assert not {o for o in listed_options if o.startswith("_")}
    assert "resnet20" in listed["model"] and "stage" in listed


def test_glob_of_the_experiment_group_sweeps_only_public_presets():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        (override,) = OverridesParser.create(config_loader=loader).parse_overrides(["experiment=glob(*)"])
        swept = list(override.sweep_string_iterator())
        assert sorted(loader.get_group_options("model")) == options("model")
    assert sorted(swept) == options("experiment") and "cpu_30min" in swept
    assert not any(s.startswith("_") for s in swept)


@pytest.fixture(scope="module")
def composed():
    """``compose(overrides)`` for train.yaml, with one Hydra initialisation for the module."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda *overrides: compose("train", overrides=list(overrides))


def test_every_model_composes_its_base(composed):
    cifar, torchvision = base("_model_cifar"), base("_model_torchvision")
    for name in options("model"):
        own = base(f"model/{name}")
        if name == "resnet9":  # its own options, no base
            expected = {}
        elif name == "airbench94":  # ResNet-9's options, some of them changed
            expected = dict(base("model/resnet9"))
        elif name in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110"):
            expected = dict(cifar)
        else:
            expected = dict(torchvision)
        expected.update(own)
        assert OmegaConf.to_container(composed(f"model={name}").model) == expected, name
    # the values of the bases, as they were before the move
    assert cifar["shortcut"] == "A" and cifar["block"] == "basic" and torchvision["cifar_stem"] is False
    assert torchvision["pretrained"] == "${stage.pretrained}" and torchvision["weights"] == "DEFAULT"


def test_imagenet_inputs_come_with_the_pretrained_stages(composed):
    imagenet = base("_pretrained_imagenet")["data"]
    scratch_lr = base("optimizer/sgd")["lr"]  # the default recipe's (from scratch); linear_probe keeps it
    for stage, lr in (("finetune", 0.01), ("linear_probe", scratch_lr)):
        cfg = composed("model=resnet34", f"stage={stage}")
        assert {k: OmegaConf.to_object(cfg.data)[k] for k in imagenet} == imagenet and cfg.optimizer.lr == lr, stage
    cfg = composed("model=resnet34", "stage=scratch")
    assert cfg.data.image_size == 32 and list(cfg.data.mean) != imagenet["mean"] and cfg.optimizer.lr == scratch_lr


@pytest.mark.parametrize(
    ("preset", "model", "stage", "expected"),
    [
        ("resnet20_short", "resnet20", "scratch", {"task_name": "resnet20_short", "model.shortcut": "B"}),
        ("cpu_30min", "resnet9", "scratch", {"model.widths": [24, 128, 384, 384], "scheduler.progress": "time"}),
        ("cpu_10min", "resnet9", "scratch", {"model.stem": "whiten", "trainer.max_time": "00:00:10:00"}),
        ("cpu_60min", "resnet9", "scratch", {"model.widths": [64, 128, 256, 512], "trainer.max_time": "00:00:57:00"}),
        ("fast94", "resnet9", "scratch", {"trainer.max_epochs": 10, "optimizer.name": "muon", "model.stem": "whiten"}),
        (
            "resnet9_page",
            "resnet9",
            "scratch",
            {"trainer.max_epochs": 10, "label_smoothing": 0.2, "callbacks.ema.decay": 0.951},
        ),
        ("resnet20_he2016", "resnet20", "scratch", {"model.shortcut": "A", "trainer.max_epochs": 182}),
        ("resnet18_finetune", "resnet18", "finetune", {"data.image_size": 64, "optimizer.lr": 0.01}),
        ("resnet18_linear_probe", "resnet18", "linear_probe", {"data.image_size": 64, "optimizer.lr": 0.1}),
        ("usual_resnet18", "resnet18", "scratch", {"optimizer.lr": 0.001, "data.image_size": 32}),
        ("transfer_source", "resnet20", "scratch", {"model.load_head": True, "model.shortcut": "B"}),
        ("transfer_scratch", "resnet20", "scratch", {"task_name": "transfer_scratch", "model.load_head": False}),
        ("transfer_linear_probe", "resnet20", "linear_probe", {"model.load_head": False}),
        ("transfer_finetune", "resnet20", "finetune", {"task_name": "transfer_finetune", "model.load_head": False}),
    ],
)
def test_each_preset_composes_as_before(composed, preset, model, stage, expected):
    cfg = composed(f"experiment={preset}", "paths.output_dir=unused")
    assert cfg.model.name == model and cfg.stage.name == stage
    for key, value in expected.items():
        assert OmegaConf.select(cfg, key) == value, key
    if preset.startswith("transfer_"):  # the shared base (conf/_experiment_transfer.yaml) arrives whole
        shared = base("_experiment_transfer")
        assert OmegaConf.to_container(cfg.transfer) == shared["transfer"]
        side = "source" if preset == "transfer_source" else "target"
        assert list(cfg.data.classes) == shared["transfer"][f"{side}_classes"]


@pytest.mark.parametrize(("override", "name"), [([], r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d"), (["run_name=first"], "first")])
def test_the_run_directory_is_named_by_run_name_or_the_start_time(override, name):
    """run_name: null (the default) names the run by its start time; an unnamed run in a directory called
    'None' would share it with every other unnamed run (and ckpt_path=last would resume a stranger's)."""
    import re

    import resnet_cifar.cli  # noqa: F401 - registers the resolver the run directory uses

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=override, return_hydra_config=True)
    run_dir = OmegaConf.select(cfg, "hydra.run.dir")
    assert re.fullmatch(rf"logs/train/runs/{name}", run_dir), run_dir
