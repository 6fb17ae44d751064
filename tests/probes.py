"""Test helpers loaded into runs as callbacks (``+callbacks.probe._target_=probes.RankDigest``).

- :class:`RankDigest`: each rank writes, at the end of every training epoch, a digest of its
  parameters, so a test can check that the ranks stayed identical (gradients synchronised).
- :class:`CrashAt`: raises a ``RuntimeError`` at a given training step (a job that crashes mid-run).
- :class:`HoldAt`: stops one job of a multirun at a given step until the test kills the sweep.
- :class:`LogScore`: logs a crafted metric per Optuna trial, so a test knows which trial lags.
- :class:`PrecisionProbe`: records the Trainer's precision plugin and the dtype a training step computed in.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig


class RankDigest(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.rows: list[dict] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        row = {"epoch": trainer.current_epoch}
        for part in ("backbone", "head"):
            params = [p.detach().double().flatten() for p in getattr(model, part).parameters()]
            row[part] = float(torch.cat(params).mul(torch.arange(1, sum(len(p) for p in params) + 1)).sum())
        self.rows.append(row)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


class CrashAt(pl.Callback):
    def __init__(self, step: int = 1) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash at step {trainer.global_step}")


class HoldAt(pl.Callback):
    """In multirun job ``job``, before training step ``step`` (``step`` steps done): write ``marker`` and
    sleep, so that a test can kill the sweep at a known point. Once: not when ``marker`` exists, so
    the same command run again goes through."""

    def __init__(self, job: int, step: int, marker: str) -> None:
        self.job, self.step, self.marker = job, step, Path(marker)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and HydraConfig.get().job.num == self.job and not self.marker.exists():
            self.marker.write_text(str(trainer.global_step))
            time.sleep(600)


class LogScore(pl.Callback):
    """At every validation, log ``probe/score`` = ``scores[trial]``: a crafted metric for a search's
    pruner (``trial``: the job's trial number, ``${hydra:sweeper.trial}``)."""

    def __init__(self, scores: list[float], trial: int) -> None:
        self.score = float(scores[trial])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("probe/score", self.score)


class PrecisionProbe(pl.Callback):
    """Writes ``out`` (JSON) at the end of training: the Trainer's precision plugin (class and precision) and
    the dtype of the head's output in the first training steps (bf16 under bf16 autocast, else fp32)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.record: dict = {}
        self.handle = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plugin = trainer.precision_plugin
        self.record = {"plugin": type(plugin).__name__, "precision": str(plugin.precision), "head_dtypes": []}

        def hook(module, inputs, output) -> None:
            if module.training and len(self.record["head_dtypes"]) < 3:
                self.record["head_dtypes"].append(str(output.dtype))

        self.handle = pl_module.model.head.register_forward_hook(hook)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.handle.remove()
        self.out.write_text(json.dumps(self.record))
