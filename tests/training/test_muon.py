"""Muon on the conv filters, SGD on the rest (training/muon.py), and the groups that feed it (training/optim.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resnet_cifar.models import build_model
from resnet_cifar.training.muon import MuonSGD, orthogonalize
from resnet_cifar.training.optim import build_optimizer

AIRBENCH = dict(widths=[24, 16, 32, 32], stem="whiten", tails=["conv", "conv", "conv"], bn_scale_trainable=False)
MUON = {
    "name": "muon",
    "lr": 0.2,
    "momentum": 0.85,
    "nesterov": True,
    "weight_decay": 5e-4,
    "no_decay_bn_bias": False,
    "bn_lr_ratio": 64.0,
    "muon_lr": 0.05,
    "muon_momentum": 0.6,
    "muon_nesterov": True,
    "muon_ns_steps": 5,
    "muon_weight_decay": 0.0,
    "muon_normalize": True,
}


@pytest.mark.parametrize("shape", [(16, 144), (144, 16)], ids=["wide", "tall"])
def test_orthogonalize_keeps_the_singular_vectors_and_flattens_the_singular_values(shape):
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g))
    s = torch.logspace(0, -1.5, min(shape))  # condition number ~32
    out = orthogonalize(u @ torch.diag(s) @ v.T, steps=5, dtype=torch.float32)
    assert out.shape == shape
    inner = u.T @ out @ v  # diagonal when the singular vectors are kept
    off = inner - torch.diag(torch.diagonal(inner))
    assert off.abs().max() < 1e-3
    sv = torch.diagonal(inner)
    assert sv.min() > 0.6 and sv.max() < 1.25  # quintic Newton-Schulz: near 1, not at 1 (from 0.03 to 1 here)


def test_sgd_groups_step_exactly_as_torch_sgd():
    torch.manual_seed(0)
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    groups = [{"params": [a], "lr": 0.1, "weight_decay": 1e-2}]
    mine = MuonSGD([{"params": [a.clone().requires_grad_()], "lr": 0.1, "weight_decay": 1e-2}], lr=0.1, momentum=0.9)
    ref = torch.optim.SGD([{**groups[0], "params": [b.copy_(a).requires_grad_()]}], lr=0.1, momentum=0.9, nesterov=True)
    for step in range(3):
        grad = torch.randn(5, 3, generator=torch.Generator().manual_seed(step))
        mine.param_groups[0]["params"][0].grad = grad.clone()
        ref.param_groups[0]["params"][0].grad = grad.clone()
        mine.step()
        ref.step()
    torch.testing.assert_close(mine.param_groups[0]["params"][0], ref.param_groups[0]["params"][0], rtol=0, atol=0)


@pytest.mark.parametrize("normalize", [True, False])
def test_muon_step_on_a_conv_filter_by_hand(normalize):
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    p = nn.Parameter(w.clone())
    opt = MuonSGD(
        [{"params": [p], "muon": True, "lr": 0.05, "weight_decay": 0.1}],
        lr=1.0,
        muon_momentum=0.6,
        ns_steps=5,
        normalize=normalize,
    )
    buf, expected = torch.zeros(8, 36), w.clone()
    for step in range(2):
        grad = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(step))
        p.grad = grad.clone()
        opt.step()
        g = grad.reshape(8, 36)
        buf = buf.lerp(g, 0.4)  # torch.optim.Muon's momentum: buf <- 0.6 buf + 0.4 g; Nesterov: lerp(g, buf, 0.6)
        update = orthogonalize(g.lerp(buf, 0.6), 5, opt_dtype(p)).view(8, 4, 3, 3)
        expected = expected * (8**0.5 / expected.norm()) if normalize else expected * (1 - 0.05 * 0.1)
        expected = expected - 0.05 * update.float()
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    assert opt.state[p]["momentum_buffer"].shape == (8, 36)


def opt_dtype(p: torch.Tensor) -> torch.dtype:
    from resnet_cifar.training.muon import fast_dtype

    return fast_dtype(p.device.type)


def test_muon_groups_hold_the_conv_filters_and_sgd_the_rest():
    torch.manual_seed(0)
    model = build_model("resnet9", **AIRBENCH)
    opt = build_optimizer(MUON, model)
    assert isinstance(opt, MuonSGD)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"head", "backbone_bn", "backbone_muon"}
    filters = [m.weight for m in model.backbone.modules() if type(m) is nn.Conv2d]
    assert {id(p) for p in groups["backbone_muon"]["params"]} == {id(p) for p in filters}
    assert groups["backbone_muon"]["muon"] and groups["backbone_muon"]["lr"] == 0.05
    whitening = model.backbone.whitening
    assert id(whitening.weight) not in {id(p) for g in opt.param_groups for p in g["params"]}  # frozen
    bn_group = {id(p) for p in groups["backbone_bn"]["params"]}
    assert id(whitening.bias) in bn_group  # trained as the batch-norm biases are, at bn_lr_ratio x lr
    assert groups["backbone_bn"]["lr"] == pytest.approx(0.2 * 64) and not groups["backbone_bn"]["muon"]
    assert not groups["head"]["muon"] and groups["head"]["lr"] == 0.2
    # a step moves every trainable parameter and keeps each filter bank at the norm sqrt(out channels) + a step
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    whitening.fit(x)
    before = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(not torch.equal(before[id(p)], p) for g in opt.param_groups for p in g["params"])


def test_muon_groups_refuse_vectors():
    with pytest.raises(ValueError, match="matrices and conv filters"):
        MuonSGD([{"params": [nn.Parameter(torch.zeros(3))], "muon": True}], lr=0.1)
