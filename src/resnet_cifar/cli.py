"""Entry-point glue: turn user errors into one line on stderr and a non-zero exit."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf.errors import OmegaConfBaseException

from resnet_cifar.errors import UserError

log = logging.getLogger("resnet_cifar")
EXIT_USER_ERROR = 2


def run_task(task: Callable[..., Any], *args: Any) -> Any:
    """Run ``task``; on a user error print ``error: <message>`` and exit with status 2."""
    try:
        return task(*args)
    except (UserError, MisconfigurationException, OmegaConfBaseException) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.error(message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
