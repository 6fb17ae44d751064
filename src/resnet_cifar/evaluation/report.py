"""The evaluation report's files, for ``eval.py`` and the end of ``train.py``: ``report.md``,
PNG figures, ``confusion_matrix.csv``, and the same numbers and figures in the run's loggers
(TensorBoard, MLflow, W&B).

The numbers come from the test loop itself (:class:`~resnet_cifar.evaluation.metrics.ReportMetrics`,
synchronised across processes); this module only presents them, on rank 0.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.loggers import Logger, TensorBoardLogger

from resnet_cifar.evaluation import figures
from resnet_cifar.trackers import log_figure

log = logging.getLogger(__name__)


def most_confused(confusion: list[list[int]], class_names: list[str], top: int) -> list[dict[str, Any]]:
    """The ``top`` largest off-diagonal cells: (true, predicted) pairs with their counts."""
    cm = torch.tensor(confusion)
    support = cm.sum(1)
    off = cm.clone()
    off.fill_diagonal_(0)
    pairs = []
    values, flat = off.flatten().sort(descending=True, stable=True)
    for v, f in zip(values.tolist(), flat.tolist()):
        if v == 0 or len(pairs) >= top:
            break
        t, p = divmod(f, len(class_names))
        pairs.append(
            {
                "true": class_names[t],
                "predicted": class_names[p],
                "count": int(v),
                "fraction_of_true": float(v / max(int(support[t]), 1)),
            }
        )
    return pairs


SCALARS = (
    *("top1", "top5", "macro_precision", "macro_recall", "macro_f1", "ece", "nll"),
    *("ece_calibrated", "nll_calibrated"),  # after temperature scaling (evaluation/calibration.py)
)


def flat_metrics(report: dict[str, Any], prefix: str = "test/") -> dict[str, float]:
    """The report's scalars as ``<prefix><name>`` (what sweep tables and TensorBoard compare)."""
    out = {f"{prefix}{k}": float(report[k]) for k in SCALARS if k in report}
    for name, value in report.get("tta", {}).items():
        out[f"{prefix}{name}"] = float(value)
    return out


def tta_name(report: dict[str, Any]) -> str:
    """The headline's test-time augmentation in words (``flip + 1-pixel translate TTA``, ``no TTA``)."""
    shift = report.get("tta_translate", 0)
    parts = (["flip"] if report.get("tta_flip") else []) + ([f"{shift}-pixel translate"] if shift else [])
    return " + ".join(parts) + " TTA" if parts else "no TTA"


def _markdown(report: dict[str, Any], pngs: dict[str, str], title: str) -> str:
    lines = [f"# {title}", ""]
    lines += [f"{report['num_images']} images; top-1 and every figure with {tta_name(report)}.", ""]
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
    lines += ["", "## Calibration", "", _calibration_text(report), ""]
    lines += [f"![reliability diagram]({pngs['reliability']})", ""]
    if "misclassified" in pngs:
        lines += ["## Misclassified images", "", "The most confident mistakes: predicted (probability) / true.", ""]
        lines += [f"![misclassified]({pngs['misclassified']})", ""]
    return "\n".join(lines)


def _calibration_text(report: dict[str, Any]) -> str:
    """One paragraph: the ECE and NLL of the raw and of the temperature-scaled probabilities, and where T came from."""
    raw = f"expected calibration error {report['ece']:.4f}, NLL {report['nll']:.4f}"
    t, note = report.get("temperature"), report.get("calibration") or {}
    if t is None or "ece_calibrated" not in report:
        why = note.get("skipped", "report.calibrate=false")
        return f"Softmax probabilities: {raw}. Not calibrated: {why}."
    return (
        f"Softmax probabilities: {raw}. After temperature scaling (T = {t:.4f}, {note.get('source', '')}; "
        f"the probabilities predict.py gives): expected calibration error {report['ece_calibrated']:.4f}, "
        f"NLL {report['nll_calibrated']:.4f}. Accuracy and top-5 do not change."
    )


def write_report(
    report: dict[str, Any],
    images: torch.Tensor,
    class_names: list[str],
    out_dir: str | Path,
    options: dict[str, Any],
    loggers: Sequence[Logger] = (),
    step: int = 0,
    title: str = "Evaluation report",
) -> dict[str, Any]:
    """Write ``report.md``, PNGs and ``confusion_matrix.csv`` to ``out_dir`` (and to ``loggers``).

    Args:
        report: :meth:`ReportMetrics.compute` of the test loop, with ``tta_flip`` set.
        images: the test split's uint8 images, indexed by ``report['mistakes']['index']``.
        options: the ``report`` config group (``top_confused``, ``loggers``, ...).
        loggers: Lightning loggers to log the scalars (``report/*``) and figures to; TensorBoard
            also gets ``report.md`` as text.

    Returns the report (what ``metrics.json`` stores under ``report``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cm = report["confusion_matrix"]
    report = {**report, "most_confused": most_confused(cm, class_names, options["top_confused"])}
    with open(out_dir / "confusion_matrix.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, cm):
            w.writerow([name, *row])

    figs = {
        "confusion_matrix": figures.confusion_matrix_figure(torch.tensor(cm).numpy(), class_names),
        "reliability": figures.reliability_figure(
            report["reliability"],
            report["ece"],
            report.get("reliability_calibrated"),
            report.get("ece_calibrated"),
            report.get("temperature"),
        ),
    }
    m = report["mistakes"]
    if m["index"]:
        titles = [
            f"{class_names[p]} ({c:.2f})\ntrue: {class_names[t]}"
            for p, c, t in zip(m["predicted"], m["confidence"], m["target"])
        ]
        figs["misclassified"] = figures.image_grid_figure(images[torch.tensor(m["index"])], titles)
    pngs = {}
    for name, fig in figs.items():
        figures.save_png(fig, out_dir / f"{name}.png")
        pngs[name] = f"{name}.png"
    report["figures"] = dict(pngs)
    (out_dir / "report.md").write_text(_markdown(report, pngs, title) + "\n")

    if options["loggers"]:
        for lg in loggers:
            lg.log_metrics(flat_metrics(report, "report/"), step)
        for name, fig in figs.items():
            log_figure(loggers, f"report/{name}", fig, step)
        for lg in loggers:
            if isinstance(lg, TensorBoardLogger):
                lg.experiment.add_text("report/markdown", _markdown(report, {k: k for k in figs}, title), step)
            lg.save()  # after the Trainer's own last save (CSV rows, TensorBoard flush)
    calibrated = f" -> {report['ece_calibrated']:.4f} calibrated" if "ece_calibrated" in report else ""
    log.info("Report written to %s (top1 %.4f, ECE %.4f%s)", out_dir, report["top1"], report["ece"], calibrated)
    return report


def save_report(
    module: Any,
    datamodule: Any,
    trainer: Any,
    out_dir: str | Path,
    options: dict[str, Any],
    tb_dir: str | Path | None = None,
    title: str = "Evaluation report",
) -> dict[str, Any]:
    """Rank 0, after ``trainer.test`` with ``module.enable_report``: write the report of that test
    loop; return the entries of ``metrics.json`` (flat ``test/*`` scalars plus the full ``report``).

    Figures and scalars go to the trainer's loggers at its global step; a trainer without
    loggers (``eval.py``) writes them to a TensorBoard log in ``tb_dir`` (if given).
    """
    if module.test_report is None:
        raise RuntimeError("no report was accumulated: call module.enable_report() before trainer.test()")
    report = {
        **module.test_report,
        "tta_flip": bool(module.hparams.get("tta_flip", False)),
        "tta_translate": int(module.hparams.get("tta_translate", 0)),
    }
    loggers = list(trainer.loggers)
    own = not loggers and tb_dir is not None and options["loggers"]
    if own:
        tb_dir = Path(tb_dir)
        loggers = [TensorBoardLogger(tb_dir.parent, name=tb_dir.name, version="", default_hp_metric=False)]
    try:
        images = datamodule.splits["test"].images
        report = write_report(
            report, images, datamodule.class_names, out_dir, options, loggers, trainer.global_step, title
        )
    finally:
        if own:
            loggers[0].finalize("success")
    return {**flat_metrics(report), "report": report}
