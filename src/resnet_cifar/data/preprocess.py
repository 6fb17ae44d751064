"""The one preprocessing of model inputs: uint8 (or [0, 1] float) RGB -> resized, normalised float.

Training (both loaders), evaluation, ``predict`` and the exported models all call this module,
so an image is prepared the same way everywhere. Its settings (``mean``, ``std``,
``image_size``) are the data module's hyperparameters, saved in every checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Preprocess(nn.Module):
    """Scale to [0, 1], resize to ``image_size`` (bilinear; antialiased when shrinking), normalise.

    Takes ``(N, 3, H, W)`` or ``(3, H, W)`` tensors, uint8 (0-255) or float ([0, 1]). A
    ``nn.Module`` so that ``export`` puts it inside the exported graph and per-sample
    pipelines can hold it as their last transform. Normalising before or after the resize
    gives the same result (both are linear and the interpolation weights sum to one).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], image_size: int = 32) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        # uint8 -> normalised in one multiply-add; not saved (derived from mean and std)
        self.register_buffer("uint8_scale", 1.0 / (255.0 * self.std), persistent=False)
        self.register_buffer("uint8_shift", -self.mean / self.std, persistent=False)
        self.image_size = int(image_size)

    @classmethod
    def from_data_hparams(cls, hp: Mapping[str, Any]) -> Preprocess:
        """The preprocessing of a checkpoint's data settings (``datamodule_hyper_parameters``)."""
        return cls(hp["mean"], hp["std"], hp["image_size"])

    def settings(self) -> dict[str, Any]:
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(), "image_size": self.image_size}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        single = images.dim() == 3
        x = images.unsqueeze(0) if single else images
        if self.mean.device != x.device:  # follow the input once (not two host-to-device copies per batch)
            self.to(x.device)
        if x.dtype == torch.uint8:  # scaled to [0, 1] and normalised in one fused multiply-add
            x = torch.addcmul(self.uint8_shift, x.float(), self.uint8_scale)
        else:
            x = (x - self.mean) / self.std
        h, w = x.shape[-2:]
        if (h, w) != (self.image_size, self.image_size):
            shrink = self.image_size < min(h, w)  # antialiasing only changes a downscale
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=shrink
            )
        return x.squeeze(0) if single else x
