"""Learning rates, all of them: parameter groups, their LRs, DDP scaling, optimizers and schedules.

The LR of each parameter group is assembled here and nowhere else: the head's is
``optimizer.lr * lr_scale(module.lr_scaling, world_size)``, the backbone's that times
``stage.backbone_lr_ratio``; schedules multiply the groups' LRs per step, and
``stage.backbone_warmup_epochs`` multiplies the backbone's once more (:class:`BackboneWarmup`).
Values arrive checked by the config schema (:mod:`resnet_cifar.schema`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from resnet_cifar.errors import ConfigError
from resnet_cifar.training.muon import MuonSGD

OPTIMIZERS = ("sgd", "adamw", "muon")
SCHEDULERS = ("cosine", "onecycle", "linear", "multistep", "none")
# How optimizer.lr grows with the number of processes, each training on data.batch_size images:
# none: as given; linear: x world_size (the global batch grows by that factor; Goyal et al. 2017,
# with warm-up); sqrt: x sqrt(world_size).
LR_SCALING: dict[str, Callable[[int], float]] = {"none": lambda n: 1.0, "linear": float, "sqrt": math.sqrt}


def lr_scale(rule: str, world_size: int) -> float:
    """Factor applied to ``optimizer.lr`` under ``world_size`` processes (see :data:`LR_SCALING`)."""
    return float(LR_SCALING[rule](world_size))


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_ratio: float = 1.0,
    include_backbone: bool = True,
    no_decay_bn_bias: bool = True,
    bn_lr_ratio: float = 1.0,
    muon: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Groups ``head``, ``head_no_decay``, ``backbone``, ``backbone_no_decay`` (empty ones dropped).

    Batch-norm parameters and biases (all 1-d tensors) get no weight decay when
    ``no_decay_bn_bias``. The group names appear in the LR monitor's curves.

    With ``bn_lr_ratio`` != 1 the batch-norm parameters that train (with frozen BN scales: the
    biases) and the patch-whitening layer's bias form groups of their own, ``head_bn``/``backbone_bn``,
    at ``bn_lr_ratio`` times their part's LR and ``weight_decay / bn_lr_ratio`` (0 with
    ``no_decay_bn_bias``), so that the decay per step, LR x weight decay, stays as it was:
    cifar10-fast and airbench train them at 64x.

    With ``muon`` (``lr``, ``weight_decay``) the conv filters (4-d) form ``*_muon`` groups
    (``"muon": True``) at ``muon["lr"]`` times the part's ``backbone_lr_ratio``: see
    :class:`~resnet_cifar.training.muon.MuonSGD`.
    """
    from resnet_cifar.models.resnet9 import PatchWhitening

    bn = set()
    if bn_lr_ratio != 1.0:
        bn = {id(p) for m in model.modules() if isinstance(m, BATCH_NORMS) for p in m.parameters(recurse=False)}
        bn |= {id(m.bias) for m in model.modules() if isinstance(m, PatchWhitening)}
    bn_decay = 0.0 if no_decay_bn_bias else weight_decay / bn_lr_ratio
    parts = [("head", 1.0)] + ([("backbone", backbone_lr_ratio)] if include_backbone else [])
    groups = []
    for part, ratio in parts:
        decay, no_decay, bn_params, filters = [], [], [], []
        for p in getattr(model, part).parameters():
            if p.requires_grad:
                if id(p) in bn:
                    bn_params.append(p)
                elif muon is not None and p.ndim == 4:
                    filters.append(p)
                else:
                    (no_decay if no_decay_bn_bias and p.ndim <= 1 else decay).append(p)
        for suffix, params, wd, r in (
            ("", decay, weight_decay, 1.0),
            ("_no_decay", no_decay, 0.0, 1.0),
            ("_bn", bn_params, bn_decay, bn_lr_ratio),
        ):
            if params:
                groups.append({"name": part + suffix, "params": params, "lr": lr * ratio * r, "weight_decay": wd})
        if filters:
            group = {"params": filters, "lr": muon["lr"] * ratio, "weight_decay": muon["weight_decay"]}
            groups.append({"name": part + "_muon", **group, "muon": True})
    return groups


def fused_kwargs(params: Sequence[torch.Tensor], clipping: bool) -> dict[str, bool]:
    """``fused`` or ``foreach`` for torch's SGD and AdamW over ``params``.

    On CUDA, fused kernels: one launch for all parameters, and under 16-mixed GradScaler hands them
    its inf check instead of calling ``found_inf.item()`` (a host sync) at every step. But a fused
    optimizer unscales its gradients inside ``step()``, so they would still be scaled when clipped,
    and Lightning's mixed-precision plugin (``MixedPrecision.clip_gradients``, under bf16-mixed too)
    raises at the first step for any such optimizer when ``trainer.gradient_clip_val > 0``. So with
    clipping, ``foreach`` (GradScaler unscales before the clip; under 16-mixed one ``found_inf`` sync
    per step). Elsewhere torch's default.
    """
    if not params or not all(p.is_cuda for p in params):
        return {}
    return {"foreach": True} if clipping else {"fused": True}


def build_optimizer(
    cfg: dict[str, Any],
    model: nn.Module,
    backbone_lr_ratio: float = 1.0,
    include_backbone: bool = True,
    world_size: int = 1,
    lr_scaling: str = "none",
    clipping: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer over :func:`param_groups` of ``model``, with the LRs assembled as the module docstring says.

    ``clipping``: the Trainer clips gradients (``trainer.gradient_clip_val > 0``): see :func:`fused_kwargs`.
    """
    lr = cfg["lr"] * lr_scale(lr_scaling, world_size)
    muon = cfg["name"] == "muon"
    groups = param_groups(
        model,
        lr=lr,
        weight_decay=cfg.get("weight_decay", 0.0),
        backbone_lr_ratio=backbone_lr_ratio,
        include_backbone=include_backbone,
        no_decay_bn_bias=cfg.get("no_decay_bn_bias", True),
        bn_lr_ratio=cfg.get("bn_lr_ratio", 1.0),
        # Muon's LR is not scaled with the number of processes: its update has a fixed size per step
        muon={"lr": cfg["muon_lr"], "weight_decay": cfg["muon_weight_decay"]} if muon else None,
    )
    if muon:  # never fused: its SGD part steps through torch's functional SGD, on any device
        return MuonSGD(
            groups,
            lr=lr,
            momentum=cfg.get("momentum", 0.9),
            nesterov=cfg.get("nesterov", True),
            muon_momentum=cfg["muon_momentum"],
            muon_nesterov=cfg["muon_nesterov"],
            ns_steps=cfg["muon_ns_steps"],
            normalize=cfg["muon_normalize"],
        )
    fused = fused_kwargs([p for g in groups for p in g["params"]], clipping)
    if cfg["name"] == "sgd":
        momentum, nesterov = cfg.get("momentum", 0.9), cfg.get("nesterov", False)
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **fused)
    return torch.optim.AdamW(
        groups, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))), eps=cfg.get("eps", 1e-8), **fused
    )


class WarmupDecay:
    """LR multiplier per step: linear warm-up from ``warmup_start``, then cosine, linear, step or constant.

    A callable object (not a closure) so that ``LambdaLR`` saves and restores it with
    the checkpoint.
    """

    def __init__(
        self,
        total_steps: int,
        warmup_steps: int = 0,
        kind: str = "cosine",
        milestones: Sequence[float] = (),
        gamma: float = 0.1,
        min_lr_ratio: float = 0.0,
        warmup_start: float = 0.0,
    ) -> None:
        self.total_steps, self.warmup_steps, self.kind = total_steps, warmup_steps, kind
        self.milestones = [int(m * total_steps) for m in milestones]
        self.gamma, self.min_lr_ratio, self.warmup_start = gamma, min_lr_ratio, warmup_start

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start + (1 - self.warmup_start) * (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            t = min(1.0, (step - self.warmup_steps) / span)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if self.kind == "linear":
            span = max(1, self.total_steps - 1 - self.warmup_steps)
            t = min(1.0, (step - self.warmup_steps) / span)
            return 1 - (1 - self.min_lr_ratio) * t
        if self.kind == "multistep":
            return self.gamma ** sum(step >= m for m in self.milestones)
        return 1.0


# Resolution of a schedule over a wall-clock budget: progress is rounded to 1/TIME_STEPS.
TIME_STEPS = 10_000
NEEDS_MAX_TIME = "scheduler.progress=time needs a wall-clock budget: set trainer.max_time=DD:HH:MM:SS"


# Under DDP the ranks share rank 0's clock through a broadcast (a collective and a host sync): once in this
# many steps; in between, progress is extrapolated from the step count, identically on every rank.
CLOCK_EVERY = 16


def budget_progress(trainer: Any) -> Callable[[int], float]:
    """Fraction of ``trainer.max_time`` spent training at optimizer step ``step``, from Lightning's ``Timer``.

    The Timer keeps its elapsed time in checkpoints, so a resumed run continues the schedule
    where it stopped. Under DDP every rank must use the same LR: see :class:`SharedProgress`.
    """
    from pytorch_lightning.callbacks import Timer

    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    remaining = timer.time_remaining() if timer is not None else None
    if remaining is None:
        raise ConfigError(NEEDS_MAX_TIME)
    fixed = remaining + timer.time_elapsed()
    # a BudgetTimer's training time moves with the reserve it measures (training/budget.py): read at each step
    duration = getattr(timer, "training_budget", lambda: fixed)

    def local(step: int = 0) -> float:
        return min(1.0, timer.time_elapsed() / max(duration(), 1e-9))

    if getattr(trainer, "world_size", 1) == 1:
        return local
    return SharedProgress(local, trainer.strategy.broadcast)


class SharedProgress:
    """Rank 0's progress, broadcast every :data:`CLOCK_EVERY` steps and extrapolated linearly in between.

    Every rank computes the same value from the broadcast values and the step count, so their
    learning rates agree without a collective at every step.
    """

    def __init__(self, local: Callable[[int], float], broadcast: Callable[[Any], Any]) -> None:
        self.local, self.broadcast = local, broadcast
        self.anchor: tuple[int, float] | None = None  # (step, progress) of the last broadcast
        self.rate = 0.0  # progress per step between the last two broadcasts

    def __call__(self, step: int) -> float:
        if self.anchor is None or step - self.anchor[0] >= CLOCK_EVERY or step < self.anchor[0]:
            value = float(self.broadcast(self.local(step)))
            if self.anchor is not None and step > self.anchor[0]:
                self.rate = max(0.0, (value - self.anchor[1]) / (step - self.anchor[0]))
            self.anchor = (step, value)
        return min(1.0, self.anchor[1] + self.rate * (step - self.anchor[0]))


def build_scheduler(
    cfg: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    max_epochs: int | None,
    time_progress: Callable[[int], float] | None = None,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-step scheduler sized from ``trainer.estimated_stepping_batches``.

    With ``progress: time`` the same shapes run over a wall-clock budget instead of a step
    count: ``time_progress(step)`` (see :func:`budget_progress`) gives the fraction spent, so a
    budget preset ends its schedule in time on a fast or a slow machine.
    """
    name = cfg["name"]
    if cfg.get("progress", "steps") == "time":
        if time_progress is None:
            raise ConfigError(NEEDS_MAX_TIME)
        fn = _time_shape(cfg)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: fn(min(TIME_STEPS - 1, int(time_progress(step) * TIME_STEPS)))
        )
    if name == "none" and not cfg.get("warmup_epochs", 0):
        return None
    if not math.isfinite(total_steps):
        raise ConfigError(
            f"scheduler={name} needs a known training length but trainer.max_epochs and "
            "trainer.max_steps are unbounded: set one, or scheduler.progress=time with trainer.max_time"
        )
    total_steps = max(1, int(total_steps))
    steps_per_epoch = total_steps / max_epochs if max_epochs and max_epochs > 0 else total_steps
    warmup = min(total_steps - 1, round(cfg.get("warmup_epochs", 0) * steps_per_epoch))
    if name == "onecycle":
        if cfg.get("pct_start", 0.25) * total_steps <= 1:
            # torch's OneCycleLR divides by zero when its warm-up is shorter than a step (a smoke run of a few
            # steps under the default recipe): the same shape, drawn as under a time budget
            return torch.optim.lr_scheduler.LambdaLR(optimizer, _onecycle_shape(cfg, total_steps))
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=cfg.get("pct_start", 0.25),
            div_factor=cfg.get("div_factor", 25.0),
            final_div_factor=cfg.get("final_div_factor", 1e4),
            anneal_strategy=cfg.get("anneal_strategy", "linear"),
            cycle_momentum=cfg.get("cycle_momentum", False),
        )
    if name == "none" and warmup == 0:
        return None
    fn = WarmupDecay(
        total_steps,
        warmup,
        kind=name,
        milestones=cfg.get("milestones", ()),
        gamma=cfg.get("gamma", 0.1),
        min_lr_ratio=cfg.get("min_lr_ratio", 0.0),
        warmup_start=cfg.get("warmup_start", 0.0),
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def _time_shape(cfg: dict[str, Any]) -> WarmupDecay:
    """The multiplier of a time-budget schedule over :data:`TIME_STEPS` virtual steps.

    torch's ``OneCycleLR`` counts real steps, so under a time budget ``onecycle`` is drawn
    with the same shape by :func:`_onecycle_shape`.
    """
    name = cfg["name"]
    if name == "onecycle":
        return _onecycle_shape(cfg, TIME_STEPS)
    return WarmupDecay(
        TIME_STEPS,
        0,
        kind=name,
        milestones=cfg.get("milestones", ()),
        gamma=cfg.get("gamma", 0.1),
        min_lr_ratio=cfg.get("min_lr_ratio", 0.0),
    )


def _onecycle_shape(cfg: dict[str, Any], steps: int) -> WarmupDecay:
    """OneCycle's multiplier over ``steps``, drawn by :class:`WarmupDecay`: from ``1/div_factor`` up to 1
    over ``pct_start``, then down to ``1/(div_factor * final_div_factor)`` (linear or cosine)."""
    div = cfg.get("div_factor", 25.0)
    return WarmupDecay(
        steps,
        round(cfg.get("pct_start", 0.25) * steps),
        kind="linear" if cfg.get("anneal_strategy", "linear") == "linear" else "cosine",
        min_lr_ratio=1 / (div * cfg.get("final_div_factor", 1e4)),
        warmup_start=1 / div,
    )


class BackboneWarmup(torch.optim.lr_scheduler.LRScheduler):
    """Multiplies the backbone groups' LRs by a linear ramp from 0 to 1 that starts at ``start_step``.

    At optimizer step ``k`` the factor is ``clip((k - start_step + 1) / steps, 0, 1)``: 0 while
    the backbone is frozen, ``1/steps`` at its first step, 1 from ``start_step + steps - 1`` on;
    the head's groups keep factor 1. It runs after the main schedule in a ``ChainedScheduler``
    (:func:`with_backbone_warmup`) and multiplies the LRs that schedule has just set. That is
    exact because every schedule built here sets its LRs in closed form from the base LRs
    (``LambdaLR``, ``OneCycleLR``), so the factor never compounds. torch has no per-group
    multiplicative warm-up that composes with ``OneCycleLR``: this class fills that gap.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, start_step: int, steps: int) -> None:
        self.start_step, self.steps = int(start_step), max(1, int(steps))
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        return min(1.0, max(0.0, (step - self.start_step + 1) / self.steps))

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [g["lr"] * f if is_backbone_group(g) else g["lr"] for g in self.optimizer.param_groups]


def is_backbone_group(group: dict[str, Any]) -> bool:
    """``backbone`` and ``backbone_no_decay`` of :func:`param_groups`."""
    return str(group.get("name", "")).startswith("backbone")


def with_backbone_warmup(
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    optimizer: torch.optim.Optimizer,
    start_step: int,
    steps: int,
) -> torch.optim.lr_scheduler.LRScheduler:
    """``scheduler`` (a constant LR when None) followed by :class:`BackboneWarmup`, stepped together."""
    if scheduler is None:  # the constant schedule, in closed form (see BackboneWarmup)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(1, kind="none"))
    return torch.optim.lr_scheduler.ChainedScheduler([scheduler, BackboneWarmup(optimizer, start_step, steps)])


def steps_per_epoch(trainer: Any) -> int:
    """Optimizer steps in one training epoch (after ``trainer.estimated_stepping_batches`` set up the data)."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ConfigError(
            "stage.backbone_warmup_epochs needs epochs of known length, but the training loader has no len(): "
            "set stage.backbone_warmup_epochs=0"
        )
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))
