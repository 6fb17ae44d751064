"""A wall-clock budget for the whole command: training stops early by a reserve measured in the run.

Lightning's ``Timer`` (``trainer.max_time``) stops *training* when its time is spent; what follows
(the last validation, the test, the report) runs past it, and how long that takes depends on the
CPU: a constant reserve tuned on one machine breaks the budget on a slower one (issue 39: 4 min 7 s
after a 27:30 budget on an AVX512-BF16 EPYC, against 2:30 allowed). :class:`BudgetTimer` is that
``Timer`` (Lightning then adds none of its own) with ``whole_command=true``:

- the budget starts when the command does (the process's start, read from ``/proc``), so
  imports, data loading, compilation and the sanity check count;
- the evaluation rate is measured in the run: seconds per view of every validation batch after
  the first (the sanity check's second batch already gives it, before the first training step);
- training stops when ``elapsed + start-up + reserve`` reaches the budget, where the reserve is
  what is left to do after the stop: the last validation and the test (their images times their
  TTA views, at the measured rate, times ``safety``), plus one training step (the Timer checks
  between steps) and ``fixed_s`` for the report, the checkpoints and the exit. The log states it.

The LR schedule over time (:func:`~resnet_cifar.training.optim.budget_progress`) reads
:meth:`BudgetTimer.training_budget`, so it ends where training does.

Under DDP (issue 36: Lightning's Timer broadcasts its decision every step, a host sync each), rank 0's
decision is broadcast every :data:`~resnet_cifar.training.optim.CLOCK_EVERY` steps; one process
broadcasts nothing.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Timer

from resnet_cifar.training.optim import CLOCK_EVERY

log = logging.getLogger(__name__)

_FIRST_TIMER_OF_PROCESS = True


def process_age() -> float:
    """Seconds since this process started (Linux ``/proc``); 0 where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def command_start() -> float:
    """``time.monotonic()`` at the start of this job: the process's start for its first job, now for the next
    ones (a Hydra multirun runs its jobs one after another in one process)."""
    global _FIRST_TIMER_OF_PROCESS
    now = time.monotonic()
    if _FIRST_TIMER_OF_PROCESS:
        _FIRST_TIMER_OF_PROCESS = False
        return now - process_age()
    return now


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class BudgetTimer(Timer):
    """``trainer.max_time`` over training only (Lightning's meaning) or the whole command (see the module).

    Args:
        duration: the budget, ``DD:HH:MM:SS`` (``trainer.max_time``).
        whole_command: False: Lightning's Timer (without its per-step broadcast). True: see the module.
        safety: the evaluation's predicted time is multiplied by this.
        fixed_s: seconds kept for the report, the checkpoints and the exit.
        test: whether a test follows training (``test`` of ``train.yaml``).
        started: ``time.monotonic()`` at the command's start (default: :func:`command_start`).
    """

    def __init__(
        self,
        duration: str | None,
        whole_command: bool = False,
        safety: float = 1.2,
        fixed_s: float = 10.0,
        test: bool = True,
        started: float | None = None,
    ) -> None:
        super().__init__(duration=duration, interval="step", verbose=True)
        self.whole_command, self.safety, self.fixed_s, self.test = whole_command, safety, fixed_s, test
        self.started = command_start() if started is None else started
        self.startup_s = 0.0  # from the command's start to the first training step
        self.eval_views_after = 0  # views the last validation and the test compute after the stop
        self._eval = [0.0, 0]  # (seconds, views) of the timed validation batches
        self._batch_start: float | None = None
        self._step = [0.0, 0]  # (seconds, steps) of the training steps timed
        self._step_start: float | None = None
        self._steps_seen = 0
        self.stopped_at: float | None = None  # training seconds when the budget stopped it
        self.validating_s = 0.0  # seconds of the validations during training (not the sanity check, not the last)
        self._val_start = 0.0

    @property
    def state_key(self) -> str:
        return "Timer"  # Lightning's Timer's key: checkpoints of either resume with the other

    # ------------------------------------------------------------ the budget
    def view_seconds(self) -> float | None:
        """Measured seconds per evaluation view (None until a validation batch after the first has run)."""
        seconds, views = self._eval
        return seconds / views if views else None

    def step_seconds(self) -> float:
        seconds, steps = self._step
        return seconds / steps if steps else 0.0

    def reserve(self) -> float:
        """Seconds kept after the stop: the evaluation still to run, one step, and :attr:`fixed_s`."""
        view_s = self.view_seconds()
        if view_s is None:  # no validation timed yet: a view costs at most half a training image
            batch = getattr(self, "_batch_size", 0)
            view_s = self.step_seconds() / batch / 2 if batch else 0.0
        return self.eval_views_after * view_s * self.safety + self.step_seconds() + self.fixed_s

    def training_budget(self) -> float:
        """Seconds of training (Timer's training stage, validations during it included) this run gets."""
        assert self._duration is not None
        if not self.whole_command:
            return self._duration
        return max(0.0, self._duration - self.startup_s - self.reserve())

    def time_remaining(self, stage: str = "train") -> float | None:
        if self._duration is None:
            return None
        return self.training_budget() - self.time_elapsed(stage)

    def explain(self) -> str:
        view_s = self.view_seconds()
        rate = f"{1 / view_s:,.0f} views/s measured" if view_s else "a rate estimated from the training steps"
        return (
            f"budget {_clock(self._duration)} for the whole command: start-up {self.startup_s:.0f} s, reserve "
            f"{self.reserve():.0f} s ({self.eval_views_after:,} views of the last validation and the test at {rate} "
            f"x {self.safety:g}, one training step {self.step_seconds():.1f} s, {self.fixed_s:g} s for the report and "
            f"files): training gets {_clock(self.training_budget())}"
        )

    # ------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self.whole_command:
            super().on_fit_start(trainer, *args, **kwargs)
        # whole command: checked after each step, so a run whose reserve exceeds its budget still trains a step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not self.whole_command or self._duration is None:
            return
        self.startup_s = time.monotonic() - self.started
        self._batch_size = int(getattr(trainer.datamodule, "hparams", {}).get("batch_size", 0) or 0)
        self.eval_views_after = self._views_after_training(trainer, pl_module)
        log.info("Time budget: %s", self.explain())
        if self.training_budget() <= 0:
            log.warning(
                "Time budget: the evaluation after training (%.0f s) does not fit in %s after the start-up: training "
                "one step, then the command ends ~%s after its start (raise trainer.max_time to train)",
                self.reserve(), _clock(self._duration), _clock(self.startup_s + self.reserve()),
            )  # fmt: skip

    def _views_after_training(self, trainer: pl.Trainer, module: Any) -> int:
        """Views this process evaluates after the stop: the last validation (with the TTA under
        ``module.tta_val`` true or last), a validation pass for the temperature when that one is plain, the test."""
        splits = getattr(trainer.datamodule, "splits", {})
        n_val, n_test = (len(splits[s]) if s in splits else 0 for s in ("val", "test"))
        tta = module.eval_views(True) if hasattr(module, "eval_views") else 1
        mode = module.hparams.get("tta_val", True)
        last_val = n_val * (tta if mode in (True, "last") else 1)
        if trainer.limit_val_batches == 0:
            last_val = 0
        refit = n_val * tta if mode is False and tta > 1 and self.test else 0
        test = n_test * tta if self.test else 0
        return -(-(last_val + refit + test) // max(1, trainer.world_size))

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        # the process's first step builds the kernels (and a compiled graph): not timed
        self._step_start = time.monotonic() if self._steps_seen else None
        self._steps_seen += 1

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._step_start is not None:
            self._step[0] += time.monotonic() - self._step_start
            self._step[1] += 1
        super().on_train_batch_end(trainer, *args, **kwargs)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._val_start = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.should_stop:
            self.validating_s += time.monotonic() - self._val_start  # the validations during training

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int, *a) -> None:
        self._batch_start = time.monotonic() if batch_idx >= 1 else None  # the first batch warms the kernels up

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs, batch, batch_idx: int, *a) -> None:
        if self._batch_start is None:
            return
        tta = getattr(pl_module, "_val_tta", True)
        views = len(batch[0]) * (pl_module.eval_views(tta) if hasattr(pl_module, "eval_views") else 1)
        self._eval[0] += time.monotonic() - self._batch_start
        self._eval[1] += views

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.whole_command and self._duration is not None:
            log.info(
                "Time budget: trained %s of %s (validations during it %.0f s, %.1f%% of the budget); %s",
                _clock(self.time_elapsed()), _clock(self.training_budget()), self.validating_s,
                100 * self.validating_s / self._duration, self.explain(),
            )  # fmt: skip

    def _check_time_remaining(self, trainer: pl.Trainer) -> None:
        """Lightning's check without its broadcast at every step: none for one process; under DDP rank 0's
        decision every :data:`CLOCK_EVERY` steps."""
        assert self._duration is not None
        should_stop = self.time_elapsed() >= self.training_budget()
        if trainer.world_size > 1:
            if trainer.global_step % CLOCK_EVERY:
                return
            should_stop = bool(trainer.strategy.broadcast(should_stop))
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop and self.stopped_at is None:
            self.stopped_at = self.time_elapsed()
        if should_stop and self._verbose:
            elapsed = timedelta(seconds=int(self.time_elapsed()))
            log.info("Time limit reached. Elapsed time is %s. Signaling Trainer to stop.", elapsed)
