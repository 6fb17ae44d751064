"""The CIFAR ResNets of He et al. 2016 ("Deep Residual Learning", section 4.2).

A 3x3 stem with 16 channels, then three stages of ``n`` residual blocks with 16, 32 and
64 channels (stride 2 between stages), global average pooling. Depth is ``6n + 2`` with
basic blocks (ResNet-20/32/44/56/110) or ``9n + 2`` with bottleneck blocks (ResNet-164
of He et al. 2016b). The paper's CIFAR models use identity shortcuts with zero-padded
channels (option A); option B uses 1x1 projections where the shape changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from resnet_cifar.errors import ConfigError


class PadShortcut(nn.Module):
    """Option A: subsample spatially and zero-pad the new channels (no parameters)."""

    def __init__(self, out_channels: int, stride: int) -> None:
        super().__init__()
        self.out_channels, self.stride = out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        pad = self.out_channels - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2))


def _shortcut(in_ch: int, out_ch: int, stride: int, option: str) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    if option == "A":
        return PadShortcut(out_ch, stride)
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = _shortcut(in_ch, width, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, shortcut: str) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class CifarResNet(nn.Module):
    """Feature extractor: images -> pooled features of size :attr:`out_features`."""

    def __init__(self, depth: int, block: str = "basic", shortcut: str = "A", widths=(16, 32, 64)) -> None:
        super().__init__()
        per_block = 2 if block == "basic" else 3
        if depth < 2 + 3 * per_block or (depth - 2) % (3 * per_block):
            raise ConfigError(
                f"depth {depth} does not fit {block} blocks: it must be {3 * per_block}n + 2 "
                f"(e.g. {3 * per_block + 2}, {6 * per_block + 2})"
            )
        n = (depth - 2) // (3 * per_block)
        cls = BasicBlock if block == "basic" else Bottleneck
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, in_ch = [], widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(cls(in_ch, width, 2 if (i > 0 and j == 0) else 1, shortcut))
                in_ch = width * cls.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # zero-init the last BN of each residual branch (Goyal et al.)
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)
            elif isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layer3(self.layer2(self.layer1(self.stem(x)))))
