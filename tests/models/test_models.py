"""Model factory: shapes, parameter counts, pretrained and local weights."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
import torchvision

from resnet_cifar.errors import ConfigError, WeightsError
from resnet_cifar.models import build_model
from resnet_cifar.models.factory import CIFAR_MODELS


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M parameters.
@pytest.mark.parametrize(
    "name, millions",
    [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85), ("resnet110", 1.7)],
)
def test_cifar_resnets_match_the_paper(name, millions):
    model = build_model(name, num_classes=10)
    assert n_params(model) / 1e6 == pytest.approx(millions, rel=0.02)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_resnet_options():
    assert n_params(build_model("resnet20", block="basic", shortcut="B")) > n_params(build_model("resnet20"))
    bottleneck = build_model("resnet56", block="bottleneck")
    assert bottleneck.num_features == 256
    assert bottleneck(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="depth 32 does not fit bottleneck blocks"):
        build_model("resnet32", block="bottleneck")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnets(name):
    model = build_model(name, num_classes=7)
    reference = torchvision.models.get_model(name, num_classes=7)
    assert n_params(model) == n_params(reference)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_cifar_stem_keeps_resolution():
    model = build_model("resnet18", cifar_stem=True)
    assert model.backbone.conv1.kernel_size == (3, 3) and model.backbone.conv1.stride == (1, 1)
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)
    assert n_params(model) == 11_173_962
    feats = {}
    model.backbone.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("x", o))
    model(torch.randn(1, 3, 32, 32))
    assert feats["x"].shape[-1] == 4  # 32 / 8: three stride-2 stages, no stem downsampling


def test_backbone_head_split_is_addressable_by_name():
    names = [n for n, _ in build_model("resnet18").named_parameters()]
    assert all(n.startswith(("backbone.", "head.")) for n in names)
    assert {n for n in names if n.startswith("head.")} == {"head.weight", "head.bias"}


def _cache_file(tmp_path, monkeypatch, write) -> Path:
    """Write a file with ``write(path)`` into the TORCH_HOME cache under torchvision's resnet18 name,
    renamed (with the URL torchvision knows it by) to carry its own SHA-256 prefix, as official files do."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    tmp = cache / "upload.pth"
    write(tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    url = weights.url.rsplit("/", 1)[0] + f"/resnet18-{digest}.pth"
    monkeypatch.setattr(weights.value, "url", url)
    return tmp.rename(cache / f"resnet18-{digest}.pth")


def test_pretrained_weights_from_the_torch_home_cache(tmp_path, monkeypatch):
    """The real loading path: torchvision's cache under TORCH_HOME, hash-checked, read weights-only."""
    source = torchvision.models.resnet18()  # random tensors, written where torchvision looks
    _cache_file(tmp_path, monkeypatch, lambda path: torch.save(source.state_dict(), path))
    model = build_model("resnet18", num_classes=10, pretrained=True)
    own = model.state_dict()
    for k, v in source.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(own["backbone." + k], v), k
    assert model.head.weight.shape == (10, 512)  # the 1000-class head is not loaded


class _RunsCode:
    """Unpickling this calls ``Path.touch`` on the marker: code run by loading a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_code_in_the_weights_cache_does_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "code_ran"
    # a pickle that runs code, under its own hash: past the hash check, refused by weights_only
    _cache_file(tmp_path, monkeypatch, lambda path: torch.save({"conv1.weight": _RunsCode(marker)}, path))
    with pytest.raises(WeightsError, match="refused: it needs arbitrary unpickling"):
        build_model("resnet18", pretrained=True)
    assert not marker.exists()


def test_a_cached_file_with_the_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    marker = tmp_path / "code_ran"
    torch.save({"conv1.weight": _RunsCode(marker)}, cache / url.rsplit("/", 1)[-1])
    with pytest.raises(WeightsError, match=re.escape(f"is not the file {url.rsplit('/', 1)[-1]} of {url}")):
        build_model("resnet18", pretrained=True)
    assert not marker.exists()


def test_pretrained_weights_that_cannot_be_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match=r"put it at .*hub/checkpoints/resnet18-.*\.pth.*model.weights_path"):
        build_model("resnet18", pretrained=True)


def test_weights_path_torchvision_state_dict(tmp_path):
    source = torchvision.models.resnet34(num_classes=10)
    path = tmp_path / "r34.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet34", num_classes=10, weights_path=str(path))
    torch.testing.assert_close(model.backbone.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    torch.testing.assert_close(model.head.weight, source.fc.weight)  # same class count: head loads too


def test_weights_path_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        build_model("resnet20", weights_path=str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        build_model("resnet20", weights_path=str(junk))
    other = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    with pytest.raises(
        WeightsError,
        match=r"does not fit this model's backbone \(shape mismatch: backbone.layer1.0.conv1.weight \(64, 64, 3, 3\)",
    ):
        build_model("resnet20", weights_path=str(other))


def test_unknown_names_and_bad_options():
    with pytest.raises(ConfigError, match="model 'resnet19' is unknown; choose one of resnet20"):
        build_model("resnet19")
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        build_model("resnet20", pretrained=True)
    with pytest.raises(ConfigError, match="model.weights='IMAGENET9K' is unknown"):
        build_model("resnet18", pretrained=True, weights="IMAGENET9K")
    assert set(CIFAR_MODELS) == {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110"}


def test_cifar_stem_with_pretrained_weights_keeps_a_fresh_stem(tmp_path):
    source = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet18", cifar_stem=True, weights_path=str(path))
    assert model.backbone.conv1.weight.shape == (64, 3, 3, 3)
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_partial_files_are_refused_with_the_missing_keys(tmp_path):
    source = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(WeightsError, match=r"missing from the file: backbone.layer1.2"):
        build_model("resnet34", weights_path=str(path))


# torch.use_deterministic_algorithms's documented CUDA ops without a deterministic backward, as the
# modules that run them: none may sit in a zoo model, or trainer.deterministic=true fails on a GPU.
NONDETERMINISTIC_CUDA_BACKWARD = (
    torch.nn.AdaptiveAvgPool3d,
    torch.nn.AdaptiveMaxPool2d,
    torch.nn.FractionalMaxPool2d,
    torch.nn.FractionalMaxPool3d,
    torch.nn.MaxUnpool1d,
    torch.nn.MaxUnpool2d,
    torch.nn.MaxUnpool3d,
    torch.nn.Upsample,  # its linear, bilinear, bicubic and trilinear modes
    torch.nn.UpsamplingBilinear2d,
    torch.nn.ReflectionPad3d,
    torch.nn.ReplicationPad1d,
    torch.nn.ReplicationPad2d,
    torch.nn.ReplicationPad3d,
    torch.nn.NLLLoss,  # NLLLoss2d's
    torch.nn.EmbeddingBag,
    torch.nn.CTCLoss,
)
ZOO = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "model").glob("*.yaml"))
TINY_WIDTHS = {"resnet9": "[8,16,32,64]", "airbench94": "[24,16,32,64]"}  # the whitening stem's 24 channels


@pytest.mark.parametrize("preset", ZOO)
def test_every_zoo_model_trains_under_deterministic_algorithms(preset):
    """trainer.deterministic=true makes Lightning call torch.use_deterministic_algorithms(True): a step of
    every model=<preset> runs under it, and none holds a module whose CUDA backward would refuse it."""
    from helpers import config_model

    widths = [f"model.widths={TINY_WIDTHS[preset]}"] if preset in TINY_WIDTHS else []
    model = config_model(f"model={preset}", *widths).train()
    refused = [n for n, m in model.named_modules() if isinstance(m, NONDETERMINISTIC_CUDA_BACKWARD)]
    assert not refused, f"{preset}: no deterministic CUDA backward in {refused}"
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
        optimizer.step()
    finally:
        torch.use_deterministic_algorithms(was)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_resnet9_global_pool_is_adaptive_max_pooling():
    """The amax pool computes AdaptiveMaxPool2d(1) + Flatten, and has no state of its own (same state_dict)."""
    from resnet_cifar.models.resnet9 import GlobalMaxPool

    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(GlobalMaxPool()(x), torch.nn.AdaptiveMaxPool2d(1)(x).flatten(1), rtol=0, atol=0)
    assert not GlobalMaxPool().state_dict()
