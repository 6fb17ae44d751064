"""Export a trained checkpoint for use outside this project: what ``export.py`` does.

Three files, written to ``output_dir``:

- ``model.onnx`` (ONNX, run with onnxruntime) and ``model.pt2`` (``torch.export``, load with
  ``torch.export.load(path).module()``): the *input contract* is float32 RGB images in
  ``[0, 1]``, shape ``(N, 3, 32, 32)`` with any batch size ``N``; the output is ``(N, C)``
  logits (softmax for probabilities) in the order of ``class_names``. The normalisation of
  the training data (mean, std) and any upsampling to the trained ``image_size`` are inside
  the exported model. Flip TTA is not: average the logits of ``x`` and ``x.flip(-1)`` for it.
- ``model.safetensors``: the plain ``state_dict`` of the classifier (``backbone.*``,
  ``head.*``), with the architecture and preprocessing in its metadata;
  :func:`load_safetensors_model` rebuilds it without Lightning. This file takes
  *normalised* images, like the training code.
- ``export.json``: the contract above, class names, and the check results.

Every export is checked against PyTorch on real test images (:func:`check_exports`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from resnet_cifar.data.datamodule import CIFAR10_MEAN, CIFAR10_STD
from resnet_cifar.errors import ConfigError, DataError, UserError, WeightsError
from resnet_cifar.models.factory import Classifier, build_model
from resnet_cifar.models.weights import safe_load
from resnet_cifar.training.module import ImageClassifier

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torch_export": "model.pt2", "safetensors": "model.safetensors"}
METADATA_KEY = "resnet_cifar"
MODEL_KEYS = ("name", "block", "shortcut", "cifar_stem", "dropout")


class ExportCheckError(UserError):
    """An exported model does not reproduce the PyTorch model's outputs."""


class NormalizedClassifier(nn.Module):
    """A :class:`Classifier` that takes ``[0, 1]`` images and normalises them itself."""

    def __init__(self, classifier: nn.Module, mean, std, image_size: int = 32) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.image_size = int(image_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        if self.image_size != 32:  # as the data module: normalise, then bilinear resize
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.classifier(x)


def load_checkpoint(path: str | Path) -> tuple[ImageClassifier, dict[str, Any]]:
    """The module (eval mode, CPU) and the data settings stored in one of our checkpoints."""
    ckpt = safe_load(path, "ckpt_path")
    data_hp = ckpt.get("datamodule_hyper_parameters")
    if "state_dict" not in ckpt or not isinstance(data_hp, dict):
        raise WeightsError(f"ckpt_path {path} is not a resnet-cifar training checkpoint (no data settings)")
    return ImageClassifier.from_checkpoint(path).eval(), dict(data_hp)


def metadata(module: ImageClassifier, data_hp: dict[str, Any]) -> dict[str, Any]:
    hp = module.hparams
    return {
        "model": {k: v for k, v in dict(hp.model).items() if k in MODEL_KEYS},
        "num_classes": int(hp.num_classes),
        "class_names": list(hp.class_names or []),
        "mean": list(data_hp.get("mean", CIFAR10_MEAN)),
        "std": list(data_hp.get("std", CIFAR10_STD)),
        "image_size": int(data_hp.get("image_size", 32)),
    }


def save_safetensors(classifier: nn.Module, meta: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in classifier.state_dict().items()}
    save_file(state, str(path), metadata={METADATA_KEY: json.dumps(meta)})


def load_safetensors_model(path: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the classifier from ``model.safetensors`` with plain PyTorch (eval mode).

    Returns the model (expects normalised images: ``(x - meta['mean']) / meta['std']``) and
    the metadata.
    """
    from safetensors import safe_open

    path = Path(path)
    state = safe_load(path, "safetensors file")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise WeightsError(f"{path} has no {METADATA_KEY!r} metadata: was it written by export.py?")
    meta = json.loads(raw)
    model = build_model(num_classes=meta["num_classes"], **meta["model"])
    model.load_state_dict(state, strict=True)
    return model.eval(), meta


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    import contextlib
    import io

    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one INFO line per deduplicated initializer
    progress = io.StringIO()
    with contextlib.redirect_stdout(progress):  # the exporter prints its steps
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    log.debug("torch.onnx: %s", progress.getvalue())
    onnx.checker.check_model(str(path), full_check=True)


def export_program(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def test_images(data_hp: dict[str, Any], root: str, n: int) -> torch.Tensor:
    """The first ``n`` official test images (uint8), of the classes the model was trained on."""
    from resnet_cifar.data.datamodule import CIFAR10DataModule

    kwargs = {**data_hp, "root": root, "download": False}
    dm = CIFAR10DataModule(**kwargs)
    try:
        dm.setup("test")
    except DataError as e:
        raise DataError(f"{e} (the export check needs the test images; check_images=0 skips it)") from None
    split = dm.splits["test"]
    return split.images[split.indices[:n]]


def check_exports(
    module: ImageClassifier, wrapper: nn.Module, files: dict[str, Path], images: torch.Tensor, atol: float
) -> dict[str, dict[str, float]]:
    """Compare each export's logits with PyTorch's on ``images`` (uint8): max |diff|, argmax agreement.

    The reference is the training code's path: the data module's normalisation of the uint8
    images, then the classifier, so the check covers the normalisation inside the exports too.
    """
    from resnet_cifar.data.augment import BatchAugment

    meta = metadata(module, {"mean": wrapper.mean.flatten().tolist(), "std": wrapper.std.flatten().tolist()})
    aug = BatchAugment(meta["mean"], meta["std"], image_size=wrapper.image_size)
    x01 = images.float() / 255.0
    with torch.inference_mode():
        ref = module.model(aug.normalize(images))
        outputs = {"pytorch_wrapper": wrapper(x01)}
    if "onnx" in files:
        import onnxruntime as ort

        session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
        outputs["onnx"] = torch.from_numpy(session.run(["logits"], {"images": x01.numpy()})[0])
    if "torch_export" in files:
        program = torch.export.load(str(files["torch_export"])).module()
        with torch.inference_mode():
            outputs["torch_export"] = program(x01)
    if "safetensors" in files:
        model, _ = load_safetensors_model(files["safetensors"])
        with torch.inference_mode():
            outputs["safetensors"] = model(aug.normalize(images))
    checks = {}
    for name, out in outputs.items():
        diff = float((out - ref).abs().max())
        agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
        checks[name] = {"max_abs_diff": diff, "argmax_agreement": agree, "images": len(images)}
        log.info(
            "%s vs PyTorch on %d test images: max |diff| %.2e, argmax agreement %.4f", name, len(images), diff, agree
        )
        if not diff <= atol:
            raise ExportCheckError(f"{name} export differs from PyTorch by {diff:.3g} > atol={atol} on test images")
    return checks


def export(cfg: Any) -> dict[str, Any]:
    """``export.py``: write the requested formats, check them, and write ``export.json``."""
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is required: python export.py ckpt_path=<.ckpt>")
    formats = list(cfg.formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"formats={formats} must be a non-empty subset of {list(FORMATS)}")
    module, data_hp = load_checkpoint(cfg.ckpt_path)
    meta = metadata(module, data_hp)
    wrapper = NormalizedClassifier(module.model, meta["mean"], meta["std"], meta["image_size"]).eval()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, 3, 32, 32)
    files: dict[str, Path] = {}
    for fmt in formats:
        path = out_dir / FORMATS[fmt]
        if fmt == "onnx":
            export_onnx(wrapper, example, path)
        elif fmt == "torch_export":
            export_program(wrapper, example, path)
        else:
            save_safetensors(module.model, meta, path)
        files[fmt] = path
        log.info("wrote %s", path)
    checks = {}
    if int(cfg.check_images) > 0:
        images = test_images(data_hp, str(cfg.data_root), int(cfg.check_images))
        checks = check_exports(module, wrapper, files, images, float(cfg.atol))
    summary = {
        "ckpt_path": str(cfg.ckpt_path),
        "files": {k: v.name for k, v in files.items()},
        "input": {
            "onnx/torch_export": "float32 RGB in [0, 1], shape (N, 3, 32, 32), NCHW; normalisation is inside",
            "safetensors": "state_dict of the classifier; feed (x - mean) / std of [0, 1] images",
            "name": "images",
        },
        "output": "logits (N, num_classes) in the order of class_names; no flip TTA",
        **meta,
        "checks": checks,
    }
    (out_dir / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, c in checks.items():
        print(f"{name}: max |diff| {c['max_abs_diff']:.2e}, argmax agreement {c['argmax_agreement']:.4f}")
    print(f"exported {', '.join(files)} to {out_dir}")
    return summary
