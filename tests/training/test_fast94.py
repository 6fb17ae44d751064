"""The ResNet-9 recipes: experiment=resnet9_page (Page's) with the optimizer option it brings, the 64x LR of the
batch-norm parameters, and experiment=fast94 (airbench94's)."""

from __future__ import annotations

import pytest
import torch
from helpers import compose_cfg, synthetic_overrides
from omegaconf import OmegaConf
from torch import nn

from resnet_cifar.config import validate_train_config
from resnet_cifar.errors import ConfigError
from resnet_cifar.models import build_model
from resnet_cifar.run import train
from resnet_cifar.training.optim import build_optimizer, build_scheduler

TINY = [8, 16, 32, 64]


def batch_norm_params(model: nn.Module, weights: bool = True) -> set[int]:
    return {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
        for name, p in m.named_parameters()
        if weights or name == "bias"
    }


@pytest.mark.parametrize("no_decay_bn_bias", [True, False])
def test_bn_lr_ratio_puts_batchnorm_parameters_in_groups_of_their_own(no_decay_bn_bias):
    model = build_model("resnet9", widths=TINY, bn_scale_trainable=False)
    cfg = {"name": "sgd", "lr": 0.4, "weight_decay": 5e-4, "no_decay_bn_bias": no_decay_bn_bias, "bn_lr_ratio": 64}
    groups = {g["name"]: g for g in build_optimizer(cfg, model, backbone_lr_ratio=0.5).param_groups}
    bn = groups["backbone_bn"]
    assert {id(p) for p in bn["params"]} == batch_norm_params(model, weights=False)  # frozen scales: biases only
    assert bn["lr"] == pytest.approx(0.4 * 0.5 * 64)
    # the decay per step (lr x weight decay) of the batch-norm biases is that of the convolutions
    expected_wd = 0.0 if no_decay_bn_bias else 5e-4 / 64
    assert bn["weight_decay"] == pytest.approx(expected_wd)
    assert groups["backbone"]["lr"] == pytest.approx(0.2) and groups["head"]["lr"] == pytest.approx(0.4)
    assert "head_bn" not in groups  # the head has no batch norm; its bias stays with the head
    every = [id(p) for g in groups.values() for p in g["params"]]
    assert len(every) == len(set(every)) == sum(p.requires_grad for p in model.parameters())
    # OneCycle peaks at each group's own LR
    sched = build_scheduler(
        {"name": "onecycle", "pct_start": 0.5, "div_factor": 10}, build_optimizer(cfg, model), 10, 1
    )
    assert {g["name"]: g["max_lr"] for g in sched.optimizer.param_groups}["backbone_bn"] == pytest.approx(0.4 * 64)


def test_bn_lr_ratio_one_keeps_the_groups_as_they_were(tmp_path):
    model = build_model("resnet20")
    cfg = {"name": "sgd", "lr": 0.1, "weight_decay": 5e-4}
    names = [g["name"] for g in build_optimizer({**cfg, "bn_lr_ratio": 1.0}, model).param_groups]
    assert names == ["head", "head_no_decay", "backbone", "backbone_no_decay"]
    with pytest.raises(ConfigError, match=r"optimizer.bn_lr_ratio=0: expected a number in \(0, 1000\]"):
        validate_train_config(compose_cfg(["optimizer.bn_lr_ratio=0"], tmp_path))


def test_resnet9_page_composes_pages_recipe(tmp_path):
    cfg = compose_cfg(["experiment=resnet9_page"], tmp_path)
    validate_train_config(cfg)
    assert cfg.model.name == "resnet9" and cfg.trainer.max_epochs <= 10 and cfg.module.tta_flip
    assert cfg.callbacks.ema.decay == pytest.approx(0.99**5, abs=1e-3) and "model_checkpoint" in cfg.callbacks
    assert (cfg.data.batch_size, cfg.label_smoothing, cfg.optimizer.bn_lr_ratio) == (512, 0.2, 64)
    assert not cfg.model.bn_scale_trainable and cfg.model.activation == "celu"
    with pytest.raises(ConfigError, match="alternating_flip needs the batched augmentation"):
        validate_train_config(
            compose_cfg(
                ["experiment=resnet9_page", "data.augment.alternating_flip=true", "data.loader=torchvision"], tmp_path
            )
        )


def test_resnet9_page_trains_end_to_end_on_synthetic_data(synthetic_root, tmp_path):
    """The whole recipe (narrow widths, 2 short epochs): EMA, frozen scales, 64x BN LR, TTA, mixing on."""
    overrides = [
        "experiment=resnet9_page",
        *synthetic_overrides(synthetic_root),
        f"model.widths=[{','.join(map(str, TINY))}]",
        "optimizer.lr=0.2",  # the synthetic set has 400 images: 8 steps of 50
        "callbacks.ema.update_every_n_steps=1",
        "callbacks.ema.decay=0.8",
        "data.augment.alternating_flip=true",
        "data.cutmix=1.0",
        "logger=none",
    ]
    metrics = train(compose_cfg(overrides, tmp_path))
    assert metrics["epochs"] == 2 and metrics["test/acc"] > 0.3  # chance: 0.1
    ckpt = torch.load(metrics["best_ckpt"], weights_only=True)
    assert "current_model_state" in ckpt  # the EMA callback ran
    bn_scales = [v for k, v in ckpt["state_dict"].items() if k.endswith("bn.weight")]
    assert bn_scales and all(torch.equal(v, torch.ones_like(v)) for v in bn_scales)
    hp = ckpt["hyper_parameters"]
    assert OmegaConf.create(hp["model"]).widths == TINY and hp["optimizer"]["bn_lr_ratio"] == 64


def test_fast94_composes_airbench94s_recipe(tmp_path):
    cfg = compose_cfg(["experiment=fast94"], tmp_path)
    validate_train_config(cfg)
    model = cfg.model
    assert (model.name, model.stem, list(model.widths)) == ("resnet9", "whiten", [24, 64, 256, 256])
    assert list(model.tails) == ["conv"] * 3 and model.activation == "gelu" and not model.bn_scale_trainable
    assert (cfg.optimizer.name, cfg.scheduler.name, cfg.scheduler.warmup_epochs) == ("muon", "linear", 0)
    assert cfg.trainer.max_epochs <= 10 and cfg.label_smoothing == 0.2
    assert cfg.module.tta_flip and cfg.module.tta_translate == 1
    augment = cfg.data.augment
    assert (augment.crop_padding, augment.padding_mode, augment.alternating_flip) == (2, "reflect", True)
    for preset, budget in (("cpu_10min", "00:00:10:00"), ("cpu_30min", "00:00:30:00")):
        timed = compose_cfg([f"experiment={preset}"], tmp_path)
        validate_train_config(timed)
        assert timed.scheduler.progress == "time" and timed.trainer.max_time == budget
        assert timed.budget.whole_command and timed.module.tta_val == "last"  # the whole command, measured reserve
        assert timed.trainer.max_epochs == -1 and timed.optimizer == cfg.optimizer
        widths = [24, 128, 384, 384] if preset == "cpu_30min" else list(cfg.model.widths)  # airbench95's, airbench94's
        assert {**timed.model, "widths": widths} == {**cfg.model, "widths": widths} and timed.model.widths == widths
