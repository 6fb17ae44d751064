"""Checkpoints a run can be resumed from: written atomically, often, and on SIGTERM.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the target
  directory, fsyncs it and renames it over the target: a crash or a kill during the write
  leaves the previous file intact. (Lightning's own ``_atomic_save`` stages the file in
  the system temp directory and moves it; across file systems that move is a copy, and a
  kill during the copy truncates the target.) A failed write (disk full, no permission)
  becomes one :class:`~resnet_cifar.errors.OutputError` line.
- :class:`LastCheckpoint` keeps ``last.ckpt`` current: every ``every_n_train_steps``
  steps and/or ``every_n_minutes`` minutes, after every epoch, at the end of training, and
  when Lightning stops the run on SIGTERM. It also saves the global random state (dropout)
  so that a resumed run draws the same numbers as an uninterrupted one.
- :func:`resolve_ckpt_path` turns ``ckpt_path=last`` into this run directory's newest
  ``last.ckpt`` (or SLURM ``hpc_ckpt_*.ckpt``).
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from resnet_cifar.atomic import atomic_write
from resnet_cifar.errors import OutputError
from resnet_cifar.training.optim import CLOCK_EVERY

log = logging.getLogger(__name__)

LAST = "last.ckpt"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` whole or not at all (:func:`~resnet_cifar.atomic.atomic_write`)."""
    hint = "; checkpoints written before are intact (free space or fix permissions, then resume with ckpt_path=last)"
    with atomic_write(path, "wb", "checkpoint", hint) as f:
        torch.save(obj, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's fsspec path
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's GPU only: one state per visible GPU (get_rng_state_all) could not be restored
        # where fewer GPUs are visible, and each DDP process trains on one GPU.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per GPU visible when saved
        if not cuda:
            return
        cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
    torch.cuda.set_rng_state(cuda)


class LastCheckpoint(Checkpoint):
    """Keep ``<dirpath>/last.ckpt`` current, so that a crash loses little.

    Saved every ``every_n_train_steps`` optimizer steps and/or ``every_n_minutes`` of
    training (either may be null), after every ``every_n_epochs`` epochs (validation included;
    null: at an epoch end only when a step or time save is due), at the end of training and on
    SIGTERM. Epochs of a few seconds on a GPU want ``every_n_epochs`` null or large: each save of
    a ResNet-18 writes and fsyncs ~90 MB. Lightning's ``ModelCheckpoint`` cannot do this in one
    callback: its step, time and epoch triggers are mutually exclusive, and its
    ``save_last`` only follows a top-k save.

    Mid-epoch saves skip an epoch's last batch: the epoch-end save follows it, after validation.
    A ``Checkpoint`` subclass, so Lightning runs it after the ``ModelCheckpoint`` listed
    before it (the epoch's best checkpoint exists before ``last.ckpt`` moves past the epoch)
    and adds no default ``ModelCheckpoint`` when it is the only checkpoint callback.
    """

    best_model_path = ""  # Trainer.checkpoint_callback may be this callback: it tracks no best

    def __init__(
        self,
        dirpath: str | os.PathLike,
        every_n_train_steps: int | None = None,
        every_n_minutes: float | None = 10.0,
        every_n_epochs: int | None = 1,
        filename: str = LAST,
    ) -> None:
        if every_n_train_steps is not None and (not isinstance(every_n_train_steps, int) or every_n_train_steps < 1):
            raise ValueError(f"every_n_train_steps={every_n_train_steps!r} must be a positive integer or null")
        if every_n_minutes is not None and not every_n_minutes > 0:
            raise ValueError(f"every_n_minutes={every_n_minutes!r} must be > 0 or null")
        if every_n_epochs is not None and (not isinstance(every_n_epochs, int) or every_n_epochs < 1):
            raise ValueError(f"every_n_epochs={every_n_epochs!r} must be a positive integer or null")
        self.every_n_epochs = every_n_epochs
        self.path = Path(dirpath) / filename
        self.every_n_train_steps = every_n_train_steps
        self.every_n_minutes = every_n_minutes
        self._last_save = time.monotonic()
        self._saved_step = -1
        self._pending_rng: dict[str, Any] | None = None
        self._rng_at_epoch_start = False
        self._saving_at_epoch_end = False

    # ----------------------------------------------------------------- saving
    def save(self, trainer: pl.Trainer, why: str) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        self._saving_at_epoch_end = why == "epoch end"  # read by state_dict() during the save
        trainer.save_checkpoint(self.path, weights_only=False)  # every rank must call it (DDP); rank 0 writes
        self._last_save, self._saved_step = time.monotonic(), trainer.global_step
        log.debug("Saved %s (%s, step %d)", self.path, why, trainer.global_step)

    def _due(self, trainer: pl.Trainer) -> bool:
        if trainer.global_step == self._saved_step:
            return False
        if self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0:
            return True
        if self.every_n_minutes is None:
            return False
        due = time.monotonic() - self._last_save >= 60 * self.every_n_minutes
        if trainer.world_size == 1:  # one process (trainer=ddp on one GPU too): nothing to agree on, no collective
            return due
        # Under DDP the ranks must agree (saving is collective): rank 0's clock is broadcast, a collective
        # and a host sync, so it is read every CLOCK_EVERY steps only (a save comes that many steps late).
        if trainer.global_step % CLOCK_EVERY:
            return False
        return bool(trainer.strategy.broadcast(due))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_save = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch and self._due(trainer):
            self.save(trainer, "periodic")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.every_n_epochs
        if (n and (trainer.current_epoch + 1) % n == 0) or self._due(trainer):
            self.save(trainer, "epoch end")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._saved_step:
            self.save(trainer, "end of training")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # After an epoch's last batch, before (or right after) its validation: a checkpoint
            # here would resume past that validation, so keep the previous (epoch-end) one.
            log.warning("SIGTERM at the end of an epoch: %s is from step %d", self.path, self._saved_step)
            return
        self.save(trainer, "SIGTERM")
        log.warning("SIGTERM: saved %s at step %d", self.path, trainer.global_step)

    # ----------------------------------------------------- random state
    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state(), "epoch_end": self._saving_at_epoch_end}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_rng = state_dict.get("rng")
        self._rng_at_epoch_start = bool(state_dict.get("epoch_end", False))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Saved at an epoch end: the uninterrupted run went on from that state into the next
        # epoch, whose data iterator then drew from the global generator; so restore it here,
        # before the resumed run creates that iterator.
        if self._pending_rng is not None and self._rng_at_epoch_start:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Saved mid-epoch: applied at the first batch after the resume, because creating the
        # data iterator draws from the global generator, which the uninterrupted run did at
        # the epoch start, before the state was saved.
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None


def find_last_checkpoint(output_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike | None = None) -> Path | None:
    """The newest of ``<checkpoint_dir>/last.ckpt`` and SLURM's ``<output_dir>/hpc_ckpt_*.ckpt``."""
    output_dir = Path(output_dir)
    candidates = [Path(checkpoint_dir or output_dir / "checkpoints") / LAST, *output_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | os.PathLike, callbacks: list[Any]) -> str | None:
    """The checkpoint to resume from.

    ``ckpt_path=last`` is this run directory's newest last checkpoint, or None (a fresh
    start, so that one command line serves the first start and every restart). A fresh
    start in a directory that already holds a run's last checkpoint is refused: it would
    overwrite that run's checkpoints.
    """
    checkpoint_dir = next((cb.path.parent for cb in callbacks if isinstance(cb, LastCheckpoint)), None)
    found = find_last_checkpoint(output_dir, checkpoint_dir)
    if not ckpt_path and found is not None:
        raise OutputError(
            f"{output_dir} already holds a run ({found}): resume it with ckpt_path=last, "
            "or start a new run in another directory (hydra.run.dir=...)"
        )
    if ckpt_path != "last":
        return ckpt_path
    if found is None:
        log.warning(
            "ckpt_path=last: no last.ckpt in %s yet, starting from scratch. To resume a run, start it again in "
            "its directory: hydra.run.dir=<the run's directory>",
            output_dir,
        )
        return None
    log.info("Resuming from %s", found)
    return str(found)
