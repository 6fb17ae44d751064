"""Figures and the end of a run for every experiment tracker of a run: TensorBoard, MLflow, W&B.

Lightning gives its loggers a common API for scalars and hyperparameters, not for images
(``TensorBoardLogger`` has none, ``MLFlowLogger`` none, ``WandbLogger.log_image`` its own), and
``WandbLogger`` leaves its run open after the Trainer ends. The report and the prediction grid
log their figures through :func:`log_figure` (so it sits below both evaluation and training);
``run.train`` ends the runs with :func:`finish`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

from matplotlib.figure import Figure
from pytorch_lightning.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

IMAGE_LOGGERS = (TensorBoardLogger, MLFlowLogger, WandbLogger)


def image_loggers(loggers: Iterable[Logger]) -> list[Logger]:
    """The loggers :func:`log_figure` draws to (a CSV logger takes no images)."""
    return [lg for lg in loggers if isinstance(lg, IMAGE_LOGGERS)]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # at the figure's own dpi
    return buf.getvalue()


def log_figure(loggers: Iterable[Logger], tag: str, fig: Figure, step: int) -> int:
    """Log ``fig`` as ``tag`` at ``step`` to every logger that takes images; return how many did.

    TensorBoard: an image summary ``tag`` (IMAGES tab). MLflow: the artifact
    ``<tag>_step<step>.png`` (artifacts have no step; the name keeps successive epochs apart).
    W&B: an image under ``tag`` at ``trainer/global_step`` = ``step``. The figure stays open.
    """
    done = 0
    for lg in image_loggers(loggers):
        if isinstance(lg, TensorBoardLogger):
            lg.experiment.add_figure(tag, fig, global_step=step, close=False)
        elif isinstance(lg, MLFlowLogger):
            lg.experiment.log_figure(lg.run_id, fig, f"{tag}_step{step:06d}.png")
        else:  # WandbLogger: wandb.Image needs pyplot for a Figure; a PIL image of the PNG does not
            from PIL import Image

            lg.log_image(key=tag, images=[Image.open(io.BytesIO(_png(fig)))], step=step)
        done += 1
    return done


def finish(loggers: Iterable[Logger], failed: bool = False) -> None:
    """End the W&B runs of ``loggers`` (written to disk, offline or uploaded).

    ``WandbLogger.finalize`` leaves the run active: the next run of a multirun in the same
    process would join it (Lightning reuses ``wandb.run``). MLflow's runs are ended by Lightning.
    """
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        if wandb.run is not None:  # started (on rank 0)
            wandb.finish(exit_code=1 if failed else 0)
