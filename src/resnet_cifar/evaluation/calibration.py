"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): probabilities that
mean what they say.

A network trained with label smoothing, an EMA of its weights or for a few epochs reports
confidences far from its accuracy (the ``cpu_30min`` model: right 95% of the time where it says
62%). One scalar ``T``, fitted after training on the **validation split** by minimising the NLL of
``softmax(logits / T)`` (LBFGS on the stored logits), fixes most of that without changing a single
prediction: dividing every logit of an image by the same ``T > 0`` keeps their order, so the top-1,
the top-5 and every accuracy stay as they were.

- :func:`fit_temperature`: ``T`` from logits and labels.
- :func:`scaled_softmax`: the one place a temperature divides logits; the module's
  ``probabilities`` (``predict.py``, the prediction grid, ``predict_step``) and the report use it.
- :class:`TemperatureScaling`: the callback that fits ``T`` at the start of the test after training
  (on the weights being tested) or applies the one a checkpoint stores (``eval.py``), and hands it to
  the module and the report. Under DDP every rank's share of the validation logits is gathered, and
  rank 0's ``T`` is broadcast, so every rank reports with the same one.

``train.py`` stores ``T`` in the tested (best) checkpoint under :data:`TEMPERATURE_KEY`; ``eval.py``,
``predict.py`` and ``export.py`` (``export.json``, the safetensors metadata) read it from there.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import Metric

log = logging.getLogger(__name__)

# The checkpoint entry holding the fitted temperature (absent: the probabilities are not calibrated).
TEMPERATURE_KEY = "resnet_cifar_temperature"
# Where the fit may land: beyond these a validation split is degenerate (every image right with huge
# margins drives T to 0); the value is clamped and the log says so.
BOUNDS = (0.05, 20.0)


def scaled_softmax(logits: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """``softmax(logits / T)`` in fp32; ``T`` None (not calibrated) is 1."""
    logits = logits.float()
    return (logits if temperature is None else logits / temperature).softmax(-1)


def nll(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``target`` under ``softmax(logits / temperature)``."""
    return float(F.cross_entropy(logits.double() / temperature, target.long()))


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, max_iter: int = 100) -> float:
    """The ``T`` that minimises the NLL of ``softmax(logits / T)`` on ``(logits, target)``.

    LBFGS (strong Wolfe line search) over ``log T``, which keeps ``T > 0``; in float64, on the CPU, with
    gradients on even inside a test loop (whose inference mode would refuse them). Clamped to
    :data:`BOUNDS` (with a warning).
    """
    with torch.inference_mode(False), torch.enable_grad():
        # copies: the test loop's tensors are inference tensors, which autograd may not save
        logits = logits.detach().to("cpu", torch.float64, copy=True)
        target = target.detach().to("cpu", torch.long, copy=True)
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), target)
            loss.backward()
            return loss

        optimizer.step(closure)
        fitted = float(log_t.detach().exp())
    low, high = BOUNDS
    if not math.isfinite(fitted) or not low <= fitted <= high:
        clamped = min(max(fitted, low), high) if math.isfinite(fitted) else 1.0
        log.warning("temperature scaling: the fit gave T=%s, outside %s; using %s", fitted, BOUNDS, clamped)
        fitted = clamped
    return fitted


class Logits(Metric):
    """The logits and labels of one pass, gathered from every process (``cat`` states).

    Each batch's logits are copied: under CUDA graphs (``module.compile_mode=reduce-overhead``) an fp32
    output is the graph's buffer, which the next replay overwrites.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("logits", [], dist_reduce_fx="cat")
        self.add_state("target", [], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.logits.append(logits.detach().to(torch.float32, copy=True))
        self.target.append(target.detach().to(torch.long, copy=True))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        def cat(x: Any) -> torch.Tensor:
            return torch.cat(x) if isinstance(x, list) else x

        return cat(self.logits), cat(self.target)


def apply_temperature(module: Any, temperature: float | None, note: dict[str, Any]) -> None:
    """Hand ``temperature`` to the module (its ``probabilities``) and to the report it accumulates."""
    module.temperature = temperature
    report = getattr(module, "report_metrics", None)
    if report is not None:
        report.temperature = temperature
        report.calibration = note


class TemperatureScaling(pl.Callback):
    """At the start of the test: fit the temperature on the validation split, or apply a stored one.

    Args:
        stored: a temperature read from the checkpoint (``eval.py``): applied as it is, so that the
            evaluation repeats the training run's numbers. None: fit one on the weights being tested.

    After the test, :attr:`temperature` is the value used (None: skipped, :attr:`note` says why).
    """

    def __init__(self, stored: float | None = None) -> None:
        self.stored = stored
        self.temperature: float | None = None
        self.note: dict[str, Any] = {}
        self.computed: tuple[torch.Tensor, torch.Tensor] | None = None

    def reuse(self, logits_and_target: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Fit on these validation ``(logits, labels)`` of the weights about to be tested (the fit's last
        validation: :meth:`~resnet_cifar.training.module.ImageClassifier.validation_logits_of`) instead of a
        pass over the validation split at the test's start. None: that pass."""
        self.computed = logits_and_target

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stored is not None:
            self.temperature = float(self.stored)
            self.note = {"temperature": self.temperature, "source": "stored in the checkpoint"}
            apply_temperature(pl_module, self.temperature, self.note)
            return
        dm = trainer.datamodule
        val = getattr(dm, "splits", {}).get("val") if dm is not None else None
        reason = None
        if val is None or len(val) == 0:
            reason = "no validation split to fit the temperature on (data.val_size=0)"
        elif trainer.limit_val_batches == 0:
            reason = "validation is off (trainer.limit_val_batches=0)"
        if reason:
            log.warning("temperature scaling skipped: %s; the probabilities are not calibrated", reason)
            self.temperature, self.note = None, {"skipped": reason}
            apply_temperature(pl_module, None, self.note)
            return
        reused = self.computed is not None
        logits, target = self.computed if reused else self._validation_logits(trainer, pl_module)
        self.computed = None  # one test
        fitted = fit_temperature(logits, target) if trainer.is_global_zero else 1.0
        self.temperature = float(trainer.strategy.broadcast(fitted))  # rank 0's, on every rank
        before, after = nll(logits, target), nll(logits, target, self.temperature)
        self.note = {
            "temperature": self.temperature,
            "source": f"fitted on the validation split ({len(target)} images)",
            "val_nll": before,
            "val_nll_calibrated": after,
            "logits": "the fit's last validation" if reused else "a validation pass at the test's start",
        }
        log.info(
            "temperature scaling: T=%.4f fitted on %d validation images (validation NLL %.4f -> %.4f; logits of %s)",
            self.temperature, len(target), before, after, self.note["logits"],
        )  # fmt: skip
        apply_temperature(pl_module, self.temperature, self.note)

    @torch.no_grad()
    def _validation_logits(self, trainer: pl.Trainer, module: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits the model predicts with (``predict_logits``: flip TTA included) on this process's share
        of the validation split (as many batches as the run validates: ``trainer.limit_val_batches``), batched
        and transformed as the test loop's batches, gathered from all."""
        store = Logits().to(module.device)
        loader = trainer.datamodule.val_dataloader()  # un-padded shards under DDP (data/sharding.py)
        limit = trainer.limit_val_batches
        n = min(len(loader), limit) if isinstance(limit, int) else max(1, int(len(loader) * limit))
        for _, batch in zip(range(n), loader):
            x, y, _ = trainer.strategy.batch_to_device(batch)  # the DataModule's transfer hooks: normalised
            with trainer.precision_plugin.test_step_context():  # the precision the test runs in
                store.update(module.predict_logits(x).float(), y)
        return store.compute()
