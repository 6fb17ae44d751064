"""A Lightning callback that shows what the model predicts on a fixed set of validation images."""

from __future__ import annotations

import torch
from pytorch_lightning import Callback, LightningModule, Trainer

from resnet_cifar.evaluation.figures import image_grid_figure
from resnet_cifar.trackers import image_loggers, log_figure


class ValidationPredictionGrid(Callback):
    """Every ``every_n_epochs`` (and after the last epoch), log a grid of the same validation
    images with predicted class, probability and true class as ``val/predictions`` to every
    logger that takes images (TensorBoard, MLflow, W&B: :func:`~resnet_cifar.trackers.log_figure`).

    The images are fixed for the whole run (round-robin over classes in validation order), so
    the grids of successive epochs show how the predictions change. Without such a logger
    or a validation split it does nothing.
    """

    def __init__(self, every_n_epochs: int = 5, num_images: int = 16, ncols: int = 8) -> None:
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError("every_n_epochs and num_images must be >= 1")
        self.every_n_epochs, self.num_images, self.ncols = every_n_epochs, num_images, ncols
        self._positions: torch.Tensor | None = None

    def _pick(self, labels: torch.Tensor) -> torch.Tensor:
        """Positions in the split: the first image of each class, then the second, ..."""
        labels = labels.cpu()
        rank = torch.zeros_like(labels)
        for c in labels.unique():
            sel = (labels == c).nonzero().flatten()
            rank[sel] = torch.arange(len(sel))
        order = sorted(range(len(labels)), key=lambda i: (int(rank[i]), i))
        return torch.tensor(order[: self.num_images], dtype=torch.long)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        dm = trainer.datamodule
        split = getattr(dm, "splits", {}).get("val") if dm is not None else None
        if not image_loggers(trainer.loggers) or split is None or len(split) == 0:
            return
        if self._positions is None:
            self._positions = self._pick(split.labels[split.indices])
        index = split.indices[self._positions.to(split.indices.device)]
        images, labels = split.images[index], split.labels[index]
        device = pl_module.device
        x, _ = dm.transform_batch((images.to(device), labels, index.to(device)), train=False)
        with torch.no_grad():
            logits = pl_module.predict_logits(x) if hasattr(pl_module, "predict_logits") else pl_module(x)
            # the module's probabilities: temperature-scaled once it has a temperature (evaluation/calibration.py)
            scaled = getattr(pl_module, "probabilities", None)
            probs = scaled(logits) if scaled is not None else logits.float().softmax(-1)
        conf, pred = probs.max(-1)
        names = dm.class_names
        titles = [f"{names[p]} ({c:.2f})\ntrue: {names[t]}" for p, c, t in zip(pred.tolist(), conf.tolist(), labels)]
        colours = ["tab:green" if p == t else "tab:red" for p, t in zip(pred.tolist(), labels.tolist())]
        fig = image_grid_figure(images.cpu(), titles, colours, ncols=self.ncols)
        log_figure(trainer.loggers, "val/predictions", fig, trainer.global_step)
