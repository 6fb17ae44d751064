"""The freeze schedule sets the backbone's train/eval mode at every training step."""

from __future__ import annotations

import pytest
import torch

from resnet_cifar.training.module import ImageClassifier


@pytest.fixture
def finetune():
    torch.manual_seed(0)
    return ImageClassifier(
        model={"name": "resnet20"},
        optimizer={"name": "sgd", "lr": 0.1},
        scheduler={"name": "none"},
        stage={"name": "finetune", "pretrained": True, "unfreeze_at_epoch": 1},
        num_classes=5,
    )


def at_epoch(monkeypatch, module: ImageClassifier, epoch: int) -> None:
    monkeypatch.setattr(type(module), "current_epoch", property(lambda self: epoch))


def test_finetune_backbone_returns_to_train_mode_after_the_frozen_epochs(finetune, monkeypatch):
    x = torch.randn(8, 3, 16, 16)
    finetune.train()
    at_epoch(monkeypatch, finetune, 0)
    running = finetune.model.backbone.stem[1].running_mean.clone()
    finetune(x).sum().backward()
    assert not finetune.model.backbone.training  # frozen: batch-norm statistics stay
    assert torch.equal(finetune.model.backbone.stem[1].running_mean, running)
    assert finetune.model.backbone.stem[0].weight.grad is None
    # Lightning restores the modes it found after validation: the backbone is still in eval mode here
    at_epoch(monkeypatch, finetune, 1)
    finetune(x).sum().backward()
    assert finetune.model.backbone.training
    assert not torch.equal(finetune.model.backbone.stem[1].running_mean, running)
    assert finetune.model.backbone.stem[0].weight.grad is not None


def test_eval_mode_is_left_alone(finetune, monkeypatch):
    at_epoch(monkeypatch, finetune, 1)
    finetune.eval()
    finetune(torch.randn(2, 3, 16, 16))
    assert not finetune.model.backbone.training
