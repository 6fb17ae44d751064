"""The speedrun anchors' options end to end (patch-whitening stem, two-conv stages, ghost batch norm, Muon, reflect
crops, translate TTA, a linear schedule, lookahead): the whitening is fitted from the training split, and a
killed run resumes bit for bit with every option on."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import compose_cfg, run_train, synthetic_overrides

from resnet_cifar.data.datamodule import CIFAR10DataModule
from resnet_cifar.models import build_model
from resnet_cifar.models.resnet9 import PatchWhitening
from resnet_cifar.run import train
from resnet_cifar.training.module import ImageClassifier

STEPS_PER_EPOCH = 8  # 400 training images / batch 50
MODEL = {
    "name": "resnet9",
    "widths": [24, 16, 32, 32],
    "stem": "whiten",
    "tails": ["conv", "conv", "conv"],
    "activation": "gelu",
    "pool_before_bn": True,
    "bn_scale_trainable": False,
    "ghost_batch": 25,
    "bn_momentum": 0.4,
    "bn_eps": 1e-12,
    "dirac_init": True,
}


def options(root: Path) -> list[str]:
    model = [f"model.{k}={v}".replace("'", "").replace(" ", "") for k, v in MODEL.items() if k != "name"]
    return [
        *synthetic_overrides(root),
        "model=resnet9",
        *model,
        "optimizer=muon",
        "optimizer.lr=0.2",
        "optimizer.bn_lr_ratio=16",
        "scheduler=linear",
        "data.augment.crop_padding=2",
        "data.augment.padding_mode=reflect",
        "data.augment.alternating_flip=true",
        "label_smoothing=0.2",
        "module.tta_flip=true",
        "module.tta_translate=1",
        "trainer.deterministic=true",
        "callbacks.last_checkpoint.every_n_train_steps=3",
        "callbacks.last_checkpoint.every_n_minutes=null",
        "logger=csv",
        "callbacks=[default,lookahead]",
        "callbacks.lookahead.every_n_steps=5",  # the resumed checkpoint (step 12) lies between two syncs
    ]


def _datamodule(root: Path) -> CIFAR10DataModule:
    return CIFAR10DataModule(root=str(root), download=False, val_size=100, batch_size=50, strict_sizes=False)


def test_the_whitening_is_fitted_from_the_training_split_and_stays_frozen(synthetic_root, tmp_path):
    torch.manual_seed(0)
    optimizer = {"name": "muon", "lr": 0.1, "bn_lr_ratio": 16, "muon_lr": 0.05, "muon_weight_decay": 0.0}
    optimizer |= {"muon_momentum": 0.6, "muon_nesterov": True, "muon_ns_steps": 3, "muon_normalize": True}
    module = ImageClassifier(model=MODEL, optimizer=optimizer, scheduler={"name": "none"}, channels_last=True)
    whitening = module.model.backbone.whitening
    bias = whitening.bias.detach().clone()
    dm = _datamodule(synthetic_root)
    quiet = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    quiet |= dict(enable_checkpointing=False, default_root_dir=tmp_path)
    pl.Trainer(max_steps=3, **quiet).fit(module, datamodule=dm)
    expected = PatchWhitening()
    expected.fit(dm.train_images(5000))  # the 400 training images of the synthetic split, unaugmented
    assert len(dm.train_images(5000)) == 400
    torch.testing.assert_close(whitening.weight, expected.weight, rtol=0, atol=0)  # and unchanged by 3 steps
    assert not torch.equal(whitening.bias, bias)  # its bias trains

    # filters that came with the weights (model.weights_path) are kept, not refitted on the new data
    source = build_model(**MODEL)
    source.backbone.whitening.weight.data.fill_(0.5)
    path = tmp_path / "whitened.pt"
    torch.save(source.state_dict(), path)
    again = ImageClassifier(model={**MODEL, "weights_path": str(path)}, optimizer=optimizer, scheduler={"name": "none"})
    pl.Trainer(max_steps=1, **quiet).fit(again, datamodule=dm)
    assert torch.all(again.model.backbone.whitening.weight == 0.5)


@pytest.fixture(scope="module")
def reference(synthetic_root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("speedrun_reference")
    metrics = train(compose_cfg(options(synthetic_root), out))
    assert metrics["epochs"] == 2
    return out, metrics


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_with_every_option_on(synthetic_root, reference, tmp_path):
    ref_out, ref_metrics = reference
    step = STEPS_PER_EPOCH + random.Random(5).randrange(2, STEPS_PER_EPOCH - 1)
    out = tmp_path / "run"
    args = [*options(synthetic_root), "ckpt_path=last"]
    killed = run_train(out, *args, "+callbacks.kill._target_=resume_faults.KillAtStep", f"+callbacks.kill.step={step}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert STEPS_PER_EPOCH < saved["global_step"] <= step
    assert any(s.get("momentum_buffer") is not None for s in saved["optimizer_states"][0]["state"].values())
    metrics = train(compose_cfg(args, out))
    ref = torch.load(ref_out / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ref["state_dict"].keys() == resumed["state_dict"].keys()
    assert not [k for k in ref["state_dict"] if not torch.equal(ref["state_dict"][k], resumed["state_dict"][k])]
    same = ("test/acc", "test/loss", "val/acc", "val/acc_best", "train/acc", "epochs")
    assert {k: metrics[k] for k in same} == {k: ref_metrics[k] for k in same}
    assert ref_metrics["val/acc"] > 0.3  # it learns the synthetic classes (chance: 0.1)
