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


# ------------------------------------------------------------------ the descendants' options
AIRBENCH = dict(widths=[24, 64, 256, 256], stem="whiten", tails=["conv", "conv", "conv"], activation="gelu")


def test_airbench_layout_matches_its_hand_count():
    """stem=whiten, tails=conv: a 2x2 conv (with bias) to 24 channels at 31x31, then per stage a pooled conv
    and one more conv, no shortcuts: airbench94's network (its head has no bias, ours has)."""
    w0, w1, w2, w3 = AIRBENCH["widths"]
    model = build_model("resnet9", **AIRBENCH).eval()
    convs = [(w0, w1, 31), (w1, w1, 15), (w1, w2, 15), (w2, w2, 7), (w2, w3, 7), (w3, w3, 3)]
    whiten = 3 * 4 * w0
    params = whiten + w0 + sum(9 * a * b for a, b, _ in convs) + 2 * 2 * (w1 + w2 + w3) + w3 * 10 + 10
    assert n_params(model) == params
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    macs = whiten * 31 * 31 + sum(9 * a * b * s * s for a, b, s in convs) + w3 * 10
    assert counter.get_total_flops() == 2 * macs
    assert isinstance(model.backbone.prep.act, nn.GELU)
    assert [type(m).__name__ for m in model.backbone.layer2] == ["ConvBlock", "ConvBlock"]


def _correlated_images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth, correlated images (neighbouring pixels and channels alike), as natural images are."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 17, 17, generator=g)
    x = nn.functional.interpolate(base, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return x + 0.1 * torch.randn(n, 3, 32, 32, generator=g) + torch.tensor([0.5, 0.0, -0.5]).view(1, 3, 1, 1)


def test_patch_whitening_decorrelates_the_training_patches():
    from resnet_cifar.models.resnet9 import PatchWhitening

    layer = PatchWhitening(eps=1e-6)
    assert not layer.fitted and not layer.weight.requires_grad
    images = _correlated_images(200)
    layer.fit(images, chunk=64)  # chunks: the covariance is accumulated, not computed at once
    assert layer.fitted
    with torch.no_grad():
        out = nn.functional.conv2d(images, layer.weight)  # bias aside: the filters only
    first, second = out[:, :12], out[:, 12:]
    torch.testing.assert_close(second, -first)  # each direction and its negative
    z = first.permute(0, 2, 3, 1).reshape(-1, 12).double()
    second_moment = z.T @ z / len(z)
    torch.testing.assert_close(second_moment, torch.eye(12, dtype=torch.float64), atol=2e-3, rtol=0)
    raw = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    assert (raw.T @ raw / len(raw) - torch.eye(12, dtype=torch.float64)).abs().max() > 0.5  # it was not white


def test_ghost_batchnorm_normalises_each_slice_and_averages_the_running_statistics():
    from resnet_cifar.models.resnet9 import GhostBatchNorm2d

    torch.manual_seed(0)
    bn = GhostBatchNorm2d(3, ghost_batch=4, momentum=0.5).train()
    x = torch.randn(12, 3, 5, 5)
    x[4:8] += 4.0  # slice 1 (images 4 to 7) shifted: one statistic over the batch would not centre it
    x = x.contiguous(memory_format=torch.channels_last)
    y = bn(x)
    for j in range(3):  # S = 12 / 4 = 3 slices; image i is in slice i // 4, normalised by its slice's statistics
        part = x[4 * j : 4 * j + 4]
        mean, var = part.mean(dim=(0, 2, 3), keepdim=True), part.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        torch.testing.assert_close(y[4 * j : 4 * j + 4], (part - mean) / torch.sqrt(var + bn.eps), atol=1e-5, rtol=1e-5)
    slice_means = torch.stack([x[4 * j : 4 * j + 4].mean(dim=(0, 2, 3)) for j in range(3)]).mean(0)
    torch.testing.assert_close(bn.running_mean, 0.5 * slice_means)  # from 0, momentum 0.5
    plain = nn.BatchNorm2d(3).train()
    assert plain(x)[4:8].mean() > 0.5  # whole-batch statistics leave slice 1 off centre
    bn.eval()
    torch.testing.assert_close(bn(x), nn.functional.batch_norm(x, bn.running_mean, bn.running_var, eps=bn.eps))
    odd = bn.train()(torch.randn(6, 3, 5, 5))  # not a multiple of 4: normalised whole
    torch.testing.assert_close(odd.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def _cifar10_fast_ghost_bn(bn: nn.BatchNorm2d, x: torch.Tensor, s: int) -> torch.Tensor:
    """The reshape implementation GhostBatchNorm2d had (cifar10-fast's): image i in slice i mod s."""
    b, c, h, w = x.shape
    mean, var = bn.running_mean.repeat(s), bn.running_var.repeat(s)
    y = nn.functional.batch_norm(
        x.reshape(b // s, s * c, h, w), mean, var, bn.weight.repeat(s), bn.bias.repeat(s), True, bn.momentum, bn.eps
    )
    with torch.no_grad():
        bn.running_mean.copy_(mean.view(s, c).mean(0))
        bn.running_var.copy_(var.view(s, c).mean(0))
    return y.reshape(b, c, h, w)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_ghost_batchnorm_keeps_the_memory_format_and_the_reshape_implementations_values(memory_format):
    """A channels_last batch comes out channels_last (no copy to NCHW and back at every layer), with the values,
    gradients and running statistics of the reshape implementation on the same slices (there: i mod S)."""
    from resnet_cifar.models.resnet9 import GhostBatchNorm2d

    torch.manual_seed(0)
    g, s = 4, 3
    bn = GhostBatchNorm2d(5, ghost_batch=g, momentum=0.3).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    reference = nn.BatchNorm2d(5, momentum=0.3).train()
    reference.load_state_dict(bn.state_dict())
    x = (torch.randn(g * s, 5, 6, 6) * 3 + 1).contiguous(memory_format=memory_format).requires_grad_()
    y = bn(x)
    assert y.is_contiguous(memory_format=memory_format)
    # image k * g + j (slice k here) is image j * s + k there (slice k as well)
    interleave = torch.arange(g * s).view(s, g).T.reshape(-1)
    expected = torch.empty_like(y)
    expected[interleave] = _cifar10_fast_ghost_bn(reference, x[interleave], s)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(bn.running_mean, reference.running_mean)
    torch.testing.assert_close(bn.running_var, reference.running_var)
    weights = torch.randn_like(y)
    (grad,) = torch.autograd.grad((y * weights).sum(), x)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(grad, expected_grad)


def test_ghost_batch_and_batchnorm_options_reach_every_norm():
    from resnet_cifar.models.resnet9 import GhostBatchNorm2d

    model = ResNet9(TINY, ghost_batch=8, bn_momentum=0.4, bn_eps=1e-12)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 8 and all(isinstance(m, GhostBatchNorm2d) and m.ghost_batch == 8 for m in norms)
    assert all(m.momentum == 0.4 and m.eps == 1e-12 for m in norms)


def test_dirac_init_starts_each_conv_as_the_identity():
    torch.manual_seed(0)
    model = ResNet9([24, 16, 32, 32], stem="whiten", tails=["conv"] * 3, dirac_init=True)
    conv = model.layer1[1].conv  # 16 -> 16: the identity
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(conv(x), x)
    widening = model.layer2[0].conv.weight  # 16 -> 32: identity on the first 16 outputs, default init after
    torch.testing.assert_close(widening[:16], nn.init.dirac_(torch.empty(16, 16, 3, 3)))
    assert widening[16:].abs().sum() > 0
    assert not model.whitening.fitted  # the whitening filters are left to the data


def test_whiten_stem_needs_24_channels():
    with pytest.raises(ValueError, match="24 channels"):
        ResNet9([32, 64, 128, 256], stem="whiten")
