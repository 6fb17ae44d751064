"""Entry-point glue: turn user errors into one line on stderr and a non-zero exit."""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable
from typing import Any

from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.utilities.exceptions import SIGTERMException

from resnet_cifar.errors import UserError

log = logging.getLogger("resnet_cifar")
EXIT_USER_ERROR = 2
EXIT_TERMINATED = 128 + 15  # the shell's status of a process ended by SIGTERM: not finished, resumable


def run_task(task: Callable[..., Any], *args: Any) -> Any:
    """Run ``task``; on a user error print ``error: <message>`` and exit with status 2."""
    try:
        return task(*args)
    except (UserError, MisconfigurationException, OmegaConfBaseException) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _exit_with(message)
    except SIGTERMException:  # stopped by SIGTERM outside fitting (which saves and exits itself)
        log.warning("Stopped by SIGTERM")
        sys.exit(EXIT_TERMINATED)
    except OSError as e:
        if e.errno not in OUTPUT_ERRNOS:
            raise
        _exit_with(f"cannot write {e.filename or 'an output file'}: {e.strerror}; outputs written before are intact")


# Writing an output failed for a reason the user can fix (space, quota, permissions, read-only).
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def _exit_with(message: str) -> None:
    log.error(message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
