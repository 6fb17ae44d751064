"""David Page's ResNet-9 (DAWNBench 2018; "How to train your ResNet", davidcpage/cifar10-fast) and its descendants.

``prep`` (3 -> w0), then three stages that each widen with a 3x3 conv and halve the resolution with a
2x2 max-pool, each followed by a *tail*; a global max-pool and the linear head follow. Every conv is
3x3 without bias, followed by batch norm and the activation. Page's network has the tails
``(residual, none, residual)`` (``x + block(block(x))`` after the first and third stages): at his
widths ``(64, 128, 256, 512)``, 6.57M parameters and 0.76 GFLOP per 32x32 image forward.

The knobs of Page's final recipe (``bag_of_tricks.ipynb``) are options:

- ``pool_before_bn``: ``conv, max-pool, BN, act`` in the stages instead of ``conv, BN, act,
  max-pool``: BN and the activation run on 4x fewer pixels (Page: faster, -0.1% at 24 epochs).
- ``activation="celu"`` with ``celu_alpha``: a smooth ReLU (Page: +0.2%; alpha 0.075, or 0.3 once
  the batch-norm scales are frozen at 1 instead of ~1/4). ``gelu``: airbench94's.
- ``bn_scale_trainable=False``: the batch-norm scales stay at 1 (Page: they mostly follow weight
  decay; freezing them, with the larger LR of the BN biases, ``optimizer.bn_lr_ratio``, helps).
- ``output_scale``: the logits' scale (Page's ``Mul(0.125)`` after a bias-free linear layer; 1/16
  with frozen scales). Applied to the pooled features, so the head stays the plain ``nn.Linear``
  of :class:`~resnet_cifar.models.factory.Classifier` (``W (s f) + b = s (W f) + b``).
- ``ghost_batch``: batch-norm statistics over slices of that many images in training (Page's
  GhostBatchNorm, :class:`GhostBatchNorm2d`); evaluation uses the running statistics as usual.

And those of its descendants, hlb-CIFAR10 and airbench94 (Keller Jordan, 2024):

- ``stem="whiten"``: a frozen 2x2 patch-whitening conv (:class:`PatchWhitening`) instead of the
  3x3 prep conv: its 24 filters are the eigenvectors of the training images' 2x2-patch covariance
  (and their negatives), scaled to unit variance, so the first trained layer sees decorrelated
  inputs. The filters come from the data at the start of training (the LightningModule calls
  :meth:`ResNet9.fit_whitening`); checkpoints carry them.
- ``tails``: per stage ``residual`` (Page), ``conv`` (one more conv block, airbench94's two-conv
  groups without a shortcut) or ``none``. airbench94 is ``stem=whiten, widths=[24, 64, 256, 256],
  tails=[conv, conv, conv], activation=gelu``: wide and cheap at low resolution.
- ``bn_momentum``, ``bn_eps``: batch-norm running-statistics momentum (torch's convention: the
  weight of the new batch) and epsilon; airbench94: 0.4 and 1e-12.
- ``dirac_init``: each conv starts as the identity on its first input channels (airbench94), the
  rest of PyTorch's default initialisation kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("relu", "celu", "gelu")
STEMS = ("conv", "whiten")
TAILS = ("residual", "conv", "none")
STANDARD_WIDTHS = (64, 128, 256, 512)
PAGE_TAILS = ("residual", "none", "residual")
WHITENING_KERNEL = 2
WHITENING_WIDTH = 2 * 3 * WHITENING_KERNEL**2  # every eigenvector of a 2x2x3 patch, and its negative


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Batch norm whose training statistics are taken over slices of ``ghost_batch`` images.

    Page's GhostBatchNorm (slices of 32 in batches of 512): noisier statistics regularise like small
    batches while the step keeps the large batch's throughput. The running statistics average the
    slices' (so evaluation is plain batch norm). torch has no ghost batch norm; the slices are
    ``torch.split``'s consecutive images, each one ``F.batch_norm`` on a view of the batch, concatenated:
    a channels_last batch stays channels_last (cifar10-fast's reshape to ``(B / S, S * C, H, W)``, slice
    ``i mod S``, copied it to the contiguous format and back at every layer). Image ``i`` lands in slice
    ``i // ghost_batch``. A batch whose size is not a multiple of ``ghost_batch`` (the last of an epoch)
    is normalised whole.
    """

    def __init__(self, num_features: int, ghost_batch: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.ghost_batch = int(ghost_batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if not self.training or b % self.ghost_batch or b == self.ghost_batch:
            return super().forward(x)
        s = b // self.ghost_batch
        # each slice updates its own copy of the running statistics (a row, in place); they are averaged after
        means, variances = self.running_mean.repeat(s, 1), self.running_var.repeat(s, 1)
        parts = [
            F.batch_norm(
                part,
                means[k],
                variances[k],
                self.weight,
                self.bias,
                training=True,
                momentum=self.momentum,
                eps=self.eps,
            )
            for k, part in enumerate(x.split(self.ghost_batch))
        ]
        with torch.no_grad():
            self.running_mean.copy_(means.mean(0))
            self.running_var.copy_(variances.mean(0))
            self.num_batches_tracked.add_(1)
        return torch.cat(parts)


class GlobalMaxPool(nn.Module):
    """``(B, C, H, W) -> (B, C)``: the maximum over each map, as ``AdaptiveMaxPool2d(1)`` then ``Flatten``.

    Written as ``amax``: ``adaptive_max_pool2d`` has no deterministic CUDA backward, so
    ``trainer.deterministic=true`` (``torch.use_deterministic_algorithms``) would fail on a GPU; amax's has.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax((-2, -1))


class ConvBlock(nn.Sequential):
    """3x3 conv (no bias), batch norm, activation; with ``pool``, a 2x2 max-pool before or after BN + act."""

    def __init__(
        self, c_in: int, c_out: int, act: nn.Module, norm: nn.Module, pool: bool = False, pool_before_bn=False
    ):
        layers: list[tuple[str, nn.Module]] = [("conv", nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))]
        if pool and pool_before_bn:
            layers.append(("pool", nn.MaxPool2d(2)))
        layers += [("bn", norm), ("act", act)]
        if pool and not pool_before_bn:
            layers.append(("pool", nn.MaxPool2d(2)))
        super().__init__(OrderedDict(layers))


class Residual(nn.Module):
    """``x + res2(res1(x))`` with two width-preserving :class:`ConvBlock` s."""

    def __init__(self, res1: ConvBlock, res2: ConvBlock) -> None:
        super().__init__()
        self.res1, self.res2 = res1, res2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res2(self.res1(x))


class PatchWhitening(nn.Conv2d):
    """A 2x2 conv (no padding) whose frozen filters whiten the 2x2 patches of the training images.

    :meth:`fit` sets the filters from normalised training images: with ``C`` the (uncentred)
    covariance of their 12-value patches and ``C = V diag(l) V^T``, the filters are
    ``v_i / sqrt(l_i + eps)`` and their negatives (24 channels: the activation that follows would
    otherwise discard half of each direction). airbench94's first layer; its bias trains.
    A 32x32 image gives a 31x31 map.
    """

    def __init__(self, eps: float = 5e-4) -> None:
        super().__init__(3, WHITENING_WIDTH, WHITENING_KERNEL, padding=0, bias=True)
        self.eps = eps
        self.weight.requires_grad_(False)
        with torch.no_grad():
            self.weight.zero_()  # unfitted: see `fitted`

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` (or loaded weights) set the filters; they start at zero."""
        return bool(self.weight.any())

    @torch.no_grad()
    def fit(self, images: torch.Tensor, chunk: int = 1000) -> None:
        k = WHITENING_KERNEL
        dim = 3 * k * k
        cov = torch.zeros(dim, dim, dtype=torch.float64, device=images.device)
        count = 0
        for part in images.split(chunk):
            # (N, 3, H', W', k, k) -> one row per patch, laid out as the conv's (3, k, k) filters
            patches = part.float().unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, dim)
            cov += (patches.T @ patches).double()
            count += len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov / count)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp(min=0) + self.eps)[:, None]).reshape(-1, 3, k, k)
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight))


class WhiteningStem(nn.Sequential):
    """:class:`PatchWhitening` followed by the activation."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__(OrderedDict([("whiten", PatchWhitening()), ("act", act)]))


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
        stem: str = "conv",
        tails: Sequence[str] = PAGE_TAILS,
        ghost_batch: int = 0,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        dirac_init: bool = False,
    ) -> None:
        super().__init__()
        w0, w1, w2, w3 = (int(w) for w in widths)
        if stem == "whiten" and w0 != WHITENING_WIDTH:
            raise ValueError(f"stem='whiten' makes {WHITENING_WIDTH} channels, widths[0] is {w0}")

        def act() -> nn.Module:
            return {"celu": lambda: nn.CELU(celu_alpha), "gelu": nn.GELU}.get(activation, lambda: nn.ReLU(True))()

        def norm(c: int) -> nn.Module:
            options = dict(momentum=bn_momentum, eps=bn_eps)
            return GhostBatchNorm2d(c, ghost_batch, **options) if ghost_batch else nn.BatchNorm2d(c, **options)

        def block(c_in: int, c_out: int, pool: bool = False) -> ConvBlock:
            return ConvBlock(c_in, c_out, act(), norm(c_out), pool=pool, pool_before_bn=pool_before_bn)

        def layer(c_in: int, c_out: int, tail: str) -> nn.Module:
            stage = block(c_in, c_out, pool=True)
            if tail == "none":
                return stage
            return nn.Sequential(
                stage, Residual(block(c_out, c_out), block(c_out, c_out)) if tail == "residual" else block(c_out, c_out)
            )

        self.prep = WhiteningStem(act()) if stem == "whiten" else block(3, w0)
        self.layer1 = layer(w0, w1, tails[0])
        self.layer2 = layer(w1, w2, tails[1])
        self.layer3 = layer(w2, w3, tails[2])
        # Page's MaxPool2d(4) on the 4x4 map of a 32x32 input; adaptive, so larger inputs work too
        self.pool = GlobalMaxPool()
        self.output_scale = float(output_scale)
        self.out_features = w3
        if dirac_init:
            for m in self.modules():
                if isinstance(m, nn.Conv2d) and not isinstance(m, PatchWhitening):
                    with torch.no_grad():
                        nn.init.dirac_(m.weight[: min(m.in_channels, m.out_channels)])
        if not bn_scale_trainable:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False)  # stays at its initial 1; out of the optimizer's groups

    @property
    def whitening(self) -> PatchWhitening | None:
        """The patch-whitening layer of ``stem="whiten"``, else None."""
        return self.prep.whiten if isinstance(self.prep, WhiteningStem) else None

    def fit_whitening(self, images: torch.Tensor) -> None:
        """Set the whitening filters from normalised training images (no-op without ``stem="whiten"``)."""
        if self.whitening is not None:
            self.whitening.fit(images)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.pool(x) * self.output_scale


def conv_flops(widths: Sequence[int], stem: str = "conv", tails: Sequence[str] = PAGE_TAILS, size: int = 32) -> int:
    """Multiply-adds of the convolutions of one ``size`` x ``size`` image forward (for the docs and tests)."""
    w0, w1, w2, w3 = widths
    if stem == "whiten":
        total, s = 3 * WHITENING_KERNEL**2 * w0 * (size - 1) ** 2, size - 1
    else:
        total, s = 9 * 3 * w0 * size**2, size
    for c_in, c_out, tail in ((w0, w1, tails[0]), (w1, w2, tails[1]), (w2, w3, tails[2])):
        total += 9 * c_in * c_out * s * s
        s //= 2
        total += {"residual": 2, "conv": 1, "none": 0}[tail] * 9 * c_out * c_out * s * s
    return total


__all__ = ["ResNet9", "PatchWhitening", "GhostBatchNorm2d", "GlobalMaxPool", "conv_flops"]
