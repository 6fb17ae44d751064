"""Entry-point glue: turn user errors into one line on stderr and a non-zero exit.

In a Hydra multirun a failing job must not end the sweep: the failure is recorded in the
job's ``status.json`` (see :mod:`resnet_cifar.sweep`) and the job returns ``failed_value``;
the sweep exits non-zero at its end (``SweepStatus``).
"""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.utilities.exceptions import SIGTERMException

from resnet_cifar.errors import UserError
from resnet_cifar.sweep import in_multirun, write_status

log = logging.getLogger("resnet_cifar")
EXIT_USER_ERROR = 2
EXIT_TERMINATED = 128 + 15  # the shell's status of a process ended by SIGTERM: not finished, resumable
USER_ERRORS = (UserError, MisconfigurationException, OmegaConfBaseException)
# Writing an output failed for a reason the user can fix (space, quota, permissions, read-only).
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def _user_error_message(e: BaseException) -> str | None:
    """The one-line message of a user error behind ``e`` (incl. a Hydra ``instantiate`` cause), else None."""
    if isinstance(e, InstantiationException) and isinstance(e.__cause__, USER_ERRORS):
        e = e.__cause__
    if isinstance(e, USER_ERRORS):
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, OSError) and e.errno in OUTPUT_ERRNOS:
        return f"cannot write {e.filename or 'an output file'}: {e.strerror}; outputs written before are intact"
    return None


def run_task(task: Callable[..., Any], *args: Any, failed_value: Any = None) -> Any:
    """Run ``task``; on a user error print ``error: <message>`` and exit with status 2.

    Every outcome is written to the run directory's ``status.json``. In a multirun, a user
    error or a crash is logged and recorded, and ``failed_value`` returned, so the sweep goes on.
    """
    try:
        result = task(*args)
    except SIGTERMException as exc:  # Lightning stopped at a batch end; LastCheckpoint has saved last.ckpt
        log.warning("Stopped by SIGTERM")
        write_status("terminated", exc, "stopped by SIGTERM (signal 15); resumable with ckpt_path=last")
        sys.exit(EXIT_TERMINATED)
    except Exception as exc:
        message = _user_error_message(exc)
        if message is None:  # a crash: keep its traceback
            write_status("failed", exc, f"{type(exc).__name__}: {exc}".strip().splitlines()[0])
            if not in_multirun():
                raise
            log.exception("Job failed; the sweep goes on")
            return failed_value
        log.error(message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        write_status("failed", exc, message)
        if in_multirun():
            return failed_value
        sys.exit(EXIT_USER_ERROR)
    write_status("completed")
    return result
