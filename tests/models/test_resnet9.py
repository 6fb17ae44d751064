"""Page's ResNet-9: shapes, parameter counts, FLOPs, options, channels_last and the freeze schedules."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import compose_cfg
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from resnet_cifar.data.datamodule import CIFAR10DataModule
from resnet_cifar.errors import ConfigError
from resnet_cifar.models import build_model
from resnet_cifar.models.resnet9 import ResNet9
from resnet_cifar.plain import to_dict
from resnet_cifar.training.module import ImageClassifier
from resnet_cifar.training.optim import build_optimizer

TINY = [8, 16, 32, 64]  # fast enough for training steps in tests


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def hand_counts(widths: list[int], classes: int = 10) -> tuple[int, int]:
    """(parameters, forward FLOPs of a 32x32 image) of Page's ResNet-9, counted by hand.

    Convs (3x3, no bias) at 32x32: prep, layer1's conv; at 16x16: layer1's residual pair, layer2's
    conv; at 8x8: layer3's conv; at 4x4: layer3's residual pair. Two FLOPs per multiply-add.
    """
    w0, w1, w2, w3 = widths
    convs = [(3, w0, 32), (w0, w1, 32), (w1, w1, 16), (w1, w1, 16), (w1, w2, 16), (w2, w3, 8), (w3, w3, 4), (w3, w3, 4)]
    conv_weights = sum(9 * a * b for a, b, _ in convs)
    bn = 2 * (w0 + 3 * w1 + w2 + 3 * w3)
    params = conv_weights + bn + w3 * classes + classes  # our head has a bias (Page's has none)
    flops = 2 * (sum(9 * a * b * s * s for a, b, s in convs) + w3 * classes)
    return params, flops


@pytest.mark.parametrize("widths", [[64, 128, 256, 512], [32, 64, 128, 256]], ids=["standard", "half"])
def test_parameters_and_flops_match_the_hand_count(widths):
    model = build_model("resnet9", widths=widths).eval()
    params, flops = hand_counts(widths)
    assert n_params(model) == params
    with FlopCounterMode(display=False) as counter:
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10)
    assert counter.get_total_flops() == flops


def test_the_default_model_is_pages_network():
    """model=resnet9 as shipped (conf/model/resnet9.yaml, ResNet9's defaults): cifar10-fast's 6,573,120
    parameters (its classifier has no bias: our head adds 10) and 0.76 GFLOP per 32x32 image."""
    cfg = to_dict(compose_cfg(["model=resnet9"], Path("unused")).model)
    built = {k: v for k, v in cfg.items() if k not in ("weights_path", "load_head")}
    for model in (build_model("resnet9").eval(), build_model(**built).eval()):
        assert n_params(model) - 10 == 6_573_120
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, 32, 32))
        assert counter.get_total_flops() / 1e9 == pytest.approx(0.7585, abs=1e-4)


def test_shapes_features_and_larger_inputs():
    model = build_model("resnet9", num_classes=7, widths=TINY)
    assert model.num_features == 64 and model.head.out_features == 7
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 7)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)  # global max-pool: any size that survives 3 pools
    assert model.backbone(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_pool_before_bn_reorders_the_stages_only():
    after, before = ResNet9(TINY), ResNet9(TINY, pool_before_bn=True)
    assert list(after.layer2._modules) == ["conv", "bn", "act", "pool"]
    assert list(before.layer2._modules) == ["conv", "pool", "bn", "act"]
    assert list(before.prep._modules) == ["conv", "bn", "act"]  # the prep block has no pool
    assert n_params(after) == n_params(before)
    before.load_state_dict(after.state_dict())
    x = torch.randn(4, 3, 32, 32)
    assert not torch.allclose(after(x), before(x))  # batch statistics over 4x fewer pixels


def test_activation_and_output_scale():
    relu, celu = ResNet9(TINY), ResNet9(TINY, activation="celu", celu_alpha=0.3)
    assert isinstance(relu.prep.act, nn.ReLU)
    assert isinstance(celu.prep.act, nn.CELU) and celu.prep.act.alpha == 0.3
    assert isinstance(celu.layer3[1].res2.act, nn.CELU)
    a, b = ResNet9(TINY, output_scale=0.125).eval(), ResNet9(TINY, output_scale=0.5).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(b(x), 4 * a(x))


def test_frozen_batchnorm_scales_stay_at_one_and_out_of_the_optimizer():
    torch.manual_seed(0)
    model = build_model("resnet9", widths=TINY, bn_scale_trainable=False)
    bn_weights = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn_weights and not any(w.requires_grad for w in bn_weights)
    optimizer = build_optimizer({"name": "sgd", "lr": 0.1, "weight_decay": 5e-4}, model)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(w) for w in bn_weights}
    bn_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {id(b) for b in bn_biases} <= in_optimizer  # the biases still train
    nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8)).backward()
    optimizer.step()
    assert all(torch.equal(w, torch.ones_like(w)) for w in bn_weights)


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    kwargs = dict(model={"name": "resnet9", "widths": TINY}, optimizer={"name": "sgd", "lr": 0.1}, scheduler={})
    nchw = ImageClassifier(**kwargs).eval()
    cl = ImageClassifier(**kwargs, channels_last=True).eval()
    cl.load_state_dict(nchw.state_dict())
    assert cl.model.backbone.layer3[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(cl(x), nchw(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("stage", "trains_backbone"),
    [
        ({"name": "linear_probe", "pretrained": True}, [False, False]),
        ({"name": "finetune", "pretrained": True, "unfreeze_at_epoch": 1}, [False, True]),
    ],
    ids=["linear_probe", "finetune"],
)
def test_freeze_schedules_hold_the_resnet9_backbone(synthetic_root, tmp_path, stage, trains_backbone):
    """The frozen epochs change neither the backbone's weights nor its batch-norm statistics."""
    torch.manual_seed(0)
    source = tmp_path / "source.pt"
    torch.save(build_model("resnet9", widths=TINY).state_dict(), source)
    module = ImageClassifier(
        model={"name": "resnet9", "widths": TINY, "weights_path": str(source)},
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        scheduler={"name": "none"},
        stage=stage,
        channels_last=True,
    )
    states = []

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            states.append({k: v.clone() for k, v in pl_module.model.backbone.state_dict().items()})

    dm = CIFAR10DataModule(root=str(synthetic_root), download=False, val_size=100, batch_size=50, strict_sizes=False)
    before = {k: v.clone() for k, v in module.model.backbone.state_dict().items()}
    head = module.model.head.weight.detach().clone()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[Snapshot()],
        limit_train_batches=2,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    changed = []
    previous = before
    for state in states:
        changed.append(any(not torch.equal(previous[k], state[k]) for k in state))
        previous = state
    assert changed == trains_backbone
    assert not torch.equal(module.model.head.weight, head)


def test_resnet9_options_on_another_model_are_a_config_error():
    with pytest.raises(ConfigError, match=r"model.widths, model.activation apply to resnet9 only, not resnet20"):
        build_model("resnet20", widths=[32, 64, 128, 256], activation="celu")
