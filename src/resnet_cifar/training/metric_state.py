"""Metric states that must survive a resume: a checkpoint taken mid-epoch holds half an
epoch of ``train/acc``, and ``val/acc_best`` spans every epoch so far. torchmetrics keeps
metric states out of ``state_dict`` (they are not persistent), so they travel in the
checkpoint under their own key."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchmetrics import Metric

KEY = "metric_states"


def collect(module: nn.Module, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``{name: {state: tensor}}`` of the given metric attributes."""
    out = {}
    for name in names:
        metric: Metric = getattr(module, name)
        out[name] = {k: v.detach().cpu() for k, v in metric.metric_state.items() if hasattr(v, "detach")}
    return out


def restore(module: nn.Module, states: dict[str, dict[str, Any]] | None) -> None:
    """Put saved metric states back (on the module's device)."""
    for name, state in (states or {}).items():
        metric: Metric = getattr(module, name, None)
        if metric is None or not state:
            continue
        for key, value in state.items():
            setattr(metric, key, value.to(metric.device))
        metric._update_count = max(metric._update_count, 1)  # computed, not "compute before update"
        metric._computed = None
