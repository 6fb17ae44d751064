"""Read, validate and (if allowed) download CIFAR-10 in the ``cifar-10-batches-py`` layout.

The files are validated by structure (shapes, dtype, label range, counts), not by the
md5 of each batch file: re-packed copies of the real dataset are common and legitimate.
The official archive *is* checksummed when it is downloaded.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from resnet_cifar.errors import DataError

log = logging.getLogger(__name__)

FOLDER = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SHAPE = (3, 32, 32)
TRAIN_SIZE, TEST_SIZE = 50_000, 10_000


@dataclass(frozen=True)
class Split:
    """Images as uint8 ``(N, 3, 32, 32)`` and labels as int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a batch file cannot run code."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise _RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            entry = _BatchUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as e:
        raise DataError(
            f"{path} was refused: it references {e}, which a CIFAR-10 batch never does (unpickling it could run "
            "code); replace it with the official files"
        ) from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise DataError(
            f"{path} is unreadable or truncated ({type(e).__name__}: {e}); "
            "delete the folder and download CIFAR-10 again"
        ) from None
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (expected a dict, got {type(entry).__name__})")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path} is not a CIFAR-10 batch: it has no 'data' and 'labels' entries")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{path}: 'data' has dtype {data.dtype} and shape {data.shape}, expected uint8 of shape (N, 3072)"
        )
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"{path}: labels range {labels.min()}..{labels.max()}, expected 0..{len(CLASSES) - 1}")
    return data, labels


def read_split(folder: Path, files: tuple[str, ...], expected: int | None = None) -> Split:
    """Read and validate several batch files of ``folder`` into one :class:`Split`."""
    datas, labels = [], []
    for name in files:
        d, lbl = _read_batch(folder / name)
        datas.append(d)
        labels.append(lbl)
    data = np.concatenate(datas)
    label = np.concatenate(labels).astype(np.int64)
    if expected is not None and len(label) != expected:
        raise DataError(f"{folder}: {len(label)} images in {', '.join(files)}, expected {expected}")
    images = torch.from_numpy(data.reshape(-1, *IMAGE_SHAPE).copy())
    return Split(images=images, labels=torch.from_numpy(label))


def missing_files(root: Path) -> list[str]:
    folder = root / FOLDER
    return [n for n in (*TRAIN_FILES, *TEST_FILES) if not (folder / n).is_file()]


def ensure_dataset(root: str | Path, download: bool = True) -> Path:
    """Return ``root/cifar-10-batches-py``, downloading the official archive if allowed."""
    root = Path(root).expanduser()
    missing = missing_files(root)
    if not missing:
        return root / FOLDER
    where = f"{root / FOLDER} (files: {', '.join(TRAIN_FILES + TEST_FILES)})"
    if not download:
        raise DataError(
            f"CIFAR-10 not found: {root / FOLDER} lacks {', '.join(missing)}. "
            f"Put the python-version batches at {where}, or set data.download=true"
        )
    from torchvision.datasets.utils import check_integrity, extract_archive

    from resnet_cifar.progress import show_progress

    archive, show = root / URL.rsplit("/", 1)[-1], show_progress()
    log.info("Downloading CIFAR-10 from %s to %s", URL, root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not archive.is_file():
            # torch.hub's download, not torchvision's download_url: its progress bar can be switched
            # off (resnet_cifar.progress), and it moves the file into place only once complete.
            torch.hub.download_url_to_file(URL, str(archive), progress=show)
    except Exception as e:  # network errors come in many types (URLError, OSError, ...)
        raise DataError(
            f"CIFAR-10 is missing from {root} and the download failed ({type(e).__name__}: {e}). "
            f"Download {URL} elsewhere and unpack it so that the batches are at {where}, "
            "or point data.root (env RESNET_CIFAR_DATA) at a folder that holds cifar-10-batches-py"
        ) from None
    if not check_integrity(str(archive), ARCHIVE_MD5):
        archive.unlink()
        raise DataError(f"the download of {URL} is corrupted (its md5 is not {ARCHIVE_MD5}) and was deleted: run again")
    extract_archive(str(archive), str(root), remove_finished=True)
    if missing_files(root):
        raise DataError(f"the downloaded archive did not contain the expected files at {where}")
    return root / FOLDER


def load_cifar10(root: str | Path, download: bool = True) -> tuple[Split, Split]:
    """Load the 50,000 training and the official 10,000 test images."""
    folder = ensure_dataset(root, download)
    train = read_split(folder, TRAIN_FILES, TRAIN_SIZE)
    test = read_split(folder, TEST_FILES, TEST_SIZE)
    return train, test


def write_batches(folder: str | Path, train: Split, test: Split) -> Path:
    """Write splits in the ``cifar-10-batches-py`` format (used to build test fixtures)."""
    out = Path(folder) / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(train)), len(TRAIN_FILES))
    for name, idx in zip(TRAIN_FILES, chunks, strict=True):
        _write_batch(out / name, train.images[idx], train.labels[idx], name)
    _write_batch(out / TEST_FILES[0], test.images, test.labels, "testing batch 1 of 1")
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": 10000, b"num_vis": 3072}
    with (out / "batches.meta").open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return out


def _write_batch(path: Path, images: torch.Tensor, labels: torch.Tensor, label: str) -> None:
    entry = {
        b"batch_label": label.encode(),
        b"labels": [int(v) for v in labels],
        b"data": images.reshape(len(images), -1).numpy().astype(np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    with path.open("wb") as f:
        pickle.dump(entry, f, protocol=2)
