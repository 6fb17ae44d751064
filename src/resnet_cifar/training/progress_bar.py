"""Lightning's progress bar, showing the training loss without a host sync at every step.

A value logged with ``self.log(..., prog_bar=True, on_step=True)`` is turned into a Python number
by Lightning after every training step (``_ResultCollection.metrics`` calls
``convert_tensors_to_scalars``), which on a GPU waits for the step to finish: the host can no
longer queue the next step ahead. The module therefore logs ``train/loss`` without ``prog_bar``,
and this bar reads the last value itself, only when it redraws (every ``refresh_rate`` steps).

Lightning's bars write to stdout; these go to stderr with every other progress of the project
(``resnet_cifar.progress``), so that stdout keeps the results and ``2> file`` catches the bars.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

LOSS_KEY = "train/loss"


def _on_stderr(init: Callable[[], Tqdm]) -> Tqdm:
    """The bar Lightning's ``init`` builds, its ``file=sys.stdout`` read while stdout is stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        return init()


class TrainProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` on stderr, with ``loss``: the latest logged ``train/loss``, read at each redraw."""

    def init_sanity_tqdm(self) -> Tqdm:
        return _on_stderr(super().init_sanity_tqdm)

    def init_train_tqdm(self) -> Tqdm:
        return _on_stderr(super().init_train_tqdm)

    def init_validation_tqdm(self) -> Tqdm:
        return _on_stderr(super().init_validation_tqdm)

    def init_test_tqdm(self) -> Tqdm:
        return _on_stderr(super().init_test_tqdm)

    def init_predict_tqdm(self) -> Tqdm:
        return _on_stderr(super().init_predict_tqdm)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get(LOSS_KEY)
        if loss is not None:
            items = {"loss": f"{float(loss):.3f}", **items}
        return items
