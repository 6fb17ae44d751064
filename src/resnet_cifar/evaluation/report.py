"""An evaluation report that explains a model, for ``eval.py`` and the end of ``train.py``.

:func:`collect_predictions` runs a model over a split (and over the mirrored images, for
flip TTA), :func:`compute_report` turns logits and labels into numbers (torchmetrics),
and :func:`write_report` writes them to disk (``report.md``, PNGs, CSV) and TensorBoard.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from resnet_cifar.evaluation import figures

log = logging.getLogger(__name__)

REPORT_DEFAULTS: dict[str, Any] = {
    "tta": True,
    "n_bins": 15,
    "top_confused": 10,
    "max_misclassified": 36,
    "tensorboard": True,
}


@dataclass
class Predictions:
    """Model outputs on a split, in the order of the split's images."""

    logits: torch.Tensor  # (N, C) of the images as they are
    labels: torch.Tensor  # (N,)
    indices: torch.Tensor  # (N,) positions in the split's image tensor
    logits_flip: torch.Tensor | None = None  # (N, C) of the mirrored images

    def probs(self, tta: bool) -> torch.Tensor:
        if tta and self.logits_flip is None:
            raise ValueError("flip logits were not collected")
        logits = (self.logits + self.logits_flip) / 2 if tta else self.logits
        return logits.softmax(-1)


@torch.inference_mode()
def collect_predictions(
    module: torch.nn.Module, datamodule: Any, split: str = "test", flip: bool = True, max_batches: int | None = None
) -> Predictions:
    """Logits of ``module`` on ``split`` through the datamodule's own eval transform.

    Args:
        module: an :class:`~resnet_cifar.training.module.ImageClassifier` (or any model of
            normalised images); run in eval mode on its own device, in float32.
        datamodule: a set-up :class:`~resnet_cifar.data.datamodule.CIFAR10DataModule`.
        flip: also collect the logits of the horizontally mirrored images.
        max_batches: stop after this many batches (as ``trainer.limit_test_batches`` does).
    """
    datamodule.setup(split)
    loader = {"test": datamodule.test_dataloader, "val": datamodule.val_dataloader}[split]()
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    out: dict[str, list[torch.Tensor]] = {"logits": [], "flip": [], "labels": [], "indices": []}
    try:
        for b, (images, labels, index) in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            x, y = datamodule.transform_batch((images.to(device), labels, index.to(device)), train=False)
            out["logits"].append(module(x).float().cpu())
            if flip:
                out["flip"].append(module(x.flip(-1)).float().cpu())
            out["labels"].append(torch.as_tensor(y).cpu())
            out["indices"].append(torch.as_tensor(index).cpu())
    finally:
        module.train(was_training)
    if not out["logits"]:
        raise ValueError(f"the {split} split is empty: nothing to evaluate")
    return Predictions(
        logits=torch.cat(out["logits"]),
        labels=torch.cat(out["labels"]).long(),
        indices=torch.cat(out["indices"]).long(),
        logits_flip=torch.cat(out["flip"]) if flip else None,
    )


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, list[float]]:
    """Per equal-width confidence bin: bounds, image count, mean confidence and accuracy."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    # bin k holds confidences in (edges[k], edges[k + 1]], as torchmetrics' calibration error does
    which = torch.clamp(torch.bucketize(conf, edges, right=False) - 1, 0, n_bins - 1)
    count = torch.bincount(which, minlength=n_bins).float()
    safe = count.clamp(min=1)
    return {
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "count": count.long().tolist(),
        "confidence": (torch.zeros(n_bins).index_add_(0, which, conf) / safe).tolist(),
        "accuracy": (torch.zeros(n_bins).index_add_(0, which, correct) / safe).tolist(),
    }


def compute_report(
    probs: torch.Tensor, labels: torch.Tensor, class_names: list[str], n_bins: int = 15, top_confused: int = 10
) -> dict[str, Any]:
    """Top-1/top-5 accuracy, per-class precision/recall/F1, confusion matrix, its most
    confused pairs, and the expected calibration error with its reliability bins."""
    c = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != c:
        raise ValueError(f"probs of shape {tuple(probs.shape)} do not match {c} classes")
    k5 = min(5, c)  # with fewer than 5 classes every image is in the top 5
    kw = {"num_classes": c, "average": None, "zero_division": 0}
    precision = multiclass_precision(probs, labels, **kw)
    recall = multiclass_recall(probs, labels, **kw)
    f1 = multiclass_f1_score(probs, labels, **kw)
    cm = multiclass_confusion_matrix(probs, labels, num_classes=c)
    support = cm.sum(1)
    ece = multiclass_calibration_error(probs, labels, num_classes=c, n_bins=n_bins, norm="l1")
    nll = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels)

    off = cm.clone()
    off.fill_diagonal_(0)
    pairs = []
    values, flat = off.flatten().sort(descending=True)
    for v, f in zip(values.tolist(), flat.tolist()):
        if v == 0 or len(pairs) >= top_confused:
            break
        t, p = divmod(f, c)
        pairs.append(
            {
                "true": class_names[t],
                "predicted": class_names[p],
                "count": int(v),
                "fraction_of_true": float(v / max(int(support[t]), 1)),
            }
        )
    return {
        "num_images": int(len(labels)),
        "top1": float(multiclass_accuracy(probs, labels, num_classes=c, average="micro")),
        "top5": float(multiclass_accuracy(probs, labels, num_classes=c, average="micro", top_k=k5)),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "ece": float(ece),
        "nll": float(nll),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
        "most_confused": pairs,
        "reliability": reliability_bins(probs, labels, n_bins),
    }


SCALARS = ("top1", "top5", "macro_precision", "macro_recall", "macro_f1", "ece", "nll")


def flat_metrics(report: dict[str, Any], prefix: str = "test/") -> dict[str, float]:
    """The report's scalars as ``<prefix><name>`` (what sweep tables and TensorBoard compare)."""
    out = {f"{prefix}{k}": float(report[k]) for k in SCALARS if k in report}
    for name, value in report.get("tta", {}).items():
        out[f"{prefix}{name}"] = float(value)
    return out


def _markdown(report: dict[str, Any], pngs: dict[str, str], title: str) -> str:
    lines = [f"# {title}", ""]
    lines += [f"{report['num_images']} images; flip TTA: {'on' if report['tta_flip'] else 'off'}.", ""]
    lines += ["| metric | value |", "|---|---|"]
    for k in SCALARS:
        if k in report:
            lines.append(f"| {k} | {report[k]:.4f} |")
    for k, v in report.get("tta", {}).items():
        lines.append(f"| {k} | {v:.4f} |")
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, m in report["per_class"].items():
        lines.append(f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |")
    lines += ["", "## Confusion matrix", "", f"![confusion matrix]({pngs['confusion_matrix']})", ""]
    lines += ["Counts (rows: true class, columns: predicted): `confusion_matrix.csv`.", ""]
    lines += ["## Most confused pairs", "", "| true | predicted as | images | share of the true class |"]
    lines += ["|---|---|---|---|"]
    for p in report["most_confused"]:
        lines.append(f"| {p['true']} | {p['predicted']} | {p['count']} | {p['fraction_of_true']:.1%} |")
    lines += ["", "## Calibration", "", f"Expected calibration error: {report['ece']:.4f}.", ""]
    lines += [f"![reliability diagram]({pngs['reliability']})", ""]
    if "misclassified" in pngs:
        lines += ["## Misclassified images", "", "The most confident mistakes: predicted (probability) / true.", ""]
        lines += [f"![misclassified]({pngs['misclassified']})", ""]
    return "\n".join(lines)


def write_report(
    preds: Predictions,
    images: torch.Tensor,
    class_names: list[str],
    out_dir: str | Path,
    options: dict[str, Any] | None = None,
    tta_flip: bool = False,
    tb_writer: Any = None,
    step: int = 0,
    title: str = "Evaluation report",
) -> dict[str, Any]:
    """Compute the report and write ``report.md``, PNGs and ``confusion_matrix.csv`` to ``out_dir``.

    Args:
        preds: outputs of :func:`collect_predictions`.
        images: the split's uint8 images, indexed by ``preds.indices`` (for the grid).
        options: overrides of :data:`REPORT_DEFAULTS`.
        tta_flip: the headline numbers use flip TTA (as the model is configured).
        tb_writer: a ``SummaryWriter`` to log the scalars, figures and text to, or None.

    Returns the report (what ``metrics.json`` stores under ``report``).
    """
    opts = {**REPORT_DEFAULTS, **(options or {})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probs = preds.probs(tta_flip)
    report = compute_report(probs, preds.labels, class_names, opts["n_bins"], opts["top_confused"])
    report["tta_flip"] = bool(tta_flip)
    if preds.logits_flip is not None and opts["tta"]:
        report["tta"] = {
            "top1_no_tta": float((preds.probs(False).argmax(-1) == preds.labels).float().mean()),
            "top1_flip_tta": float((preds.probs(True).argmax(-1) == preds.labels).float().mean()),
        }

    cm = report["confusion_matrix"]
    with open(out_dir / "confusion_matrix.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, cm):
            w.writerow([name, *row])

    figs = {
        "confusion_matrix": figures.confusion_matrix_figure(torch.tensor(cm).numpy(), class_names),
        "reliability": figures.reliability_figure(report["reliability"], report["ece"]),
    }
    conf, pred = probs.max(-1)
    wrong = (pred != preds.labels).nonzero().flatten()
    wrong = wrong[conf[wrong].argsort(descending=True)][: opts["max_misclassified"]]
    if len(wrong):
        titles = [f"{class_names[pred[i]]} ({conf[i]:.2f})\ntrue: {class_names[preds.labels[i]]}" for i in wrong]
        figs["misclassified"] = figures.image_grid_figure(images[preds.indices[wrong]], titles)
    pngs = {}
    for name, fig in figs.items():
        figures.save_png(fig, out_dir / f"{name}.png")
        pngs[name] = f"{name}.png"
    report["figures"] = dict(pngs)
    (out_dir / "report.md").write_text(_markdown(report, pngs, title) + "\n")

    if tb_writer is not None and opts["tensorboard"]:
        for k, v in flat_metrics(report, "report/").items():
            tb_writer.add_scalar(k, v, step)
        for name, fig in figs.items():
            tb_writer.add_figure(f"report/{name}", fig, step, close=False)
        tb_writer.add_text("report/markdown", _markdown(report, {k: k for k in figs}, title), step)
        tb_writer.flush()
    log.info("Report written to %s (top1 %.4f, ECE %.4f)", out_dir, report["top1"], report["ece"])
    return report


def split_images(datamodule: Any, split: str = "test") -> torch.Tensor:
    """The uint8 images that :attr:`Predictions.indices` point into."""
    return datamodule.splits[split].images


def run_report(
    module: torch.nn.Module,
    datamodule: Any,
    out_dir: str | Path,
    options: dict[str, Any] | None = None,
    trainer: Any = None,
    tb_dir: str | Path | None = None,
    title: str = "Evaluation report",
) -> dict[str, Any]:
    """Report on the test split for ``run.train``/``run.evaluate``: returns the entries that
    go into ``metrics.json`` (flat ``test/*`` scalars plus the full ``report``).

    With a ``trainer`` that has just tested, the report covers the same batches as its
    test loop (``limit_test_batches``) and logs to its TensorBoard logger at its global step;
    without one, TensorBoard events go to ``tb_dir`` (if given).
    """
    opts = {**REPORT_DEFAULTS, **(options or {})}
    tta_flip = bool(getattr(module, "hparams", {}).get("tta_flip", False))
    max_batches, step, tb_writer, own_writer = None, 0, None, False
    if trainer is not None:
        n = trainer.num_test_batches[0] if trainer.num_test_batches else None
        max_batches = int(n) if n is not None and n != float("inf") else None
        step = trainer.global_step
        tb_writer = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    if tb_writer is None and tb_dir is not None and opts["tensorboard"]:
        from torch.utils.tensorboard import SummaryWriter

        tb_writer, own_writer = SummaryWriter(str(tb_dir)), True
    device = next(module.parameters()).device
    if trainer is not None:  # Lightning moves the model back to the CPU after testing
        module.to(trainer.strategy.root_device)
    try:
        preds = collect_predictions(module, datamodule, "test", flip=opts["tta"] or tta_flip, max_batches=max_batches)
        report = write_report(
            preds, split_images(datamodule), datamodule.class_names, out_dir, opts, tta_flip, tb_writer, step, title
        )
    finally:
        module.to(device)
        if own_writer:
            tb_writer.close()
    return {**flat_metrics(report), "report": report}
