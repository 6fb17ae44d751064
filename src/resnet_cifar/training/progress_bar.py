"""Lightning's progress bar, showing the training loss without a host sync at every step.

A value logged with ``self.log(..., prog_bar=True, on_step=True)`` is turned into a Python number
by Lightning after every training step (``_ResultCollection.metrics`` calls
``convert_tensors_to_scalars``), which on a GPU waits for the step to finish: the host can no
longer queue the next step ahead. The module therefore logs ``train/loss`` without ``prog_bar``,
and this bar reads the last value itself, only when it redraws (every ``refresh_rate`` steps).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

LOSS_KEY = "train/loss"


class TrainProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` with ``loss``: the latest logged ``train/loss``, read at each redraw."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get(LOSS_KEY)
        if loss is not None:
            items = {"loss": f"{float(loss):.3f}", **items}
        return items
