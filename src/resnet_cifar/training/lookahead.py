"""Lookahead of the weights (Zhang et al. 2019, "k steps forward, 1 step back") in airbench94's form.

Every ``every_n_steps`` optimizer steps a slow copy of the weights (parameters and batch-norm
statistics) moves towards the training weights, ``slow <- slow + (1 - d) (fast - slow)``, and the
training weights are set back to it. airbench94 and airbench95 (cifar10-airbench, ``LookaheadState``)
ramp ``d`` as ``decay * progress**3`` (``0.95**5 * (step / total)**3``): early in training the slow
copy simply follows (``d ~ 0``), late in training each sync pulls the weights a fifth of the way back,
an averaging that settles the last epochs of a short run.

Unlike the EMA callback (training/ema.py), which averages beside training and swaps the average in
for evaluation, lookahead changes the training trajectory itself; the two can be combined.
torch has no lookahead optimizer wrapper, and an optimizer wrapper would also have to reach the
batch-norm statistics: hence a callback. The slow copy is saved in checkpoints (the callback's
state), so a resumed run continues bit for bit.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from resnet_cifar.errors import ConfigError


class Lookahead(pl.Callback):
    """Pull the training weights back to a slow copy every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: steps between syncs (airbench94: 5).
        decay: the slow copy's decay per sync at the end of training (airbench94: ``0.95**5``).
        ramp: ``cubic``: ``d = decay * progress**3`` (airbench94), with ``progress`` the fraction of
            training done (:meth:`~resnet_cifar.training.module.ImageClassifier.training_progress`,
            steps or wall-clock); ``none``: ``d = decay`` throughout.
    """

    def __init__(self, every_n_steps: int = 5, decay: float = 0.95**5, ramp: str = "cubic") -> None:
        # ConfigError: a one-line error through Hydra's instantiate (the callbacks group has no schema)
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ConfigError(f"callbacks.lookahead.every_n_steps={every_n_steps!r}: expected an integer >= 1")
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"callbacks.lookahead.decay={decay!r}: expected a number in [0, 1)")
        if ramp not in ("cubic", "none"):
            raise ConfigError(f"callbacks.lookahead.ramp={ramp!r}: expected cubic or none")
        self.every_n_steps, self.decay, self.ramp = every_n_steps, float(decay), ramp
        self.slow: list[torch.Tensor] | None = None
        self._loaded: list[torch.Tensor] | None = None

    @staticmethod
    def _tensors(pl_module: pl.LightningModule) -> list[torch.Tensor]:
        return [t for t in (*pl_module.parameters(), *pl_module.buffers()) if torch.is_floating_point(t)]

    def decay_at(self, progress: float) -> float:
        return self.decay * min(1.0, max(0.0, progress)) ** 3 if self.ramp == "cubic" else self.decay

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        current = self._tensors(pl_module)
        if self._loaded is not None:  # a resume: the checkpoint's slow copy
            self.slow = [s.to(c.device) for s, c in zip(self._loaded, current, strict=True)]
            self._loaded = None
        else:
            self.slow = [t.detach().clone() for t in current]

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.slow is None or step == 0 or step % self.every_n_steps:
            return
        progress = getattr(pl_module, "training_progress", None)
        if progress is not None:
            fraction = progress(step)
        else:
            fraction = step / max(1.0, float(trainer.estimated_stepping_batches))
        weight = 1.0 - self.decay_at(fraction)
        fast = self._tensors(pl_module)
        torch._foreach_lerp_(self.slow, fast, weight)
        torch._foreach_copy_(fast, self.slow)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": [t.cpu() for t in self.slow]} if self.slow is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict.get("slow")
