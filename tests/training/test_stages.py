"""Freeze schedules: what trains in each epoch, also across a checkpoint resume."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from helpers import compose_cfg

from resnet_cifar.config import validate_train_config
from resnet_cifar.data.datamodule import CIFAR10DataModule
from resnet_cifar.errors import ConfigError
from resnet_cifar.models import build_model
from resnet_cifar.stages import FreezeSchedule
from resnet_cifar.training.module import ImageClassifier
from resnet_cifar.training.optim import build_optimizer, build_scheduler, with_backbone_warmup

SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
COSINE = {"name": "cosine", "warmup_epochs": 0}


class RecordGrads(pl.Callback):
    """Per epoch: the parameter prefixes that received gradients; per step: each group's LR."""

    def __init__(self) -> None:
        self.with_grad: dict[int, set[str]] = {}
        self.lrs: dict[str, list[float]] = {}

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        parts = {n.split(".")[1] for n, p in module.named_parameters() if p.grad is not None}
        self.with_grad.setdefault(trainer.current_epoch, set()).update(parts)
        for g in optimizer.param_groups:
            self.lrs.setdefault(g["name"], []).append(g["lr"])


def parts_per_epoch(rec: RecordGrads) -> dict[int, set[str]]:
    """'head' or 'backbone' per epoch (from names like model.backbone.stem.0.weight)."""
    return {e: {p for p in parts if p in ("head", "backbone")} for e, parts in rec.with_grad.items()}


@pytest.fixture
def source_weights(tmp_path):
    path = tmp_path / "source.pt"
    torch.save(build_model("resnet20", num_classes=10).state_dict(), path)
    return str(path)


def fit(root, stage, weights_path, max_epochs, tmp_path, ckpt_path=None, every_epoch=False, scheduler=COSINE):
    dm = CIFAR10DataModule(root=str(root), download=False, val_size=100, batch_size=100, strict_sizes=False)
    module = ImageClassifier(
        model={"name": "resnet20", "weights_path": weights_path},
        optimizer=SGD,
        scheduler=scheduler,
        stage=stage,
    )
    rec = RecordGrads()
    callbacks = [rec]
    if every_epoch:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}"))
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=every_epoch,
        callbacks=callbacks,
        limit_train_batches=2,
        limit_val_batches=1,
        default_root_dir=tmp_path,
    )
    before = {k: v.clone() for k, v in module.model.backbone.state_dict().items()}
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    return module, rec, before, trainer


def test_scratch_trains_everything_from_the_start(synthetic_root, tmp_path):
    _, rec, *_ = fit(synthetic_root, {"name": "scratch"}, None, 2, tmp_path)
    assert parts_per_epoch(rec) == {0: {"head", "backbone"}, 1: {"head", "backbone"}}


def test_linear_probe_freezes_weights_and_batchnorm_statistics(synthetic_root, tmp_path, source_weights):
    module, rec, before, trainer = fit(
        synthetic_root, {"name": "linear_probe", "pretrained": True}, source_weights, 2, tmp_path
    )
    assert parts_per_epoch(rec) == {0: {"head"}, 1: {"head"}}
    after = module.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "backbone weights or BN statistics changed"
    names = [g["name"] for g in trainer.optimizers[0].param_groups]
    assert names == ["head", "head_no_decay"]


def test_finetune_unfreezes_at_the_epoch_with_its_own_lr(synthetic_root, tmp_path, source_weights):
    stage = {"name": "finetune", "pretrained": True, "unfreeze_at_epoch": 1, "backbone_lr_ratio": 0.1}
    module, rec, before, trainer = fit(synthetic_root, stage, source_weights, 3, tmp_path)
    assert parts_per_epoch(rec) == {0: {"head"}, 1: {"head", "backbone"}, 2: {"head", "backbone"}}
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["backbone"]["initial_lr"] == pytest.approx(0.1 * groups["head"]["initial_lr"])
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    after = module.model.backbone.state_dict()
    assert not torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])


def test_finetune_resumed_before_the_unfreeze_epoch_keeps_the_schedule(synthetic_root, tmp_path, source_weights):
    stage = {"name": "finetune", "pretrained": True, "unfreeze_at_epoch": 2, "backbone_lr_ratio": 0.1}
    _, full, *_ = fit(synthetic_root, stage, source_weights, 3, tmp_path / "a", every_epoch=True)
    ckpt = tmp_path / "a" / "ckpt" / "epoch=0.ckpt"
    assert ckpt.is_file()
    module, resumed, _, trainer = fit(synthetic_root, stage, source_weights, 3, tmp_path / "b", ckpt_path=str(ckpt))
    assert parts_per_epoch(full) == {0: {"head"}, 1: {"head"}, 2: {"head", "backbone"}}
    assert parts_per_epoch(resumed) == {1: {"head"}, 2: {"head", "backbone"}}
    ratio = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    assert ratio["backbone"] == pytest.approx(0.1 * ratio["head"])


def test_schedule_as_a_function_of_the_epoch():
    ft = FreezeSchedule("finetune", pretrained=True, unfreeze_at_epoch=3)
    assert [ft.backbone_trainable(e) for e in range(5)] == [False, False, False, True, True]
    assert not any(FreezeSchedule("linear_probe").backbone_trainable(e) for e in range(3))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["stage.name=probe"], r"stage.name='probe': expected one of scratch, linear_probe, finetune"),
        (["stage=finetune", "stage.unfreeze_at_epoch=5", "trainer.max_epochs=5"], r"unfreeze_at_epoch=5 must be <"),
        (["stage=finetune", "model=resnet20"], r"stage=finetune starts from pretrained weights but resnet20 has none"),
        (["stage.backbone_warmup_epochs=-1"], r"stage.backbone_warmup_epochs=-1: expected a number in \[0, 100000\]"),
        (
            ["stage.backbone_warmup_epochs=1"],
            r"warmup_epochs=1 warms up .* only stage=finetune has \(stage=scratch\)",
        ),
        (
            ["stage=finetune", "stage.backbone_warmup_epochs=2.5", "trainer.max_epochs=3"],
            r"unfreeze_at_epoch=1 \+ stage.backbone_warmup_epochs=2.5 must be <= trainer.max_epochs=3",
        ),
    ],
)
def test_bad_stage_settings_are_refused_before_a_run(overrides, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        validate_train_config(compose_cfg(overrides, tmp_path))


# ------------------------------------------------ the backbone's LR warm-up (finetune)
ONECYCLE = {"name": "onecycle", "pct_start": 0.25, "div_factor": 25.0, "final_div_factor": 1e4}


def lrs_per_step(scheduler_cfg: dict, steps: int, warmup: tuple[int, int] | None) -> dict[str, list[float]]:
    """Each group's LR at each optimizer step: head and backbone groups at 0.1x, optionally warmed up."""
    model = build_model("resnet20", num_classes=5)
    opt = build_optimizer(SGD, model, backbone_lr_ratio=0.1)
    sched = build_scheduler(scheduler_cfg, opt, total_steps=steps, max_epochs=steps)
    if warmup:
        sched = with_backbone_warmup(sched, opt, *warmup)
    out: dict[str, list[float]] = {}
    for _ in range(steps):
        for g in opt.param_groups:
            out.setdefault(g["name"], []).append(g["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    return out


@pytest.mark.parametrize("scheduler", [ONECYCLE, COSINE | {"warmup_epochs": 2}, {"name": "none"}])
def test_backbone_warmup_ramps_only_the_backbone_groups_on_top_of_the_schedule(scheduler):
    plain = lrs_per_step(scheduler, 12, None)
    warm = lrs_per_step(scheduler, 12, (3, 4))  # unfreeze at step 3, ramp over 4 steps
    factor = [0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 1]
    assert set(warm) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    for name in ("head", "head_no_decay"):
        assert warm[name] == pytest.approx(plain[name], rel=1e-12)  # the head keeps its schedule
    for name in ("backbone", "backbone_no_decay"):
        assert warm[name] == pytest.approx([f * lr for f, lr in zip(factor, plain[name])], rel=1e-12)
    assert plain["backbone"][5] == pytest.approx(0.1 * plain["head"][5])


def test_finetune_backbone_warmup_starts_at_the_unfreeze_epoch_and_survives_a_resume(
    synthetic_root, tmp_path, source_weights
):
    """2 steps per epoch, constant LR 0.05: the backbone (0.005) ramps over epochs 1-2 (4 steps)."""
    stage = {
        "name": "finetune",
        "pretrained": True,
        "unfreeze_at_epoch": 1,
        "backbone_lr_ratio": 0.1,
        "backbone_warmup_epochs": 2,
    }
    none = {"name": "none"}
    _, full, *_ = fit(synthetic_root, stage, source_weights, 4, tmp_path / "a", every_epoch=True, scheduler=none)
    backbone = [0.0, 0.0, 0.00125, 0.0025, 0.00375, 0.005, 0.005, 0.005]
    assert full.lrs["head"] == pytest.approx([0.05] * 8)
    assert full.lrs["backbone"] == pytest.approx(backbone) and full.lrs["backbone_no_decay"] == pytest.approx(backbone)
    assert parts_per_epoch(full)[1] == {"head", "backbone"}
    # resumed mid-ramp (after epoch 1): the ramp continues where it stopped
    ckpt = str(tmp_path / "a" / "ckpt" / "epoch=1.ckpt")
    _, resumed, *_ = fit(synthetic_root, stage, source_weights, 4, tmp_path / "b", ckpt_path=ckpt, scheduler=none)
    assert resumed.lrs["backbone"] == pytest.approx(backbone[4:])
