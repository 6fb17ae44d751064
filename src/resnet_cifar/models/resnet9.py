"""David Page's ResNet-9 (DAWNBench 2018; "How to train your ResNet", davidcpage/cifar10-fast).

``prep`` conv (3 -> w0), then three stages that each double the width with a 3x3 conv and halve
the resolution with a 2x2 max-pool; ``layer1`` and ``layer3`` add a residual pair of conv blocks
(``x + block(block(x))``); a global max-pool and the linear head follow. Every conv is 3x3 without
bias, followed by batch norm and the activation. At the standard widths ``(64, 128, 256, 512)``:
6.57M parameters and 0.76 GFLOP per 32x32 image forward (five convs of ~75M multiply-adds each).

The knobs of Page's final recipe (``bag_of_tricks.ipynb``) are options:

- ``pool_before_bn``: ``conv, max-pool, BN, act`` in the stages instead of ``conv, BN, act,
  max-pool``: BN and the activation run on 4x fewer pixels (Page: faster, -0.1% at 24 epochs).
- ``activation="celu"`` with ``celu_alpha``: a smooth ReLU (Page: +0.2%; alpha 0.075, or 0.3 once
  the batch-norm scales are frozen at 1 instead of ~1/4).
- ``bn_scale_trainable=False``: the batch-norm scales stay at 1 (Page: they mostly follow weight
  decay; freezing them, with the larger LR of the BN biases, ``optimizer.bn_lr_ratio``, helps).
- ``output_scale``: the logits' scale (Page's ``Mul(0.125)`` after a bias-free linear layer; 1/16
  with frozen scales). Applied to the pooled features, so the head stays the plain ``nn.Linear``
  of :class:`~resnet_cifar.models.factory.Classifier` (``W (s f) + b = s (W f) + b``).

Page's GhostBatchNorm and patch-whitening first layer are not implemented (see the README).
Weights keep PyTorch's default initialisation, as in Page's code.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = ("relu", "celu")
STANDARD_WIDTHS = (64, 128, 256, 512)


class ConvBlock(nn.Sequential):
    """3x3 conv (no bias), batch norm, activation; with ``pool``, a 2x2 max-pool before or after BN + act."""

    def __init__(self, c_in: int, c_out: int, act: nn.Module, pool: bool = False, pool_before_bn: bool = False):
        layers: list[tuple[str, nn.Module]] = [("conv", nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))]
        if pool and pool_before_bn:
            layers.append(("pool", nn.MaxPool2d(2)))
        layers += [("bn", nn.BatchNorm2d(c_out)), ("act", act)]
        if pool and not pool_before_bn:
            layers.append(("pool", nn.MaxPool2d(2)))
        super().__init__(OrderedDict(layers))


class Residual(nn.Module):
    """``x + res2(res1(x))`` with two width-preserving :class:`ConvBlock` s."""

    def __init__(self, c: int, make_act) -> None:
        super().__init__()
        self.res1 = ConvBlock(c, c, make_act())
        self.res2 = ConvBlock(c, c, make_act())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res2(self.res1(x))


class ResNet9(nn.Module):
    """Feature extractor: images -> pooled features of size :attr:`out_features` (times ``output_scale``)."""

    def __init__(
        self,
        widths: Sequence[int] = STANDARD_WIDTHS,
        activation: str = "relu",
        celu_alpha: float = 0.075,
        pool_before_bn: bool = False,
        output_scale: float = 0.125,
        bn_scale_trainable: bool = True,
    ) -> None:
        super().__init__()
        w0, w1, w2, w3 = (int(w) for w in widths)

        def make_act() -> nn.Module:
            return nn.CELU(celu_alpha) if activation == "celu" else nn.ReLU(inplace=True)

        def stage(c_in: int, c_out: int) -> ConvBlock:
            return ConvBlock(c_in, c_out, make_act(), pool=True, pool_before_bn=pool_before_bn)

        self.prep = ConvBlock(3, w0, make_act())
        self.layer1 = nn.Sequential(stage(w0, w1), Residual(w1, make_act))
        self.layer2 = stage(w1, w2)
        self.layer3 = nn.Sequential(stage(w2, w3), Residual(w3, make_act))
        # Page's MaxPool2d(4) on the 4x4 map of a 32x32 input; adaptive, so larger inputs work too
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.output_scale = float(output_scale)
        self.out_features = w3
        if not bn_scale_trainable:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False)  # stays at its initial 1; out of the optimizer's groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.pool(x) * self.output_scale
