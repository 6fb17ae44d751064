"""Entry-point glue: turn user errors into one line on stderr and a non-zero exit.

In a Hydra multirun a failing job must not end the sweep: the failure is recorded in the
job's ``status.json`` (see :mod:`resnet_cifar.sweep`) and the job returns ``failed_value``;
the sweep exits non-zero at its end (``SweepStatus``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf.errors import OmegaConfBaseException

from resnet_cifar.errors import UserError
from resnet_cifar.sweep import in_multirun, write_status

log = logging.getLogger("resnet_cifar")
EXIT_USER_ERROR = 2
USER_ERRORS = (UserError, MisconfigurationException, OmegaConfBaseException)


def _user_error(e: BaseException) -> BaseException | None:
    """The user error behind ``e``: itself, or the cause of a Hydra ``instantiate`` failure (e.g. in Trainer())."""
    if isinstance(e, InstantiationException) and isinstance(e.__cause__, USER_ERRORS):
        return e.__cause__
    return e if isinstance(e, USER_ERRORS) else None


def run_task(task: Callable[..., Any], *args: Any, failed_value: Any = None) -> Any:
    """Run ``task``; on a user error print ``error: <message>`` and exit with status 2.

    Every outcome is written to the run directory's ``status.json``. In a multirun, a user
    error or a crash is logged and recorded, and ``failed_value`` returned, so the sweep goes on.
    """
    try:
        result = task(*args)
    except Exception as exc:
        e = _user_error(exc)
        if e is None:  # a crash: keep its traceback
            write_status("failed", exc, f"{type(exc).__name__}: {exc}".strip().splitlines()[0])
            if not in_multirun():
                raise
            log.exception("Job failed; the sweep goes on")
            return failed_value
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.error(message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        write_status("failed", e, message)
        if in_multirun():
            return failed_value
        sys.exit(EXIT_USER_ERROR)
    write_status("completed")
    return result
