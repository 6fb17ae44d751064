"""An exponential moving average (EMA) of the weights, for validation, test, checkpoints and export.

Built on Lightning's :class:`~pytorch_lightning.callbacks.WeightAveraging` (the class under its
``EMAWeightAveraging``), which keeps a copy of the module (``torch.optim.swa_utils.AveragedModel``,
parameters and buffers: the batch-norm statistics are averaged too), swaps the average in for
every validation, and writes checkpoints with the average as ``state_dict`` and the training
weights beside it (``current_model_state``; ``averaging_state`` holds the update count). So the
best checkpoint is chosen on the EMA's ``val/acc``, and everything that reads a checkpoint's
``state_dict`` (``eval.py``, ``predict.py``, ``export.py``, ``model.weights_path``) gets the EMA
weights, while a resume restores both copies and continues bit for bit.

What this subclass adds, each for a gap of Lightning 2.6's callback:

- **Testing after fit.** Lightning restores callbacks in every stage, so in
  ``trainer.test(ckpt_path=best)`` after ``fit`` (what ``train.py`` does), the parent's
  ``on_load_checkpoint`` loads the checkpoint's *training* weights (``current_model_state``) into
  the module: ``test/acc`` and the report would not be those of the EMA weights that the
  checkpoint was chosen for. Here the callback restores only while fitting.
- **A save after training ends.** The parent copies the average over the training weights at
  ``on_train_end``; a ``last.ckpt`` written after that (``LastCheckpoint``'s save at the end of a
  run that stopped mid-epoch on ``trainer.max_time`` or ``max_steps`` with ``every_n_epochs: null``,
  as ``gpu_3min``) would hold the average twice, and a resume would continue from the average. Here the two are
  swapped instead, and such a save still stores the training weights as ``current_model_state``.
- **Decay warm-up** (``warmup=true``, off by default): the decay of update ``n`` (counted from 0)
  is ``min(decay, (1 + n) / (10 + n))`` (``tf.train.ExponentialMovingAverage``'s ``num_updates``
  rule), so early validations are not dominated by the initial weights.
- **Integer buffers** (batch norm's ``num_batches_tracked``) are copied, not averaged.
- **No host sync per update**: :class:`EmaModel` keeps the update count in Python, where torch's
  ``AveragedModel`` reads it back from the device several times per update.
- **Before the first update** (``update_starting_at_step``) the parent's average is the initial
  weights, so validations, checkpoints and a test after a short run would see an untrained
  network. Here the average follows the training weights until it starts.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torch.optim.swa_utils import AveragedModel

from resnet_cifar.errors import ConfigError


class EmaUpdate:
    """``AveragedModel``'s ``multi_avg_fn``: ``ema <- lerp(ema, current, 1 - decay_n)`` on every float tensor.

    :class:`EmaModel` copies the weights at its first update (``n_averaged == 0``) and calls this
    from the second on, with ``n_averaged`` >= 1 updates already in the average.
    """

    def __init__(self, decay: float, warmup: bool = False) -> None:
        self.decay, self.warmup = float(decay), warmup

    def decay_at(self, n_averaged: int) -> float:
        """The decay applied when ``n_averaged`` updates are already in the average."""
        return min(self.decay, (1 + n_averaged) / (10 + n_averaged)) if self.warmup else self.decay

    @torch.no_grad()
    def __call__(self, ema: list[torch.Tensor], current: list[torch.Tensor], n_averaged: int) -> None:
        weight = 1.0 - self.decay_at(int(n_averaged))  # a Python int from EmaModel: no host sync
        if torch.is_floating_point(ema[0]):  # the tensors arrive grouped by device and dtype
            torch._foreach_lerp_(ema, current, weight)
        else:
            torch._foreach_copy_(ema, current)


class EmaModel(AveragedModel):
    """torch's ``AveragedModel`` with its update count kept in Python too (``count``), read back once.

    ``AveragedModel.update_parameters`` reads its ``n_averaged`` buffer on the host at every update
    (``bool(n_averaged == 0)``, ``n_averaged > 0``) and hands it to ``multi_avg_fn`` as a tensor, which
    :class:`EmaUpdate` needs as a number, once per dtype group: ~4 host syncs per EMA update on a GPU.
    Here the buffer is read once (at the first update, and after a ``load_state_dict``) and only
    incremented on the device after that; the update is torch's otherwise (copy, then
    ``multi_avg_fn`` per device and dtype group), so checkpoints and resumes are unchanged.
    """

    def __init__(self, model: nn.Module, device: torch.device | int | None, ema: EmaUpdate) -> None:
        super().__init__(model, device=device, multi_avg_fn=ema, use_buffers=True)
        self._count: int | None = None

    @property
    def count(self) -> int:
        """Updates in the average (``n_averaged``)."""
        if self._count is None:
            self._count = int(self.n_averaged)
        return self._count

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self._count = None  # n_averaged comes from the state: read it again
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged = [t.detach() for t in (*self.module.parameters(), *self.module.buffers())]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        current = [c.to(a.device) for a, c in zip(averaged, current, strict=True)]
        n = self.count
        if n == 0:
            for a, c in zip(averaged, current):
                a.copy_(c)
        else:
            groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
            for a, c in zip(averaged, current):
                group = groups.setdefault((a.device, a.dtype), ([], []))
                group[0].append(a)
                group[1].append(c)
            for group_averaged, group_current in groups.values():
                self.multi_avg_fn(group_averaged, group_current, n)
        self.n_averaged += 1
        self._count = n + 1


class EMAWeights(WeightAveraging):
    """EMA of the weights and batch-norm statistics, updated every ``update_every_n_steps`` optimizer steps.

    Args:
        decay: the average's decay per update (``0.99`` per step over 5 steps is ``0.99**5``: Page's
            cifar10-fast EMA). The average spans about ``update_every_n_steps / (1 - decay)`` steps.
        update_every_n_steps: update after every N-th optimizer step (the first step included).
        update_starting_at_step: first optimizer step (0-based) that updates the average; null: the first.
            Until then the average is the initial weights (copied at the first update).
        warmup: ramp the decay up as ``min(decay, (1 + n) / (10 + n))`` over the first updates.
        device: where the average lives (null: the model's device; ``cpu`` to save GPU memory).
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        warmup: bool = False,
        device: str | None = None,
    ) -> None:
        # ConfigError: a one-line error through Hydra's instantiate (the callbacks group has no schema)
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"callbacks.ema.decay={decay!r}: expected a number in [0, 1)")
        if not isinstance(update_every_n_steps, int) or update_every_n_steps < 1:
            raise ConfigError(f"callbacks.ema.update_every_n_steps={update_every_n_steps!r}: expected an integer >= 1")
        if update_starting_at_step is not None and update_starting_at_step < 0:
            raise ConfigError(
                f"callbacks.ema.update_starting_at_step={update_starting_at_step!r}: expected >= 0 or null"
            )
        super().__init__(device=device, use_buffers=True)
        self.ema = EmaUpdate(decay, warmup)
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step or 0
        self._swapped_at_end = False

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return (
            step_idx is not None
            and step_idx >= self.update_starting_at_step
            and (step_idx - self.update_starting_at_step) % self.update_every_n_steps == 0
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The parent's setup builds a plain AveragedModel here (after configure_model, which ImageClassifier
        # does not override); this one builds an EmaModel, which counts its updates without host syncs.
        if stage == "fit":
            self._average_model = EmaModel(pl_module, self._device or pl_module.device, self.ema)
            self._swapped_at_end = False

    def _follow_until_started(self, pl_module: pl.LightningModule) -> None:
        """Before the first update, make the average the training weights (the first update copies anyway)."""
        if self._average_model is not None and self._average_model.count == 0:
            self._copy_current_to_average(pl_module)

    def _copy_current_to_average(self, pl_module: pl.LightningModule) -> None:
        assert self._average_model is not None
        average = [*self._average_model.module.parameters(), *self._average_model.module.buffers()]
        current = [*pl_module.parameters(), *pl_module.buffers()]
        with torch.no_grad():
            for a, c in zip(average, current, strict=True):
                a.copy_(c)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._follow_until_started(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._follow_until_started(pl_module)
        # The module takes the average (tested after fit when there is no best checkpoint); the averaged
        # model keeps the training weights for a checkpoint written after this (see the module docstring).
        self._swap_models(pl_module)
        self._swapped_at_end = True

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is None or not self._swapped_at_end:
            self._follow_until_started(pl_module)
            return super().on_save_checkpoint(trainer, pl_module, checkpoint)
        # After on_train_end the roles are swapped: state_dict already holds the average.
        state = self._average_model.state_dict()
        checkpoint["current_model_state"] = {k[7:]: v for k, v in state.items() if k.startswith("module.")}
        checkpoint["averaging_state"] = {k: v for k, v in state.items() if not k.startswith("module.")}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # a resume; evaluation keeps the checkpoint's state_dict: the EMA
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
