"""Whether to show progress bars: the one switch for every command and download.

Progress goes to stderr and is shown only where someone watches: when stderr is a terminal
(as tqdm's ``disable=None``, pip or curl decide). ``RESNET_CIFAR_PROGRESS`` overrides that
for every command (train, eval, predict, export, the sweep report), the downloads and
Lightning's progress bar: ``0`` (quiet), ``1`` (always, e.g. into a log file), ``auto``.
An environment variable rather than a config key, because it must also reach the code
that runs outside a command's config: downloads inside model building, the sweep report.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

from resnet_cifar.errors import ConfigError

ENV = "RESNET_CIFAR_PROGRESS"
ON, OFF, AUTO = ("1", "true", "yes", "on"), ("0", "false", "no", "off"), ("", "auto")

T = TypeVar("T")


def show_progress(stream: TextIO | None = None) -> bool:
    """True when progress should be drawn on ``stream`` (default ``sys.stderr``)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ON:
        return True
    if value in OFF:
        return False
    if value not in AUTO:
        raise ConfigError(f"{ENV}={os.environ[ENV]!r} must be 1 (always), 0 (never) or auto (when stderr is a tty)")
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def progress_bar(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm`` on stderr, drawn only when :func:`show_progress` says so."""
    return tqdm(iterable, file=sys.stderr, disable=not show_progress(sys.stderr), dynamic_ncols=True, **kwargs)


def trainer_progress(trainer_cfg: Any, callbacks: list[Any]) -> dict[str, Any]:
    """``Trainer`` keyword arguments that make Lightning's progress bar follow :func:`show_progress`.

    Lightning draws its bar whether or not anyone watches, and refuses ``enable_progress_bar=False``
    next to a progress-bar callback; so when progress is hidden (or ``trainer.enable_progress_bar``
    is false) the bar callbacks are left out too.
    """
    if show_progress() and trainer_cfg.get("enable_progress_bar", True) is not False:
        return {"callbacks": callbacks}
    from pytorch_lightning.callbacks import ProgressBar

    return {"callbacks": [c for c in callbacks if not isinstance(c, ProgressBar)], "enable_progress_bar": False}
