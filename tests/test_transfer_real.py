"""Transfer on the real CIFAR-10: a backbone pretrained here on classes 0-4 and fine-tuned
on classes 5-9 with 50 labels per class beats training from scratch on the same labels.

The study's presets (``experiment=transfer_*``, the cpu_30min recipe at batch 128, the batch
its learning rate is set for), shortened, at 16x16 inputs to keep CI cheap: a source of 120
steps, target runs of 40. If this fails, the source checkpoint is not reaching the target
backbone (weights loading), or the freeze schedule / learning rates of `finetune` are broken.

The seed spread of the lead (finetune minus scratch), which MARGIN must stay clear of::

    RESNET_CIFAR_DATA=/path/to/cifar10 PYTHONPATH=src:tests python tests/test_transfer_real.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

import pytest
from helpers import REAL_DATA, compose_cfg

from resnet_cifar.run import train

pytestmark = pytest.mark.slow

# Required lead of finetune over scratch in target validation accuracy (1,250 images; the
# standard error of each accuracy is ~1.4 points, ~2 for their difference). Measured alone on the
# 2-core CPU (torch 2.14.1) with the command of the module docstring, seeds 0 1 2: source val
# 0.578 / 0.586 / 0.586, lead +3.9 / +5.0 / +4.8 points (finetune 0.529 / 0.548 / 0.538 vs scratch
# 0.490 / 0.498 / 0.490): mean +4.6, spread (sd) 0.6. MARGIN sits 2.4 sd below the smallest lead
# and 3.5 sd below the mean, so seed noise does not erase it: a lead under it points at a regression.
MARGIN = 0.025
# The backbone joins at a tenth of the head's LR here, not at the stage's default (1): in runs this
# short, the backbone at the full one-cycle peak makes the lead noisy. The figures above are at 0.1
# (measured again with this constant: the same to the last digit). With the default (the same
# command with --backbone-lr-ratio 1): lead +4.7 / +2.6 / +7.7 points (finetune 0.537 / 0.523 /
# 0.567), sd 2.6, the smallest a hair over MARGIN; the full-length study finds the two ratios
# equal at 50 labels per class.
BACKBONE_LR_RATIO = 0.1
BUDGET = 50  # labels per target class: 250 images, 1 step of 128 per epoch
SOURCE_EPOCHS, SOURCE_BATCHES = 2, 60  # 120 steps, 15,360 images
TARGET_EPOCHS = 40  # 40 steps, validated once at the end


def common(root: Path, seed: int) -> list[str]:
    return [
        f"data.root={root}",
        "data.image_size=16",  # 4x cheaper than the study's 32x32; the comparison holds at either size
        f"seed={seed}",
        "trainer.accelerator=cpu",
        "logger=none",
        "report=none",
        "~callbacks.lr_monitor",
        "~callbacks.progress_bar",
        "~callbacks.model_summary",
        "++trainer.num_sanity_val_steps=0",
        "test=false",
    ]


def source_overrides(root: Path, seed: int = 0) -> list[str]:
    return [
        "experiment=transfer_source",
        *common(root, seed),
        f"trainer.max_epochs={SOURCE_EPOCHS}",
        f"++trainer.limit_train_batches={SOURCE_BATCHES}",
    ]


def target_overrides(root: Path, stage: str, weights: str | None = None, seed: int = 0) -> list[str]:
    ov = [
        f"experiment=transfer_{stage}",
        *common(root, seed),
        f"data.train_per_class={BUDGET}",
        f"trainer.max_epochs={TARGET_EPOCHS}",
        f"trainer.check_val_every_n_epoch={TARGET_EPOCHS}",
    ]
    return ov + ([f"model.weights_path={weights}"] if weights else [])


def scenario(root: Path, out: Path, seed: int = 0, ratio: float = BACKBONE_LR_RATIO) -> dict[str, float]:
    """The test's three runs; the source's and both targets' validation accuracies, and the lead."""
    source = train(compose_cfg(source_overrides(root, seed), out / "source"))
    assert source["best_ckpt"], "the source run saved no checkpoint"
    ft_overrides = [
        *target_overrides(root, "finetune", source["best_ckpt"], seed),
        f"stage.backbone_lr_ratio={ratio}",
    ]
    finetune = train(compose_cfg(ft_overrides, out / "ft"))
    scratch = train(compose_cfg(target_overrides(root, "scratch", seed=seed), out / "scratch"))
    ft, sc = finetune["val/acc"], scratch["val/acc"]
    return {"seed": seed, "source": source["val/acc_best"], "finetune": ft, "scratch": sc, "lead": ft - sc}


def test_finetuned_source_backbone_beats_scratch_with_few_labels(real_root, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="resnet_cifar.models.weights"):
        r = scenario(real_root, tmp_path)
    assert r["source"] > 0.5, f"the source run did not learn: {r}"  # chance: 0.2
    assert "(backbone.*: 126); not loaded on request: head.weight, head.bias" in caplog.text
    assert r["lead"] > MARGIN, f"finetune {r['finetune']:.3f} vs scratch {r['scratch']:.3f} on the target val set"


def measure_spread(seeds: list[int], ratio: float = BACKBONE_LR_RATIO) -> dict:
    """The scenario once per seed: each lead, and their mean, sample std and min."""
    runs = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(scenario(REAL_DATA, Path(tmp), seed, ratio))
        print(json.dumps(runs[-1]), flush=True)
    leads = [r["lead"] for r in runs]
    std = statistics.stdev(leads) if len(leads) > 1 else 0.0
    return {"runs": runs, "lead_mean": statistics.fmean(leads), "lead_std": std, "lead_min": min(leads)}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Seed spread of the lead of finetune over scratch in this test.")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--backbone-lr-ratio", type=float, default=BACKBONE_LR_RATIO, help="finetune's (the test's: 0.1)")
    args = p.parse_args()
    summary = measure_spread(args.seeds, args.backbone_lr_ratio)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    print(f"MARGIN = {MARGIN}: the smallest lead is {summary['lead_min'] - MARGIN:+.3f} above it")
