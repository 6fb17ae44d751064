"""The ``LightningModule``: a ResNet classifier, its freeze schedule, metrics and optimizer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from resnet_cifar.errors import ConfigError, WeightsError
from resnet_cifar.evaluation.calibration import TEMPERATURE_KEY, Logits, scaled_softmax
from resnet_cifar.evaluation.metrics import ReportMetrics
from resnet_cifar.models.factory import build_model
from resnet_cifar.models.weights import safe_load
from resnet_cifar.stages import FreezeSchedule
from resnet_cifar.training import metric_state
from resnet_cifar.training.optim import (
    budget_progress,
    build_optimizer,
    build_scheduler,
    steps_per_epoch,
    with_backbone_warmup,
)

# The checkpoint entry that records the precision the run trained and tested with.
PRECISION_KEY = "resnet_cifar_precision"
# Training images whose 2x2 patches fit a whitening stem (airbench94's 5,000: ~5M patches for 12 x 12 values).
WHITENING_IMAGES = 5000

log = logging.getLogger(__name__)


class ImageClassifier(pl.LightningModule):
    """Train, validate and test a :class:`~resnet_cifar.models.factory.Classifier`.

    Args:
        model: keyword arguments of :func:`~resnet_cifar.models.factory.build_model`.
        optimizer: ``name``, ``lr`` (the head's; the backbone gets ``lr * backbone_lr_ratio``),
            ``weight_decay``, ``no_decay_bn_bias`` and the optimizer's own options.
        scheduler: ``name`` and options of :func:`~resnet_cifar.training.optim.build_scheduler`.
        stage: fields of :class:`~resnet_cifar.stages.FreezeSchedule`.
        num_classes: outputs of the head.
        label_smoothing: label smoothing of the training loss.
        class_names: kept with the checkpoint for reports and inference.
        channels_last: run convolutions in channels-last memory format.
        tta_flip: average the logits of each image and its mirror image at val/test time.
        tta_translate: also average over the image shifted by this many pixels up-left and down-right
            (reflection padding; with ``tta_flip`` each shift and its mirror image), airbench94's
            "TTA level 2": weight 1/2 on the unshifted view(s), 1/4 on each shift. 0: off.
        tta_val: apply that TTA at the validations during fitting too. False: they see the plain images
            (one view instead of up to six: airbench94 evaluates so per epoch), so ``val/acc`` and the best
            checkpoint's choice are without TTA; the test, the report and the temperature's fit keep it.
            ``"last"``: plain images, except the validation that ends the fit (the time budget spent, the
            last epoch) which has the TTA: its logits are those the temperature is fitted on, so the test
            does not compute them again (the budget presets: cheap validations, no pass done twice).
        eval_chunk: images per forward pass at evaluation on a CPU (the TTA's views of a batch are one
            concatenation): a few hundred keep the activations in cache where one call of 6,000 images
            (1,000 x 6 views) spills them (``bench/eval_speed.py``). 0: one call. CUDA always makes one
            call: its kernels fill the device better, and under CUDA graphs one output per step.
        compile: run the model through ``torch.compile`` (the compiled wrapper is not a submodule,
            so checkpoints keep the plain ``model.*`` keys).
        compile_mode: ``torch.compile``'s ``mode`` (``default``, ``reduce-overhead``: CUDA graphs, ...).
        compile_dynamic: ``torch.compile``'s ``dynamic``; False (static shapes): the training batch keeps
            its own graph, each evaluation batch size gets one more, none is traced with symbolic sizes.
        lr_scaling: ``none`` | ``linear`` | ``sqrt``: how the learning rates grow with the number
            of processes (see :data:`~resnet_cifar.training.optim.LR_SCALING`).
    """

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        stage: dict[str, Any] | None = None,
        num_classes: int = 10,
        label_smoothing: float = 0.0,
        class_names: list[str] | None = None,
        channels_last: bool = False,
        tta_flip: bool = False,
        tta_translate: int = 0,
        tta_val: bool | str = True,
        eval_chunk: int = 0,
        compile: bool = False,
        compile_mode: str = "default",
        compile_dynamic: bool | None = False,
        lr_scaling: str = "none",
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        # Logged once, with the whole run config, by the training entry (not by Lightning).
        self.save_hyperparameters(logger=False, ignore=["load_weights"])
        self.schedule = FreezeSchedule(**(stage or {}))
        model_kwargs = dict(model)
        if not load_weights:  # weights come from a checkpoint: build the bare architecture
            model_kwargs.update(pretrained=False, weights_path=None)
        self.model = build_model(num_classes=num_classes, **model_kwargs)
        if not self.schedule.backbone_in_optimizer:
            self.model.backbone.requires_grad_(False)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        # Kept out of nn.Module's registry: same parameters, no extra state_dict keys.
        run = torch.compile(self.model, mode=compile_mode, dynamic=compile_dynamic) if compile else self.model
        object.__setattr__(self, "_run_model", run)
        # validate_args=False: the checks run torch.unique on the targets, a host sync at every step on a GPU
        # (our labels are in range by construction: data/cifar10.py validates them once).
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes, average="micro", validate_args=False) for _ in range(3)
        )
        # Fed per-image losses: nan_strategy="disable" skips a NaN check that syncs per batch (and, in
        # torchmetrics 1.9, drops any weight passed, so none is).
        self.val_loss, self.test_loss = MeanMetric(nan_strategy="disable"), MeanMetric(nan_strategy="disable")
        self.val_acc_best = MaxMetric()
        # The logits of a validation that saw the test's views (predict_logits), kept for the temperature's fit
        # (validation_logits_of); None: the last validation did not (plain views, or the sanity check).
        self.val_logits = Logits()
        self._val_logits_step: int | None = None
        self._val_tta = tta_val is True  # set per validation by on_validation_epoch_start
        self._resumed_metric_states: dict | None = None
        # The evaluation report's metrics, updated in the test loop once enable_report() was called.
        self.report_metrics: ReportMetrics | None = None
        self.test_report: dict[str, Any] | None = None
        self.trained_precision: str | None = None  # set by load_trained from the checkpoint
        # Temperature scaling of the probabilities (evaluation/calibration.py): fitted after training, stored in
        # the tested checkpoint and read back by load_trained; None: not calibrated.
        self.temperature: float | None = None

    # ----------------------------------------------------------- forward
    def backbone_trainable(self) -> bool:
        return self.schedule.backbone_trainable(self.current_epoch)

    def frozen_parameter_names(self) -> set[str]:
        """Parameters that require grad but get none this epoch (DDP leaves them out of gradient sync)."""
        if self.backbone_trainable():
            return set()
        return {f"model.backbone.{n}" for n, p in self.model.backbone.named_parameters() if p.requires_grad}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.training:
            trainable = self.backbone_trainable()
            # Frozen phase: batch-norm statistics stay (eval mode). Once unfrozen, back to train
            # mode: Lightning restores each submodule's mode after validation, so the eval mode
            # of the frozen epochs would otherwise persist.
            if self.model.backbone.training != trainable:
                self.model.backbone.train(trainable)
            if not trainable:  # no graph through the frozen backbone
                with torch.no_grad():
                    features = self.model.backbone(x)
                return self.model.head(features)
        return self._run_model(x)

    def tta_logits(self, x: torch.Tensor, with_flip: bool = False) -> tuple[torch.Tensor, ...]:
        """fp32 ``(headline, plain, flip)``: the logits the model predicts with, of the images as they are,
        and of their mirror images (None unless ``tta_flip`` or ``with_flip``).

        Every view (image, mirror image, shifts) goes through the model in ONE call on their
        concatenation: one pass of large matmuls, and no output of a first call overwritten by a
        second under CUDA graphs (``module.compile_mode=reduce-overhead``). Cast to fp32 once, so that
        every number computed from them is the same under every precision.
        """
        flip, shift = self.hparams.tta_flip, self.hparams.get("tta_translate", 0)
        views = [x, x.flip(-1)] if flip or with_flip else [x]
        if shift:
            padded = F.pad(x, (shift,) * 4, mode="reflect")
            h, w = x.shape[-2:]
            shifted = [padded[..., :h, :w], padded[..., 2 * shift :, 2 * shift :]]
            views += shifted + ([v.flip(-1) for v in shifted] if flip else [])
        out = self.eval_forward(torch.cat(views) if len(views) > 1 else x).chunk(len(views))
        plain, mirrored = out[0], (out[1] if flip or with_flip else None)
        headline = (plain + mirrored) / 2 if flip else plain
        if shift:
            first_shift = 2 if flip or with_flip else 1
            headline = (headline + torch.stack(out[first_shift:]).mean(0)) / 2
        return headline, plain, mirrored

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of ``x`` in eval mode: in calls of ``eval_chunk`` images on a CPU, one call elsewhere.

        Each image's logits do not depend on the others in the call (batch norm in eval mode), so the
        chunks give the one call's numbers (tests/training/test_tta.py checks the bits).
        """
        chunk = self.hparams.get("eval_chunk", 0)
        if chunk and x.device.type == "cpu" and len(x) > chunk:
            return torch.cat([self(part).float() for part in x.split(chunk)])
        return self(x).float()

    def eval_views(self, tta: bool = True) -> int:
        """Forward passes per image of an evaluation: 1 plain, 2 with flip, 3 or 6 with translate."""
        if not tta:
            return 1
        flip, shift = bool(self.hparams.tta_flip), bool(self.hparams.get("tta_translate", 0))
        return (2 if flip else 1) * (3 if shift else 1)

    def has_tta(self) -> bool:
        return self.eval_views() > 1

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-time fp32 logits with the model's TTA (``tta_flip``, ``tta_translate``), as :meth:`_eval_step`."""
        return self.tta_logits(x)[0]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities of :meth:`predict_logits`' logits: the softmax after the fitted temperature (if any).

        Where probabilities leave the project (predict.py, ``predict_step``, the prediction grid).
        """
        return scaled_softmax(logits, self.temperature)

    # -------------------------------------------------------------- steps
    def setup(self, stage: str) -> None:
        """Before fitting: the data-dependent initialisation of a patch-whitening stem (``model.stem=whiten``).

        Skipped when the filters came with the weights (``model.weights_path``); a resumed run's
        checkpoint is restored after this hook, so it keeps its own filters.
        """
        whitening = getattr(self.model.backbone, "whitening", None)
        if stage == "fit" and whitening is not None and not whitening.fitted:
            images = self.trainer.datamodule.train_images(WHITENING_IMAGES)
            whitening.fit(images.to(whitening.weight.device))
            log.info("Patch whitening fitted on %d training images", len(images))

    def on_train_start(self) -> None:
        self.val_acc_best.reset()  # forget the sanity-check validation
        metric_state.restore(self, self._resumed_metric_states)  # a resumed run: where it stopped
        self._resumed_metric_states = None
        self._check_resumed_schedule()

    def _check_resumed_schedule(self) -> None:
        """A resumed OneCycle keeps the checkpoint's length (torch's ``OneCycleLR`` stores ``total_steps``): a
        run resumed with another ``trainer.max_epochs`` would fail mid-run past it (``Tried to step N times``)
        or stop before its LR came down. Refused at the start instead, with what to do."""
        planned = getattr(self, "_onecycle_steps", None)
        restored = [_onecycle_steps(c.scheduler) for c in self.trainer.lr_scheduler_configs]
        restored = next((n for n in restored if n is not None), None)
        if planned is not None and restored is not None and restored != planned:
            raise ConfigError(
                f"ckpt_path: the checkpoint's OneCycle schedule is {restored} steps long, this run's {planned} "
                "(another trainer.max_epochs or data size): resume with the checkpoint's settings, or train on "
                "from its weights in a new run (model.weights_path=<ckpt>)"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # train/acc accumulates within an epoch: only a mid-epoch checkpoint carries it on (a save
        # after an epoch's last batch would add that epoch's counts to the next one's).
        at_epoch_end = self._trainer is not None and self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        names = ("val_acc_best",) if at_epoch_end else ("train_acc", "val_acc_best")
        checkpoint[metric_state.KEY] = metric_state.collect(self, names)
        if self._trainer is not None:  # eval.py tests in the same precision by default (load_trained)
            checkpoint[PRECISION_KEY] = str(self.trainer.precision)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_metric_states = checkpoint.get(metric_state.KEY)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        logits = self(x)
        # y: class indices, or soft targets (B, C) under data.mixup/cutmix: cross-entropy with probabilities,
        # label smoothing applied to them as to one-hot targets (y * (1 - s) + s / C)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        # update(), not forward(): forward would also compute the batch's own accuracy, which nothing reads.
        # Soft targets: accuracy against their argmax, the class with the larger share of the mixed image.
        self.train_acc.update(logits.detach(), y.argmax(-1) if y.ndim == 2 else y)
        # Not on the progress bar: Lightning turns a per-step progress-bar tensor into a number at every
        # step (a host sync on a GPU); the bar reads the loss at its refreshes (training/progress_bar.py),
        # the loggers every trainer.log_every_n_steps.
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(
        self, batch, acc: MulticlassAccuracy, mean_loss: MeanMetric, report: bool = False, tta: bool = True
    ) -> torch.Tensor:
        x, y, index = batch
        # test/acc, the loss and every number of the report come from these same fp32 logits, so the
        # report's top-1 is test/acc exactly.
        if tta:
            headline, logits, flip = self.tta_logits(x, with_flip=report and self.report_metrics.tta)
        else:
            headline, logits, flip = self.eval_forward(x), None, None
        acc.update(headline, y)
        mean_loss.update(F.cross_entropy(headline, y, reduction="none"))
        if report:
            self.report_metrics.update(headline, y, index, logits, flip)
        return headline

    def on_validation_epoch_start(self) -> None:
        mode = self.hparams.get("tta_val", True)
        self._val_tta = mode is True or (mode == "last" and self._validation_ends_fit())
        self.val_logits.reset()
        self._val_logits_step = None

    def _validation_ends_fit(self) -> bool:
        """Whether this validation is the fit's last: the budget is spent (the Timer stopped training), or the
        last epoch (or step) is done. ``trainer.validate`` is an evaluation: True."""
        trainer = self.trainer
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != "fit" or trainer.should_stop:
            return True
        if 0 <= trainer.max_steps <= trainer.global_step:
            return True
        last_epoch = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1
        return last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch

    def validation_step(self, batch, batch_idx: int) -> None:
        headline = self._eval_step(batch, self.val_acc, self.val_loss, tta=self._val_tta)
        if self._val_tta or not self.has_tta():  # the logits predict_logits gives: the temperature's input
            self.val_logits.update(headline, batch[1])

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking and (self._val_tta or not self.has_tta()):
            self._val_logits_step = self.global_step
        acc = self.val_acc.compute()
        self.val_acc_best(acc)
        self.log("val/acc", self.val_acc, prog_bar=True)
        self.log("val/loss", self.val_loss)
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)  # equal on all ranks already

    def validation_logits_of(self, ckpt_path: str | Path) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(logits, labels)`` of the fit's last validation when they are what :meth:`predict_logits` gives
        for the weights in ``ckpt_path`` (saved at that validation's step, as the best checkpoint of a run
        whose last validation chose it), gathered from every process; else None. Under DDP every rank calls
        it (the gather is a collective)."""
        if self._val_logits_step is None:
            return None
        saved_at = safe_load(ckpt_path, "ckpt_path").get("global_step")
        if saved_at != self._val_logits_step:
            return None
        return self.val_logits.compute()

    def enable_report(self, options: dict[str, Any]) -> None:
        """Accumulate the evaluation report in the next test loop (see :class:`ReportMetrics`)."""
        self.report_metrics = ReportMetrics(
            [str(c) for c in (self.hparams.class_names or range(self.hparams.num_classes))],
            n_bins=options["n_bins"],
            max_misclassified=options["max_misclassified"],
            tta=options["tta"],
        ).to(self.device)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc, self.test_loss, report=self.report_metrics is not None)

    def on_test_epoch_end(self) -> None:
        self.log("test/acc", self.test_acc)
        self.log("test/loss", self.test_loss)
        if self.report_metrics is not None:  # every rank: compute() gathers the states of all processes
            self.test_report = self.report_metrics.compute()
            self.report_metrics.reset()

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self.probabilities(self.predict_logits(batch[0]))

    # ------------------------------------------------------- optimisation
    def training_progress(self, step: int) -> float:
        """Fraction of training done at optimizer step ``step``, as the LR schedule counts it: of the wall-clock
        budget under ``scheduler.progress=time``, else of the run's steps (for callbacks that ramp with it)."""
        if getattr(self, "_time_progress", None) is not None:
            return self._time_progress(step)
        return min(1.0, step / max(1.0, float(self.trainer.estimated_stepping_batches)))

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(
            dict(self.hparams.optimizer),
            self.model,
            backbone_lr_ratio=self.schedule.backbone_lr_ratio,
            include_backbone=self.schedule.backbone_in_optimizer,
            world_size=self.trainer.world_size,
            lr_scaling=self.hparams.get("lr_scaling", "none"),
            clipping=(self.trainer.gradient_clip_val or 0) > 0,
        )
        sched_cfg = dict(self.hparams.scheduler)
        by_time = sched_cfg.get("progress", "steps") == "time"
        self._time_progress = budget_progress(self.trainer) if by_time else None
        scheduler = build_scheduler(
            sched_cfg,
            optimizer,
            total_steps=1 if by_time else self.trainer.estimated_stepping_batches,
            max_epochs=self.trainer.max_epochs,
            time_progress=self._time_progress,
        )
        self._onecycle_steps = _onecycle_steps(scheduler)  # before a resume restores the checkpoint's
        warmup = self.schedule.backbone_warmup_epochs
        if warmup and self.schedule.backbone_in_optimizer:
            self.trainer.estimated_stepping_batches  # noqa: B018 (sets up the train loader: its length)
            per_epoch = steps_per_epoch(self.trainer)
            start = self.schedule.unfreeze_at_epoch * per_epoch
            scheduler = with_backbone_warmup(scheduler, optimizer, start, max(1, round(warmup * per_epoch)))
        if scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------ loading
    @classmethod
    def load_trained(
        cls, path: str | Path, map_location: str | torch.device = "cpu", **overrides
    ) -> tuple[ImageClassifier, dict[str, Any]]:
        """The one loader of our training checkpoints, for eval, predict and export.

        Reads the file once, safely (``weights_only``), without re-fetching pretrained weights;
        returns the module in eval mode and the data settings it was trained with.
        """
        ckpt = safe_load(path, "ckpt_path")
        data_hp = ckpt.get("datamodule_hyper_parameters")
        if "state_dict" not in ckpt or "hyper_parameters" not in ckpt or not isinstance(data_hp, dict):
            raise WeightsError(
                f"ckpt_path {path} is not a resnet-cifar training checkpoint (no state_dict, hyper_parameters "
                "or data settings)"
            )
        # compile=False: evaluation and prediction would compile (tens of seconds) for a single pass
        module = cls(**{**ckpt["hyper_parameters"], "compile": False, **overrides}, load_weights=False)
        module.load_state_dict(ckpt["state_dict"])
        module.trained_precision = ckpt.get(PRECISION_KEY)
        module.temperature = ckpt.get(TEMPERATURE_KEY)
        return module.to(map_location).eval(), dict(data_hp)


def _onecycle_steps(scheduler: Any) -> int | None:
    """``total_steps`` of a torch ``OneCycleLR`` (also inside a ``ChainedScheduler``), else None."""
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
        return scheduler.total_steps
    for inner in getattr(scheduler, "_schedulers", ()):
        if isinstance(inner, torch.optim.lr_scheduler.OneCycleLR):
            return inner.total_steps
    return None
