"""Export a trained checkpoint for use outside this project: what ``export.py`` does.

Three files, written to ``output_dir``:

- ``model.onnx`` (ONNX, run with onnxruntime) and ``model.pt2`` (``torch.export``, load with
  ``torch.export.load(path).module()``): the *input contract* is float32 RGB images in
  ``[0, 1]``, shape ``(N, 3, 32, 32)`` with any batch size ``N``; the output is ``(N, C)``
  logits in the order of ``class_names``; the probabilities are ``softmax(logits / temperature)``
  with the checkpoint's fitted ``temperature`` (``export.json``; null: not calibrated, plain
  softmax; :mod:`resnet_cifar.evaluation.calibration`). The normalisation of
  the training data (mean, std) and any upsampling to the trained ``image_size`` are inside
  the exported model. Flip TTA is not: average the logits of ``x`` and ``x.flip(-1)`` for it.
- ``model.safetensors``: the plain ``state_dict`` of the classifier (``backbone.*``,
  ``head.*``), with the architecture and preprocessing in its metadata;
  :func:`load_safetensors_model` rebuilds it without Lightning. This file takes
  *normalised* images, like the training code.
- ``export.json``: the contract above, class names, the temperature, and the check results.

Every export is checked against PyTorch on real test images (:func:`check_exports`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.contrib.logging import logging_redirect_tqdm

from resnet_cifar.data.preprocess import Preprocess
from resnet_cifar.errors import ConfigError, DataError, UserError, WeightsError, require_extra
from resnet_cifar.models.factory import Classifier, architecture, build_model
from resnet_cifar.models.weights import safe_load
from resnet_cifar.progress import progress_bar
from resnet_cifar.training.module import ImageClassifier

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torch_export": "model.pt2", "safetensors": "model.safetensors"}
METADATA_KEY = "resnet_cifar"


class ExportCheckError(UserError):
    """An exported model does not reproduce the PyTorch model's outputs."""


class NormalizedClassifier(nn.Module):
    """A :class:`Classifier` that takes ``[0, 1]`` images and prepares them itself (:class:`Preprocess`)."""

    def __init__(self, classifier: nn.Module, preprocess: Preprocess) -> None:
        super().__init__()
        self.classifier = classifier
        self.preprocess = preprocess

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.preprocess(images))


def metadata(module: ImageClassifier, preprocess: Preprocess) -> dict[str, Any]:
    hp = module.hparams
    return {
        "model": architecture(dict(hp.model)),  # every option: ResNet-9's widths, activation, ... included
        "num_classes": int(hp.num_classes),
        "class_names": list(hp.class_names or []),
        # temperature scaling (evaluation/calibration.py): probabilities = softmax(logits / temperature); None:
        # the checkpoint was not calibrated (plain softmax)
        "temperature": module.temperature,
        **preprocess.settings(),
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
    module: ImageClassifier,
    wrapper: nn.Module,
    files: dict[str, Path],
    images: torch.Tensor,
    atol: float,
    rtol: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Compare each export's logits with PyTorch's on ``images`` (uint8): max |diff|, argmax agreement.

    Accepted where every logit has ``|diff| <= atol + rtol * |reference|`` (``torch.allclose``'s rule).

    The reference is the training code's path: the uint8 images through the model's
    :class:`Preprocess`, then the classifier; the exports take ``[0, 1]`` floats instead.
    """
    preprocess = wrapper.preprocess
    x01 = images.float() / 255.0
    bar = progress_bar(total=1 + len(files), desc="check", unit="format")  # the wrapper, then each file
    with torch.inference_mode():
        ref = module.model(preprocess(images))
        outputs = {"pytorch_wrapper": wrapper(x01)}
    bar.update()
    if "onnx" in files:
        import onnxruntime as ort

        session = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
        outputs["onnx"] = torch.from_numpy(session.run(["logits"], {"images": x01.numpy()})[0])
        bar.update()
    if "torch_export" in files:
        program = torch.export.load(str(files["torch_export"])).module()
        with torch.inference_mode():
            outputs["torch_export"] = program(x01)
        bar.update()
    if "safetensors" in files:
        model, _ = load_safetensors_model(files["safetensors"])
        with torch.inference_mode():
            outputs["safetensors"] = model(preprocess(images))
        bar.update()
    bar.close()
    checks = {}
    for name, out in outputs.items():
        diff = float((out - ref).abs().max())
        agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
        checks[name] = {"max_abs_diff": diff, "argmax_agreement": agree, "images": len(images)}
        log.info(
            "%s vs PyTorch on %d test images: max |diff| %.2e, argmax agreement %.4f", name, len(images), diff, agree
        )
        if not torch.allclose(out, ref, rtol=rtol, atol=atol):
            raise ExportCheckError(
                f"{name} export differs from PyTorch by {diff:.3g} (> atol={atol} + rtol={rtol} x |logit|)"
                " on test images"
            )
    return checks


def export(cfg: Any) -> dict[str, Any]:
    """``export.py``: write the requested formats, check them, and write ``export.json``."""
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is required: python export.py ckpt_path=<.ckpt>")
    formats = list(cfg.formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"formats={formats} must be a non-empty subset of {list(FORMATS)}")
    if "onnx" in formats:
        require_extra(("onnx", "onnxscript", "onnxruntime"), "export", "formats=[onnx]")
    module, data_hp = ImageClassifier.load_trained(cfg.ckpt_path)
    preprocess = Preprocess.from_data_hparams(data_hp)
    meta = metadata(module, preprocess)
    wrapper = NormalizedClassifier(module.model, preprocess).eval()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, 3, 32, 32)
    files: dict[str, Path] = {}
    with logging_redirect_tqdm():  # the "wrote" lines go above the bar
        for fmt in progress_bar(formats, desc="export", unit="format"):
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
        images = test_images(data_hp, str(cfg.data.root), int(cfg.check_images))
        checks = check_exports(module, wrapper, files, images, float(cfg.atol), float(cfg.rtol))
    summary = {
        "ckpt_path": str(cfg.ckpt_path),
        "files": {k: v.name for k, v in files.items()},
        "input": {
            "onnx/torch_export": "float32 RGB in [0, 1], shape (N, 3, 32, 32), NCHW; normalisation is inside",
            "safetensors": "state_dict of the classifier; feed (x - mean) / std of [0, 1] images",
            "name": "images",
        },
        "output": "logits (N, num_classes) in the order of class_names; no flip TTA; "
        "probabilities: softmax(logits / temperature) (temperature null: softmax(logits))",
        **meta,
        "checks": checks,
    }
    (out_dir / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, c in checks.items():
        print(f"{name}: max |diff| {c['max_abs_diff']:.2e}, argmax agreement {c['argmax_agreement']:.4f}")
    print(f"exported {', '.join(files)} to {out_dir}")
    return summary
