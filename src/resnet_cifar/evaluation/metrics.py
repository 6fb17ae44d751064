"""Every number of the evaluation report, accumulated in the one test loop and synchronised across ranks.

:class:`ReportMetrics` is updated at each test step (the Trainer's progress bar shows the
pass) and computed at the end of the test epoch: torchmetrics reduces the states of all
processes, so under DDP the report covers every test image exactly once and its top-1 is
the logged ``test/acc``. The figures are drawn on rank 0 from the computed values
(:mod:`resnet_cifar.evaluation.report`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.wrappers import ClasswiseWrapper

from resnet_cifar.evaluation.calibration import scaled_softmax


class ReliabilityBins(Metric):
    """Per equal-width confidence bin: image count, summed confidence, correct predictions.

    Bin ``k`` holds confidences in ``(k / n, (k + 1) / n]``, as torchmetrics' calibration
    error bins them, so the diagram and the ECE agree.
    """

    full_state_update = False

    def __init__(self, n_bins: int = 15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_bins = n_bins
        for name in ("count", "confidence", "correct"):
            self.add_state(name, torch.zeros(n_bins), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        conf, pred = probs.float().max(-1)
        edges = torch.linspace(0, 1, self.n_bins + 1, device=conf.device)
        which = torch.clamp(torch.bucketize(conf, edges, right=False) - 1, 0, self.n_bins - 1)
        self.count += torch.bincount(which, minlength=self.n_bins).float()
        self.confidence.index_add_(0, which, conf)
        self.correct.index_add_(0, which, (pred == target).float())

    def compute(self) -> dict[str, list[float]]:
        edges = torch.linspace(0, 1, self.n_bins + 1)
        safe = self.count.clamp(min=1).cpu()
        return {
            "lower": edges[:-1].tolist(),
            "upper": edges[1:].tolist(),
            "count": self.count.long().tolist(),
            "confidence": (self.confidence.cpu() / safe).tolist(),
            "accuracy": (self.correct.cpu() / safe).tolist(),
        }


class TopMistakes(Metric):
    """The ``k`` most confident wrong predictions: confidence, image index, predicted and true class."""

    full_state_update = False

    def __init__(self, k: int = 36, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.k = k
        for name in ("confidence", "index", "predicted", "target"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> None:
        conf, pred = probs.float().max(-1)
        wrong = (pred != target).nonzero().flatten()
        wrong = wrong[conf[wrong].argsort(descending=True)][: self.k]  # only these can be among the k overall
        self.confidence.append(conf[wrong])
        self.index.append(index[wrong].long())
        self.predicted.append(pred[wrong])
        self.target.append(target[wrong].long())

    def compute(self) -> dict[str, list]:
        def cat(x: Any) -> torch.Tensor:
            return torch.cat(x) if isinstance(x, list) else x

        if isinstance(self.confidence, list) and not self.confidence:
            return {"confidence": [], "index": [], "predicted": [], "target": []}
        conf = cat(self.confidence)
        top = conf.argsort(descending=True)[: self.k]
        return {
            "confidence": conf[top].tolist(),
            "index": cat(self.index)[top].tolist(),
            "predicted": cat(self.predicted)[top].tolist(),
            "target": cat(self.target)[top].tolist(),
        }


class ReportMetrics(nn.Module):
    """The report's metrics over one pass of the test set.

    Args:
        class_names: names of the classes, in label order.
        n_bins: confidence bins of the ECE and the reliability diagram.
        max_misclassified: the most confident mistakes kept for the grid.
        tta: also score the plain and the mirrored-and-averaged logits (top-1 with and without flip TTA).

    :attr:`temperature` (set before the test loop by
    :class:`~resnet_cifar.evaluation.calibration.TemperatureScaling`; None: not calibrated) adds the ECE,
    NLL and reliability bins of the temperature-scaled probabilities beside the raw ones; the most
    confident mistakes are then ranked and shown with the calibrated probabilities, as a user sees them.
    """

    def __init__(self, class_names: list[str], n_bins: int = 15, max_misclassified: int = 36, tta: bool = True) -> None:
        super().__init__()
        c = len(class_names)
        self.class_names = list(class_names)
        self.tta = tta

        def classwise(metric: Metric, name: str) -> ClasswiseWrapper:
            return ClasswiseWrapper(metric, labels=self.class_names, prefix=f"{name}/")

        per_class = {"num_classes": c, "average": None, "zero_division": 0}
        self.collection = MetricCollection(
            {
                "top1": MulticlassAccuracy(c, average="micro"),
                "top5": MulticlassAccuracy(c, average="micro", top_k=min(5, c)),  # < 5 classes: every image
                "precision": classwise(MulticlassPrecision(**per_class), "precision"),
                "recall": classwise(MulticlassRecall(**per_class), "recall"),
                "f1": classwise(MulticlassF1Score(**per_class), "f1"),
                "confusion_matrix": MulticlassConfusionMatrix(c),
            },
            compute_groups=False,
        )
        self.ece = MulticlassCalibrationError(c, n_bins=n_bins, norm="l1")  # on probabilities
        self.nll = MeanMetric()
        self.reliability = ReliabilityBins(n_bins)
        # the same after temperature scaling (updated only once a temperature is set)
        self.ece_calibrated = MulticlassCalibrationError(c, n_bins=n_bins, norm="l1")
        self.nll_calibrated = MeanMetric()
        self.reliability_calibrated = ReliabilityBins(n_bins)
        self.temperature: float | None = None
        self.calibration: dict[str, Any] = {}  # where the temperature came from, or why there is none
        self.mistakes = TopMistakes(max_misclassified)
        if tta:
            self.top1_no_tta = MulticlassAccuracy(c, average="micro")
            self.top1_flip_tta = MulticlassAccuracy(c, average="micro")

    def update(
        self,
        headline: torch.Tensor,
        target: torch.Tensor,
        index: torch.Tensor,
        logits: torch.Tensor | None = None,
        logits_flip: torch.Tensor | None = None,
    ) -> None:
        """One test batch.

        ``headline``: the logits the model predicts with (averaged with the mirror image's under flip
        TTA), the very tensor ``test/acc`` is computed from, so that the report's top-1 is ``test/acc``
        exactly under every precision: the caller casts to fp32 once. The class decisions (top-k,
        precision, recall, F1, confusion) take these logits, the calibration numbers their softmax.
        ``logits`` / ``logits_flip``: of the images as they are and of their mirror images, for the
        top-1 with and without TTA (``tta``).
        """
        headline, target = headline.float(), target.long()
        probs = headline.softmax(-1)
        self.collection.update(headline, target)
        self.ece.update(probs, target)
        self.nll.update(F.nll_loss(probs.clamp_min(1e-12).log(), target), weight=len(target))
        self.reliability.update(probs, target)
        if self.temperature is not None:
            probs = scaled_softmax(headline, self.temperature)
            self.ece_calibrated.update(probs, target)
            self.nll_calibrated.update(F.nll_loss(probs.clamp_min(1e-12).log(), target), weight=len(target))
            self.reliability_calibrated.update(probs, target)
        self.mistakes.update(probs, target, index)
        if self.tta and logits is not None and logits_flip is not None:
            logits, logits_flip = logits.float(), logits_flip.float()
            self.top1_no_tta.update(logits, target)
            self.top1_flip_tta.update((logits + logits_flip) / 2, target)

    def compute(self) -> dict[str, Any]:
        """The report's numbers (synchronised over all processes): what ``metrics.json`` stores."""
        values = self.collection.compute()
        names = self.class_names
        cm = values["confusion_matrix"].long()
        per_class = {
            name: {
                "precision": float(values[f"precision/{name}"]),
                "recall": float(values[f"recall/{name}"]),
                "f1": float(values[f"f1/{name}"]),
                "support": int(cm[i].sum()),
            }
            for i, name in enumerate(names)
        }
        report: dict[str, Any] = {
            "num_images": int(cm.sum()),
            "top1": float(values["top1"]),
            "top5": float(values["top5"]),
            "macro_precision": sum(m["precision"] for m in per_class.values()) / len(names),
            "macro_recall": sum(m["recall"] for m in per_class.values()) / len(names),
            "macro_f1": sum(m["f1"] for m in per_class.values()) / len(names),
            "ece": float(self.ece.compute()),
            "nll": float(self.nll.compute()),
            "per_class": per_class,
            "confusion_matrix": cm.tolist(),
            "reliability": self.reliability.compute(),
            "mistakes": self.mistakes.compute(),
        }
        report["temperature"] = self.temperature
        report["calibration"] = dict(self.calibration)
        if self.temperature is not None and self.nll_calibrated.update_count:
            report["ece_calibrated"] = float(self.ece_calibrated.compute())
            report["nll_calibrated"] = float(self.nll_calibrated.compute())
            report["reliability_calibrated"] = self.reliability_calibrated.compute()
        if self.tta and self.top1_no_tta.update_count:
            report["tta"] = {
                "top1_no_tta": float(self.top1_no_tta.compute()),
                "top1_flip_tta": float(self.top1_flip_tta.compute()),
            }
        return report

    def reset(self) -> None:
        for m in self.modules():
            if isinstance(m, (Metric, MetricCollection)) and m is not self:
                m.reset()
