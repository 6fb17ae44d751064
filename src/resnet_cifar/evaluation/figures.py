"""Matplotlib figures of an evaluation: confusion matrix, reliability diagram, image grids.

Each function returns a ``Figure`` (drawn with the non-interactive Agg canvas, so it works
headless); :func:`save_png` writes it and closes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
    return path


def confusion_matrix_figure(cm: np.ndarray, class_names: Sequence[str], title: str = "Confusion matrix") -> Figure:
    """Rows: true class, columns: predicted class; colour = row-normalised rate, text = count."""
    cm = np.asarray(cm)
    n = len(class_names)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.55 * n + 2.0)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                colour = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8, color=colour)
    return fig


def reliability_figure(
    bins: dict[str, list[float]],
    ece: float,
    calibrated: dict[str, list[float]] | None = None,
    ece_calibrated: float | None = None,
    temperature: float | None = None,
) -> Figure:
    """Accuracy per confidence bin against the diagonal, with the number of images per bin.

    With ``calibrated`` (the bins after temperature scaling), its curve (accuracy at each bin's mean
    confidence) and image counts are drawn over the raw ones.
    """
    lo, hi = np.asarray(bins["lower"]), np.asarray(bins["upper"])
    acc, conf, count = np.asarray(bins["accuracy"]), np.asarray(bins["confidence"]), np.asarray(bins["count"])
    fig = _figure(5.0, 6.0)
    ax, ax_n = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    width = hi - lo
    filled = count > 0
    ax.bar(lo[filled], acc[filled], width=width[filled], align="edge", edgecolor="black", label="accuracy")
    ax.bar(
        lo[filled],
        conf[filled] - acc[filled],
        bottom=acc[filled],
        width=width[filled],
        align="edge",
        color="tab:red",
        alpha=0.3,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    title = f"Reliability diagram (ECE = {ece:.4f})"
    ax_n.bar(lo, count, width=width, align="edge", color="gray", label="softmax")
    if calibrated is not None:
        c_conf, c_acc = np.asarray(calibrated["confidence"]), np.asarray(calibrated["accuracy"])
        c_count = np.asarray(calibrated["count"])
        c_filled = c_count > 0
        label = f"after temperature scaling (T = {temperature:.3g})" if temperature else "after temperature scaling"
        ax.plot(c_conf[c_filled], c_acc[c_filled], "o-", color="tab:green", linewidth=2, markersize=4, label=label)
        ax_n.step(hi, c_count, where="pre", color="tab:green", label="calibrated")
        ax_n.legend(loc="upper left", fontsize=7)
        title = f"Reliability diagram (ECE {ece:.4f} -> {ece_calibrated:.4f} calibrated)"
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax_n.set_xlim(0, 1)
    ax_n.set_xlabel("confidence (max softmax probability)")
    ax_n.set_ylabel("images")
    return fig


def image_grid_figure(
    images: torch.Tensor, titles: Sequence[str], colours: Sequence[str] | None = None, ncols: int = 6
) -> Figure:
    """A grid of uint8 ``(N, 3, H, W)`` images, each with a title (e.g. ``pred / true``)."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig = _figure(1.9 * ncols, 2.1 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for k, ax in enumerate(axes):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(images[k].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        ax.set_title(titles[k], fontsize=7, color=(colours[k] if colours else "black"))
    fig.tight_layout()
    return fig
