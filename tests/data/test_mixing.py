"""MixUp / CutMix of training batches (``data.mixup``, ``data.cutmix``): soft targets, the images they
describe, reproducible draws, evaluation untouched, the loss and accuracy on soft targets, exact resume."""

from __future__ import annotations

import json
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import compose_cfg, run_train, synthetic_overrides

from resnet_cifar.config import validate_train_config
from resnet_cifar.data.datamodule import CIFAR10DataModule
from resnet_cifar.data.mixing import BatchMix
from resnet_cifar.errors import ConfigError
from resnet_cifar.run import train
from resnet_cifar.training.module import ImageClassifier

B, C = 16, 10


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 32, 32, generator=g), torch.randperm(B, generator=g) % C


def shares(targets: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's weight on its own label and on its neighbour's (MixUp/CutMix pair image i with i-1)."""
    own = F.one_hot(labels, C).float()
    return (targets * own).sum(1), (targets * own.roll(1, 0)).sum(1)


def test_mixup_targets_sum_to_one_and_describe_the_mixed_images():
    x, y = batch()
    images, targets = BatchMix(C, mixup=0.4)(x, y, epoch=3, batch=7)
    assert images.shape == x.shape and targets.shape == (B, C) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(B))
    distinct = y != y.roll(1, 0)
    lam = shares(targets, y)[0][distinct][0]  # one lambda for the whole batch
    assert 0 < lam < 1
    torch.testing.assert_close(images, lam * x + (1 - lam) * x.roll(1, 0))
    expected = lam * F.one_hot(y, C) + (1 - lam) * F.one_hot(y.roll(1, 0), C)
    torch.testing.assert_close(targets, expected.float())


def test_cutmix_pastes_a_box_whose_area_is_the_neighbours_share():
    x, y = batch(1)
    images, targets = BatchMix(C, cutmix=1.0)(x, y, epoch=0, batch=2)
    torch.testing.assert_close(targets.sum(1), torch.ones(B))
    pasted = (images != x).any(1)  # (B, H, W): pixels taken from the neighbour
    assert torch.equal(images, torch.where(pasted[:, None], x.roll(1, 0), x))
    distinct = y != y.roll(1, 0)
    own, other = shares(targets, y)
    area = pasted.float().mean((1, 2))
    torch.testing.assert_close(other[distinct], area[distinct])  # same box for the whole batch
    torch.testing.assert_close(own[distinct], 1 - area[distinct])


def test_draws_are_a_function_of_seed_epoch_and_batch_and_leave_the_global_generator_alone():
    x, y = batch()
    mix = BatchMix(C, mixup=0.4, cutmix=1.0, seed=5)
    state = torch.get_rng_state()
    first = mix(x, y, epoch=1, batch=4)
    assert torch.equal(torch.get_rng_state(), state)
    again = BatchMix(C, mixup=0.4, cutmix=1.0, seed=5)(x, y, epoch=1, batch=4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    others = [mix(x, y, 1, 5), mix(x, y, 2, 4), BatchMix(C, mixup=0.4, cutmix=1.0, seed=6)(x, y, 1, 4)]
    assert all(not torch.equal(first[1], o[1]) for o in others)
    # with both, each batch gets one of the two: MixUp changes every pixel, CutMix only a box
    kinds = {bool((mix(x, y, 0, b)[0] != x).all()) for b in range(12)}
    assert kinds == {True, False}


def fake_trainer(training: bool, epoch: int = 2, batch_in_epoch: int = 3) -> SimpleNamespace:
    progress = SimpleNamespace(current=SimpleNamespace(ready=batch_in_epoch))
    return SimpleNamespace(
        training=training,
        current_epoch=epoch,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )


@pytest.mark.parametrize("loader", ["tensor", "torchvision"])
def test_datamodule_mixes_training_batches_only_after_the_augmentation(synthetic_root, loader):
    kw = dict(root=str(synthetic_root), download=False, val_size=100, strict_sizes=False, seed=3, loader=loader)
    plain, mixed = CIFAR10DataModule(**kw), CIFAR10DataModule(**kw, mixup=0.4, cutmix=1.0)
    for dm in (plain, mixed):
        dm.setup()
    idx = list(range(8))
    raw = plain.splits["train"].__getitems__(idx) if loader == "tensor" else None
    if raw is None:  # the per-sample path: already transformed, float
        torch.manual_seed(0)
        samples = [plain.splits["train"][i] for i in idx]
        raw = tuple(torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in range(3))
    plain.trainer = mixed.trainer = fake_trainer(training=True)
    x0, y0, i0 = plain.on_after_batch_transfer(raw, 0)
    x1, y1, i1 = mixed.on_after_batch_transfer(raw, 0)
    assert y0.dtype == torch.long and torch.equal(i0, i1)  # off: labels untouched
    assert y1.shape == (8, C) and torch.allclose(y1.sum(1), torch.ones(8))
    expected = BatchMix(C, mixup=0.4, cutmix=1.0, seed=3)(x0, y0, epoch=2, batch=3)  # (seed, epoch, batch)
    assert torch.equal(x1, expected[0]) and torch.equal(y1, expected[1])
    # validation and test batches: never mixed
    plain.trainer = mixed.trainer = fake_trainer(training=False)
    e0, e1 = plain.on_after_batch_transfer(raw, 0), mixed.on_after_batch_transfer(raw, 0)
    assert all(torch.equal(a, b) for a, b in zip(e0, e1)) and e1[1].dtype == torch.long


def test_loss_and_accuracy_on_soft_targets_match_a_hand_computation():
    torch.manual_seed(0)
    smoothing = 0.1
    module = ImageClassifier(
        model={"name": "resnet20"}, optimizer={"name": "sgd", "lr": 0.1}, scheduler={}, label_smoothing=smoothing
    ).train()
    x, _ = batch(2)
    logits = torch.randn(B, C, generator=torch.Generator().manual_seed(3))
    object.__setattr__(module, "_run_model", lambda inputs: logits)  # known logits, as in test_evaluation
    # mixed targets whose larger share is the predicted class for the first half of the batch only
    predicted = logits.argmax(-1)
    major = torch.where(torch.arange(B) < B // 2, predicted, (predicted + 1) % C)
    targets = 0.7 * F.one_hot(major, C) + 0.3 * F.one_hot((major + 2) % C, C)
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer: nothing is logged
        loss = module.training_step((x, targets.float(), torch.arange(B)), 0)
    smoothed = targets * (1 - smoothing) + smoothing / C
    by_hand = -(smoothed * logits.log_softmax(-1)).sum(1).mean()
    torch.testing.assert_close(loss, by_hand)
    assert float(module.train_acc.compute()) == 0.5  # against the argmax of the soft targets


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["data.mixup=-0.2"], r"data.mixup=-0.2: expected a number in \[0, 100\]"),
        (["data.cutmix=1.0", "data.batch_size=1"], "data.cutmix=1.0 mixes each image with another of its batch"),
    ],
)
def test_bad_mixing_settings_are_refused(overrides, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        validate_train_config(compose_cfg(overrides, tmp_path))


def test_sigkill_mid_epoch_then_resume_replays_the_mixing(synthetic_root, tmp_path):
    """Mixed batches, resumed mid-epoch: the same weights as the run that was not interrupted."""
    args = [
        *synthetic_overrides(synthetic_root),
        "data.mixup=0.4",
        "data.cutmix=1.0",
        "trainer.deterministic=true",
        "callbacks.last_checkpoint.every_n_train_steps=3",
        "callbacks.last_checkpoint.every_n_minutes=null",
        "logger=csv",
        "ckpt_path=last",
    ]
    reference = tmp_path / "reference"
    ref_metrics = train(compose_cfg(args, reference))
    out = tmp_path / "run"
    killed = run_train(out, *args, "+callbacks.kill._target_=resume_faults.KillAtStep", "+callbacks.kill.step=13")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    train(compose_cfg(args, out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train/acc"] == ref_metrics["train/acc"] and metrics["test/loss"] == ref_metrics["test/loss"]
    ref, resumed = (torch.load(p / "checkpoints" / "last.ckpt", weights_only=True) for p in (reference, out))
    assert not [k for k in ref["state_dict"] if not torch.equal(ref["state_dict"][k], resumed["state_dict"][k])]


def test_a_mixed_run_trains_and_tests_on_hard_labels(synthetic_root, tmp_path):
    """CutMix trains on soft targets; test/acc and test/loss are the tested checkpoint's on the unmixed test images
    and their hard labels (recomputed here outside a Trainer), and the run learned."""
    metrics = train(compose_cfg([*synthetic_overrides(synthetic_root), "data.cutmix=1.0", "logger=none"], tmp_path))
    assert metrics["test/acc"] > 0.3  # 10 classes: chance is 0.1
    module, data_hp = ImageClassifier.load_trained(metrics["best_ckpt"])
    datamodule = CIFAR10DataModule(**{**data_hp, "root": str(synthetic_root)})
    assert datamodule.mixer is not None  # the checkpoint's data settings: CutMix on
    datamodule.setup("test")
    logits, labels = [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            images, y = datamodule.transform_batch(batch, train=False)
            assert y.dtype == torch.int64 and y.ndim == 1  # class indices, not soft targets
            logits.append(module.eval().tta_logits(images)[0])
            labels.append(y)
    logits, labels = torch.cat(logits), torch.cat(labels)
    assert metrics["test/acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item(), abs=1e-6)
    assert metrics["test/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
