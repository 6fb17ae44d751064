"""Transfer on the real CIFAR-10: a backbone pretrained here on classes 0-4 and fine-tuned
on classes 5-9 with 20 labels per class beats training from scratch on the same labels.

About 210 optimizer steps of batch 32 at 16x16 (the study's presets, shortened). If this
fails, the source checkpoint is not reaching the target backbone (weights loading), or the
freeze schedule / learning rates of `finetune` are broken.
"""

from __future__ import annotations

import logging

import pytest
from helpers import compose_cfg

from resnet_cifar.run import train

pytestmark = pytest.mark.slow

# Required lead of finetune over scratch in target validation accuracy (1,250 images; the
# standard error of each accuracy is ~1.4 points). Measured once on the 2-core CPU (seed 0,
# torch 2.14.1): source val 0.394 (120 steps), finetune 0.402 vs scratch 0.367 (+3.5 points).
# The run is seeded, so the margin is set below that single measurement; the lead is small
# because the source is short (bench/transfer_study.py's 300-step source gives +14 points).
# A longer source would make the test more decisive at a higher CI cost.
MARGIN = 0.015
BUDGET = 20  # labels per target class: 100 images, 3 steps of 32 per epoch


def common(root) -> list[str]:
    return [
        f"data.root={root}",
        "data.batch_size=32",
        "optimizer.lr=0.025",  # the presets' 0.05 at batch 64, scaled to 32
        "trainer.accelerator=cpu",
        "logger=none",
        "~callbacks.lr_monitor",
        "~callbacks.progress_bar",
        "~callbacks.model_summary",
        "++trainer.num_sanity_val_steps=0",
        "test=false",
    ]


def source_overrides(root, seed: int = 0) -> list[str]:
    """120 steps on classes 0-4 (2 epochs of 60 batches)."""
    return [
        "experiment=transfer_source",
        *common(root),
        f"seed={seed}",
        "trainer.max_epochs=2",
        "++trainer.limit_train_batches=60",
    ]


def target_overrides(root, stage: str, weights: str | None = None, seed: int = 0) -> list[str]:
    """45 steps on classes 5-9 with BUDGET labels per class, validated once at the end."""
    ov = [
        f"experiment=transfer_{stage}",
        *common(root),
        f"seed={seed}",
        f"data.train_per_class={BUDGET}",
        "trainer.max_epochs=15",
        "trainer.check_val_every_n_epoch=15",
    ]
    return ov + ([f"model.weights_path={weights}"] if weights else [])


def test_finetuned_source_backbone_beats_scratch_with_few_labels(real_root, tmp_path, caplog):
    source = train(compose_cfg(source_overrides(real_root), tmp_path / "source"))
    assert source["best_ckpt"], "the source run saved no checkpoint"
    assert source["val/acc_best"] > 0.35, f"the source run did not learn: {source}"  # chance: 0.2

    with caplog.at_level(logging.INFO, logger="resnet_cifar.models.weights"):
        finetune = train(compose_cfg(target_overrides(real_root, "finetune", source["best_ckpt"]), tmp_path / "ft"))
    assert "loaded 114 tensors (backbone.*: 114); not loaded on request: head.weight, head.bias" in caplog.text
    scratch = train(compose_cfg(target_overrides(real_root, "scratch"), tmp_path / "scratch"))

    ft, sc = finetune["val/acc"], scratch["val/acc"]
    assert ft > sc + MARGIN, f"finetune {ft:.3f} vs scratch {sc:.3f} on the target validation set"
