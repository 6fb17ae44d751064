"""Model factory: a name and options in, a :class:`Classifier` (backbone + head) out."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from resnet_cifar.errors import ConfigError, WeightsError
from resnet_cifar.models.cifar_resnet import CifarResNet
from resnet_cifar.models.resnet9 import ResNet9
from resnet_cifar.models.weights import extract_state_dict, load_matching, safe_load
from resnet_cifar.progress import show_progress

log = logging.getLogger(__name__)

TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CIFAR_MODELS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
# Models built for 32x32 inputs from scratch, beside the CIFAR ResNets: Page's ResNet-9 (models/resnet9.py).
FAST_MODELS = ("resnet9",)
MODELS = (*CIFAR_MODELS, *FAST_MODELS, *TORCHVISION_MODELS)
# build_model's arguments that say where initial weights come from, not what the network is.
WEIGHTS_OPTIONS = ("pretrained", "weights", "weights_path", "load_head")


def architecture(model_options: dict[str, Any]) -> dict[str, Any]:
    """The ``model`` config's entries that define the network (every option but :data:`WEIGHTS_OPTIONS`):
    what rebuilds it elsewhere, e.g. from an export's metadata (``build_model(**architecture(...))``)."""
    return {k: v for k, v in model_options.items() if k not in WEIGHTS_OPTIONS}


class Classifier(nn.Module):
    """``backbone`` (images -> features) followed by a linear ``head`` (features -> logits).

    The freeze schedule and partial weight loading address parameters by these two names.
    """

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = (
            nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))
            if dropout
            else nn.Linear(num_features, num_classes)
        )
        self.num_features, self.num_classes = num_features, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _torchvision_backbone(name: str, cifar_stem: bool) -> tuple[nn.Module, int]:
    net = torchvision.models.get_model(name, weights=None)
    if cifar_stem:  # 3x3 stride-1 stem without max-pool: keeps 32x32 inputs at 32x32
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    features = net.fc.in_features
    net.fc = nn.Identity()
    return net, features


def imagenet_state_dict(name: str, weights: str = "DEFAULT") -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for ``name`` (from the cache under ``TORCH_HOME``, or downloaded).

    Written out instead of ``WeightsEnum.get_state_dict``: that one unpickles a cached file
    without ``weights_only`` and without checking its hash, so a file placed in the cache by
    hand could run code. Here the file (cached or just downloaded, with a progress bar) must
    match the SHA-256 prefix in its official name, and is read with ``weights_only=True``.
    """
    try:
        enum = torchvision.models.get_model_weights(name)[weights]
    except KeyError:
        options = ["DEFAULT", *torchvision.models.get_model_weights(name).__members__]
        raise ConfigError(f"model.weights={weights!r} is unknown for {name}; choose one of {options}") from None
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    found = torch.hub.HASH_REGEX.search(target.name)
    expected = found.group(1) if found else ""
    if not target.is_file():
        show = show_progress()  # torch.hub's download bar on stderr, when watched (resnet_cifar.progress)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # writes a temporary file and moves it into place once its hash is right
            torch.hub.download_url_to_file(enum.url, str(target), hash_prefix=expected or None, progress=show)
        except Exception as e:  # URLError, HTTPError, OSError, a hash mismatch ... (no network here)
            raise WeightsError(
                f"cannot get the ImageNet weights {name}.{enum.name} ({type(e).__name__}: {str(e)[:120]}). "
                f"Download {enum.url} and put it at {target} (under TORCH_HOME), or set model.weights_path=<file>"
            ) from None
    digest = hashlib.sha256()
    with target.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(expected):
        raise WeightsError(
            f"{target} is not the file {target.name} of {enum.url} (its SHA-256 does not start with {expected}): "
            "delete it and download that URL again"
        )
    return safe_load(target, f"ImageNet weights {name}.{enum.name}")


def build_model(
    name: str,
    num_classes: int = 10,
    pretrained: bool = False,
    weights: str = "DEFAULT",
    weights_path: str | None = None,
    load_head: bool = True,
    cifar_stem: bool = False,
    block: str = "basic",
    shortcut: str = "A",
    dropout: float = 0.0,
    **resnet9_options: Any,
) -> Classifier:
    """Build a classifier by name; load ImageNet weights or a local weights file if asked.

    Args:
        name: one of :data:`MODELS`.
        num_classes: outputs of the new head.
        pretrained: load torchvision's ImageNet weights (torchvision models only).
        weights: the torchvision weights entry, e.g. ``DEFAULT`` or ``IMAGENET1K_V1``.
        weights_path: a local file to load instead: a torchvision state dict, one of our
            checkpoints, or an exported state dict. Tensors whose shape does not fit (e.g.
            a head with another class count) are left at initialisation and reported.
        load_head: also load the file's head when its shape fits. ``False`` for transfer to
            other classes with the same class count: the head starts fresh.
        cifar_stem: torchvision models only: 3x3 stride-1 stem, no max-pool.
        block, shortcut: CIFAR ResNets only: ``basic``/``bottleneck`` and ``A``/``B``.
        resnet9_options: ResNet-9 only: the keyword arguments of
            :class:`~resnet_cifar.models.resnet9.ResNet9` (``widths``, ``activation``, ...), whose
            defaults are the one place of their values.
    """
    if resnet9_options and name not in FAST_MODELS:
        raise ConfigError(f"model.{', model.'.join(resnet9_options)} apply to resnet9 only, not {name}: remove them")
    if name in CIFAR_MODELS:
        if pretrained:
            raise ConfigError(
                f"{name} has no ImageNet weights: set model.pretrained=false, or give a backbone "
                "with model.weights_path=<checkpoint>"
            )
        if cifar_stem:
            raise ConfigError(f"model.cifar_stem applies to torchvision models; {name} already has a CIFAR stem")
        backbone = CifarResNet(CIFAR_MODELS[name], block=block, shortcut=shortcut)
        features = backbone.out_features
    elif name in FAST_MODELS:
        if pretrained or cifar_stem:
            raise ConfigError(
                f"{name} has no ImageNet weights and a CIFAR stem already: set model.pretrained=false, "
                "model.cifar_stem=false (or give a backbone with model.weights_path=<checkpoint>)"
            )
        backbone = ResNet9(**resnet9_options)
        features = backbone.out_features
    elif name in TORCHVISION_MODELS:
        backbone, features = _torchvision_backbone(name, cifar_stem)
    else:
        raise ConfigError(f"model {name!r} is unknown; choose one of {', '.join(MODELS)}")
    model = Classifier(backbone, features, num_classes, dropout)
    reinit = ("conv1.",) if cifar_stem else ()  # the replaced stem starts fresh
    if weights_path:
        state = extract_state_dict(safe_load(weights_path, "model.weights_path"))
        skip = () if load_head else ("head.",)
        load_matching(model, state, str(weights_path), reinit, skip_prefixes=skip)
    elif pretrained:
        state = extract_state_dict(imagenet_state_dict(name, weights))
        load_matching(model, state, f"torchvision {name}.{weights}", reinit)
    return model
