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

SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
COSINE = {"name": "cosine", "warmup_epochs": 0}


class RecordGrads(pl.Callback):
    """Per epoch: the parameter prefixes that received gradients, and backbone BN mode."""

    def __init__(self) -> None:
        self.with_grad: dict[int, set[str]] = {}

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        parts = {n.split(".")[1] for n, p in module.named_parameters() if p.grad is not None}
        self.with_grad.setdefault(trainer.current_epoch, set()).update(parts)


def parts_per_epoch(rec: RecordGrads) -> dict[int, set[str]]:
    """'head' or 'backbone' per epoch (from names like model.backbone.stem.0.weight)."""
    return {e: {p for p in parts if p in ("head", "backbone")} for e, parts in rec.with_grad.items()}


@pytest.fixture
def source_weights(tmp_path):
    path = tmp_path / "source.pt"
    torch.save(build_model("resnet20", num_classes=10).state_dict(), path)
    return str(path)


def fit(root, stage, weights_path, max_epochs, tmp_path, ckpt_path=None, every_epoch=False):
    dm = CIFAR10DataModule(root=str(root), download=False, val_size=100, batch_size=100, strict_sizes=False)
    module = ImageClassifier(
        model={"name": "resnet20", "weights_path": weights_path},
        optimizer=SGD,
        scheduler=COSINE,
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
    ],
)
def test_bad_stage_settings_are_refused_before_a_run(overrides, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        validate_train_config(compose_cfg(overrides, tmp_path))
