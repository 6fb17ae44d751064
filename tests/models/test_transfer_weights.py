"""Partial weight loading for transfer: backbone from our own checkpoint, a fresh head, a report."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from helpers import compose_cfg, synthetic_overrides

from resnet_cifar.config import validate_train_config
from resnet_cifar.errors import ConfigError, WeightsError
from resnet_cifar.models.factory import build_model
from resnet_cifar.models.weights import extract_state_dict, load_matching, safe_load
from resnet_cifar.run import train
from resnet_cifar.training.module import ImageClassifier

WEIGHTS_LOG = "resnet_cifar.models.weights"


def source_checkpoint(path, num_classes: int = 5) -> dict[str, torch.Tensor]:
    """A Lightning-style checkpoint of a trained-looking source; returns its model tensors."""
    torch.manual_seed(123)
    module = ImageClassifier(
        model={"name": "resnet20"},
        optimizer={"name": "sgd", "lr": 0.1},
        scheduler={"name": "none"},
        num_classes=num_classes,
    )
    with torch.no_grad():  # batch-norm buffers too, so that they cannot match a fresh model by chance
        for name, t in module.model.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.rand_like(t))
            elif name.endswith("num_batches_tracked"):
                t.fill_(7)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return {k: v.clone() for k, v in module.model.state_dict().items()}


def fresh(num_classes: int, **kw):
    torch.manual_seed(0)
    return build_model("resnet20", num_classes=num_classes, **kw)


def test_backbone_loads_and_other_class_count_gets_a_fresh_head(tmp_path, caplog):
    src = source_checkpoint(tmp_path / "source.ckpt")
    with caplog.at_level(logging.DEBUG, logger=WEIGHTS_LOG):
        model = fresh(3, weights_path=str(tmp_path / "source.ckpt"))
    reference = fresh(3)
    state = model.state_dict()
    backbone = [k for k in state if k.startswith("backbone.")]
    assert len(backbone) == 114
    for k in backbone:
        assert torch.equal(state[k], src[k]), k
    for k in ("head.weight", "head.bias"):  # exactly what a fresh model of the same seed starts with
        assert torch.equal(state[k], reference.state_dict()[k]), k
    summary = caplog.records[0].getMessage()
    assert "loaded 114 tensors (backbone.*: 114)" in summary
    assert "skipped for shape mismatch: head.weight (5, 64) vs model (3, 64), head.bias (5,) vs model (3,)" in summary
    debug = "\n".join(r.getMessage() for r in caplog.records[1:])
    assert f"loaded keys: {', '.join(sorted(backbone))}" in debug
    assert "keys left at initialisation: head.weight, head.bias" in debug


def test_report_lists_mismatched_shapes_by_key():
    src = {k: v for k, v in fresh(10).state_dict().items()}
    src["backbone.stem.0.weight"] = torch.zeros(8, 3, 3, 3)  # another width: left out, by key
    src["backbone.extra.weight"] = torch.zeros(1)
    model = fresh(4)
    before = model.state_dict()["backbone.stem.0.weight"].clone()
    with pytest.raises(WeightsError, match=r"shape mismatch: backbone\.stem\.0\.weight \(8, 3, 3, 3\) vs model"):
        load_matching(model, src, "test")  # the backbone must fit unless a part is re-initialised on purpose
    report = load_matching(model, src, "test", reinit=("stem.0.",))
    assert report.mismatched == {
        "backbone.stem.0.weight": ((8, 3, 3, 3), (16, 3, 3, 3)),
        "head.weight": ((10, 64), (4, 64)),
        "head.bias": ((10,), (4,)),
    }
    assert report.unexpected == ["backbone.extra.weight"]
    assert report.missing == []
    assert len(report.loaded) == 113 and "backbone.stem.0.weight" not in report.loaded
    assert torch.equal(model.state_dict()["backbone.stem.0.weight"], before)


def test_same_class_count_head_loads_unless_load_head_false(tmp_path, caplog):
    src = source_checkpoint(tmp_path / "source.ckpt")
    exported = tmp_path / "exported.pt"  # an exported state dict (backbone.*/head.*) works the same
    torch.save(src, exported)
    kept = fresh(5, weights_path=str(exported))
    assert torch.equal(kept.head.weight, src["head.weight"])
    with caplog.at_level(logging.INFO, logger=WEIGHTS_LOG):
        new = fresh(5, weights_path=str(exported), load_head=False)
    assert torch.equal(new.head.weight, fresh(5).head.weight)
    assert torch.equal(new.state_dict()["backbone.stem.0.weight"], src["backbone.stem.0.weight"])
    assert "loaded 114 tensors (backbone.*: 114); not loaded on request: head.weight, head.bias" in caplog.text


def test_a_file_for_another_architecture_is_refused(tmp_path):
    """Only batch-norm step counters of torchvision's ResNet-18 fit ResNet-20: that is no backbone."""
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsError, match=r"does not fit this model's backbone \(shape mismatch: backbone\.layer1"):
        fresh(5, weights_path=str(path))


def test_pretrained_stage_without_weights_is_a_config_error(tmp_path):
    cfg = compose_cfg(["experiment=transfer_finetune"], tmp_path)
    with pytest.raises(ConfigError, match=r"stage=finetune .* model.weights_path="):
        validate_train_config(cfg)


def test_transfer_presets_compose(tmp_path):
    src = compose_cfg(["experiment=transfer_source"], tmp_path)
    assert list(src.data.classes) == [0, 1, 2, 3, 4] and src.stage.name == "scratch"
    for stage in ("scratch", "linear_probe", "finetune"):
        cfg = compose_cfg([f"experiment=transfer_{stage}", "model=resnet32"], tmp_path)
        assert cfg.stage.name == stage and list(cfg.data.classes) == [5, 6, 7, 8, 9]
        assert cfg.model.name == "resnet32" and cfg.model.load_head is False  # the command line wins
        assert cfg.data.image_size == src.data.image_size and cfg.optimizer.lr == src.optimizer.lr


def test_linear_probe_keeps_the_source_backbone_and_finetune_moves_it(synthetic_root, tmp_path):
    """End to end on the synthetic set: source on classes 0-4, targets on 5-9 from its checkpoint."""
    # save_top_k=-1: Lightning 2.6 writes last.ckpt only when a top-k checkpoint is written
    base = [
        *synthetic_overrides(synthetic_root),
        "logger=none",
        "~callbacks.lr_monitor",
        "test=false",
        "callbacks.model_checkpoint.save_top_k=-1",
    ]
    source = train(compose_cfg(["experiment=transfer_source", *base, "data.val_size=100"], tmp_path / "source"))
    src = extract_state_dict(safe_load(source["best_ckpt"]))
    target = [*base, "data.val_size=100", "data.train_per_class=20", f"model.weights_path={source['best_ckpt']}"]
    target += ["trainer.max_epochs=4", "stage.unfreeze_at_epoch=1"]  # 8 steps: one-cycle needs > 4

    def trained(stage: str) -> dict[str, torch.Tensor]:  # the weights at the end of training
        train(compose_cfg([f"experiment=transfer_{stage}", *target], tmp_path / stage))
        return extract_state_dict(safe_load(tmp_path / stage / "checkpoints" / "last.ckpt"))

    probe, tuned = trained("linear_probe"), trained("finetune")
    backbone = [k for k in src if k.startswith("backbone.")]
    assert all(torch.equal(probe[k], src[k]) for k in backbone)  # weights and batch-norm statistics
    assert not torch.equal(probe["head.weight"], src["head.weight"])
    changed = [k for k in backbone if not torch.equal(tuned[k], src[k])]
    assert len(changed) > len(backbone) // 2  # after the head-only epoch, the backbone trained
