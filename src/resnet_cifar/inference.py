"""Classify image files with a trained checkpoint: what ``predict.py`` does.

Images of any size go through the path the model saw in training: the shorter side is
resized to 32 pixels (antialiased, as CIFAR-10's images were downsampled) and the centre
32x32 crop is kept; then the checkpoint's own :class:`~resnet_cifar.data.preprocess.Preprocess`
(normalisation, and the resize to the trained ``image_size``), as in training.
A 32x32 image is used as is, so a CIFAR-10 image saved as PNG gives the prediction of
the model on the dataset's tensor.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF
from tqdm.contrib.logging import logging_redirect_tqdm

from resnet_cifar.atomic import atomic_write, write_json
from resnet_cifar.data.cifar10 import CLASSES
from resnet_cifar.data.preprocess import Preprocess
from resnet_cifar.errors import ConfigError, UserError
from resnet_cifar.progress import progress_bar
from resnet_cifar.training.module import ImageClassifier

log = logging.getLogger(__name__)

CIFAR_SIZE = 32
OUTPUT_FORMATS = (".csv", ".json")


def resolve_device(device: str) -> torch.device:
    """``device=`` of predict: ``cpu``, ``cuda[:N]``, ``gpu[:N]`` (Lightning's spelling of cuda) or ``auto``."""
    name = str(device).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "gpu" or name.startswith("gpu:"):
        name = "cuda" + name[3:]
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"device={device}: expected cpu, cuda, cuda:N, gpu or auto")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device} but no CUDA GPU is visible: use device=cpu or device=auto")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={device} but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return torch.device(name)


@dataclass
class Predictor:
    """A model in eval mode plus the preprocessing it was trained with."""

    module: ImageClassifier
    class_names: list[str]
    preprocess: Preprocess
    device: torch.device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> Predictor:
        dev = resolve_device(device)
        module, data_hp = ImageClassifier.load_trained(path, map_location=dev)
        if module.temperature is None:
            log.warning("%s has no temperature: the probabilities are the raw softmax, not calibrated", path)
        else:
            log.info("probabilities calibrated with the checkpoint's temperature %.4f", module.temperature)
        names = list(module.hparams.get("class_names") or CLASSES)
        return cls(module, names, Preprocess.from_data_hparams(data_hp).to(dev), dev)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities of uint8 ``(N, 3, 32, 32)`` images (flip TTA if the model uses it), temperature-scaled
        when the checkpoint holds a temperature."""
        x = self.preprocess(images.to(self.device))
        return self.module.probabilities(self.module.predict_logits(x)).cpu()


def list_inputs(inputs: str | Path) -> list[Path]:
    """The file, or every file under the folder (recursively, sorted; hidden files left out)."""
    path = Path(str(inputs)).expanduser()
    if not path.exists():
        raise UserError(f"inputs={inputs} does not exist: give an image file or a folder of images")
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise UserError(f"inputs={inputs} is an empty folder: put PNG/JPEG images in it")
    return files


def read_image(path: Path) -> torch.Tensor:
    """A uint8 ``(3, H, W)`` RGB tensor; raises ``ValueError`` for anything that is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image ({type(e).__name__}: {str(e)[:100]})") from None
    return TF.pil_to_tensor(rgb)


def to_model_input(image: torch.Tensor, size: int = CIFAR_SIZE) -> torch.Tensor:
    """Resize the shorter side to ``size`` (antialiased) and keep the centre ``size x size`` crop."""
    if tuple(image.shape[-2:]) != (size, size):
        image = TF.resize(image, size, antialias=True)
        image = TF.center_crop(image, [size, size])
    return image


@dataclass
class Prediction:
    file: str
    classes: list[str]
    probabilities: list[float]


@dataclass
class PredictResult:
    predictions: list[Prediction] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


def classify_files(predictor: Predictor, files: list[Path], top_k: int = 3, batch_size: int = 64) -> PredictResult:
    """Top-k classes of each readable file; unreadable ones are logged and skipped."""
    if top_k < 1 or batch_size < 1:
        raise ConfigError(f"top_k={top_k} and batch_size={batch_size} must be positive integers")
    k = min(top_k, len(predictor.class_names))
    result = PredictResult()
    batch: list[tuple[Path, torch.Tensor]] = []

    def flush() -> None:
        probs = predictor.probabilities(torch.stack([img for _, img in batch]))
        top_p, top_i = probs.topk(k, dim=-1)
        for (f, _), p, i in zip(batch, top_p.tolist(), top_i.tolist()):
            result.predictions.append(Prediction(str(f), [predictor.class_names[j] for j in i], p))
        batch.clear()

    # warnings about skipped files go through tqdm.write, above the bar instead of across it
    with progress_bar(files, desc="predict", unit="image") as bar, logging_redirect_tqdm():
        for f in bar:
            try:
                batch.append((f, to_model_input(read_image(f))))
            except ValueError as e:
                log.warning("skipped %s: %s", f, e)
                result.skipped.append((str(f), str(e)))
                continue
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    return result


def write_predictions(result: PredictResult, path: str | Path) -> Path:
    """CSV (``file, class_1, prob_1, ...``) or JSON (with the skipped files), by suffix; atomic."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"output={path} must end in {' or '.join(OUTPUT_FORMATS)}")
    if path.suffix.lower() == ".json":
        doc = {
            "predictions": [
                {"file": p.file, "top_k": [{"class": c, "probability": q} for c, q in zip(p.classes, p.probabilities)]}
                for p in result.predictions
            ],
            "skipped": [{"file": f, "reason": r} for f, r in result.skipped],
        }
        write_json(path, doc, "predictions")
    else:
        k = max((len(p.classes) for p in result.predictions), default=0)
        with atomic_write(path, "w", "predictions") as fh:
            w = csv.writer(fh)
            w.writerow(["file", *[h for r in range(1, k + 1) for h in (f"class_{r}", f"prob_{r}")]])
            for p in result.predictions:
                w.writerow([p.file, *[v for c, q in zip(p.classes, p.probabilities) for v in (c, f"{q:.6f}")]])
    return path


def predict(cfg: Any) -> PredictResult:
    """``predict.py``: classify ``cfg.inputs`` with ``cfg.ckpt_path``, print and write the top-k."""
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is required: python predict.py ckpt_path=<.ckpt> inputs=<image or folder>")
    if not cfg.get("inputs"):
        raise ConfigError("inputs is required: python predict.py ckpt_path=<.ckpt> inputs=<image or folder>")
    output = Path(str(cfg.output))
    if output.suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"output={output} must end in {' or '.join(OUTPUT_FORMATS)}")
    files = list_inputs(cfg.inputs)
    predictor = Predictor.from_checkpoint(cfg.ckpt_path, cfg.get("device", "cpu"))
    result = classify_files(predictor, files, int(cfg.top_k), int(cfg.batch_size))
    if not result.predictions:
        raise UserError(f"none of the {len(files)} files under inputs={cfg.inputs} is a readable PNG/JPEG image")
    for p in result.predictions:
        print(p.file + "  " + "  ".join(f"{c} {q:.3f}" for c, q in zip(p.classes, p.probabilities)))
    write_predictions(result, output)
    print(f"{len(result.predictions)} images classified, {len(result.skipped)} skipped; wrote {output}")
    return result
