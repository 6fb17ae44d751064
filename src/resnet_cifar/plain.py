"""Configs as plain Python: what constructors take and checkpoints store.

At the bottom of the package (below data, models and training), so that any layer can hand
a config section on without importing the config checks above it.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def to_dict(cfg: DictConfig | dict | None) -> dict[str, Any]:
    """A resolved plain-Python copy (safe to pickle into checkpoints with ``weights_only``)."""
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)
