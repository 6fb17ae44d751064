"""Batched, on-device augmentation for uint8 image batches.

Randomness is counter-based: each image's crop offset, flip and cutout box are a hash of
``(seed, epoch, image index)``. So the augmentation of an image does not depend on the
batch it lands in, the device, the number of processes, or where a run was resumed:
the same seed gives the same augmented images, always.

Crop and flip are fused into one gather over the zero-padded batch; the conversion to the
model's input is :class:`~resnet_cifar.data.preprocess.Preprocess`, shared with every other path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from resnet_cifar.data.preprocess import Preprocess

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function on int64 tensors with values in [0, 2**32)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def random_bits(index: torch.Tensor, seed: int, epoch: int, stream: int) -> torch.Tensor:
    """Independent pseudo-random 32-bit integers for each index, one stream per purpose."""
    h = _hash32((index.long() + (stream * 0x9E3779B9)) & _MASK32)
    h = _hash32(h ^ (seed & _MASK32))
    return _hash32(h ^ ((epoch * 0x85EBCA6B) & _MASK32))


def random_ints(index: torch.Tensor, seed: int, epoch: int, stream: int, high: int) -> torch.Tensor:
    """Integers in ``[0, high)`` per index (modulo bias below 1e-6 for small ``high``)."""
    return random_bits(index, seed, epoch, stream) % high


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Positions ``i`` in ``[-(n - 1), 2 (n - 1)]`` mirrored into ``[0, n)`` as ``F.pad(mode="reflect")`` does."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


class BatchAugment:
    """Turn uint8 ``(B, 3, H, W)`` batches into normalised float batches.

    Args:
        mean, std: per-channel statistics in [0, 1] units.
        crop_padding: padding for the random crop (a shift of up to this many pixels); 0 disables the crop.
        padding_mode: ``zeros`` (the padding is black, before normalisation) or ``reflect`` (the image
            mirrored at its border, airbench94's: no black bars, so every pixel the network sees is real).
        flip: random horizontal flip with probability 1/2.
        alternating_flip: with ``flip``, draw each image's flip once (epoch 0) and invert it every
            other epoch (airbench94's "alternating flip"): any two consecutive epochs show every
            image both ways, where independent draws repeat the same side half of the time.
        cutout: side of a square zeroed (after normalisation, i.e. set to the mean) at a
            random centre, as in DeVries & Taylor 2017; 0 disables it.
        image_size: output side; images are resized (see :class:`Preprocess`) when it differs from H.
        seed: seed of the counter-based random draws.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 4,
        flip: bool = True,
        cutout: int = 0,
        image_size: int = 32,
        seed: int = 0,
        alternating_flip: bool = False,
        padding_mode: str = "zeros",
    ) -> None:
        self.preprocess = Preprocess(mean, std, image_size)
        self.crop_padding = crop_padding
        self.padding_mode = padding_mode
        self.flip = flip
        self.alternating_flip = alternating_flip
        self.cutout = cutout
        self.image_size = image_size
        self.seed = seed

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> the model's input (scaled, resized, normalised): :class:`Preprocess`."""
        return self.preprocess(images)

    def crop_flip(self, images: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """Per-image random crop (of the padded image) and horizontal flip, as one gather."""
        b, c, h, w = images.shape
        p = self.crop_padding
        dev = images.device
        if p == 0 and not self.flip:
            return images
        reflect = self.padding_mode == "reflect"
        # zeros: gather from the zero-padded batch; reflect: from the batch itself, at mirrored positions
        padded = F.pad(images, (p, p, p, p)) if p and not reflect else images
        hp, wp = padded.shape[-2:]
        oy = random_ints(index, self.seed, epoch, 0, 2 * p + 1) if p else torch.zeros(b, dtype=torch.long, device=dev)
        ox = random_ints(index, self.seed, epoch, 1, 2 * p + 1) if p else torch.zeros(b, dtype=torch.long, device=dev)
        ar_h = torch.arange(h, device=dev)
        ar_w = torch.arange(w, device=dev)
        cols = ar_w.expand(b, w)
        if self.flip:
            flip = random_ints(index, self.seed, 0 if self.alternating_flip else epoch, 2, 2).bool()
            if self.alternating_flip and epoch % 2:
                flip = ~flip
            cols = torch.where(flip[:, None], (w - 1 - ar_w).expand(b, w), cols)
        rows = oy[:, None] + ar_h  # (B, H), in padded coordinates
        cols = ox[:, None] + cols  # (B, W)
        if reflect and p:  # padded -> source coordinates, mirrored at the border (without repeating it)
            rows, cols = _reflect(rows - p, h), _reflect(cols - p, w)
        flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        out = padded.reshape(b, c, hp * wp).gather(2, flat)
        return out.reshape(b, c, h, w)

    def apply_cutout(self, x: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        b, _, h, w = x.shape
        s = self.cutout * h // 32 if h != 32 else self.cutout  # scale the box with the image
        cy = random_ints(index, self.seed, epoch, 3, h)
        cx = random_ints(index, self.seed, epoch, 4, w)
        ar_h = torch.arange(h, device=x.device)
        ar_w = torch.arange(w, device=x.device)
        y0 = (cy - s // 2)[:, None]
        x0 = (cx - s // 2)[:, None]
        in_y = (ar_h >= y0) & (ar_h < y0 + s)  # (B, H)
        in_x = (ar_w >= x0) & (ar_w < x0 + s)  # (B, W)
        mask = (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1)
        return x.masked_fill(mask, 0.0)

    def __call__(self, images: torch.Tensor, index: torch.Tensor, epoch: int, train: bool) -> torch.Tensor:
        if not train:
            return self.normalize(images)
        x = self.normalize(self.crop_flip(images, index, epoch))
        if self.cutout:
            x = self.apply_cutout(x, index, epoch)
        return x
