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

from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf.errors import OmegaConfBaseException

from resnet_cifar.errors import UserError
from resnet_cifar.sweep import in_multirun, write_status

log = logging.getLogger("resnet_cifar")
EXIT_USER_ERROR = 2


def run_task(task: Callable[..., Any], *args: Any, failed_value: Any = None) -> Any:
    """Run ``task``; on a user error print ``error: <message>`` and exit with status 2.

    In a multirun, a user error or a crash is logged and recorded, and ``failed_value`` returned.
    """
    try:
        result = task(*args)
    except (UserError, MisconfigurationException, OmegaConfBaseException) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.error(message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        write_status("failed", e, message)
        if in_multirun():
            return failed_value
        sys.exit(EXIT_USER_ERROR)
    except Exception as e:
        write_status("failed", e, f"{type(e).__name__}: {e}".strip().splitlines()[0])
        if not in_multirun():
            raise
        log.exception("Job failed; the sweep goes on")
        return failed_value
    write_status("completed")
    return result
