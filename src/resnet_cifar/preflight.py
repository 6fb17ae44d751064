"""Checks on the command line that must run before Hydra creates the run directory.

Hydra creates ``hydra.run.dir`` (and writes its config there) before the task starts, and
reports a failure with a traceback. This check finds an output directory that cannot be
created first, and reports it as one ``error:`` line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from resnet_cifar.cli import EXIT_USER_ERROR

DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "paths.log_dir")


def output_dirs(argv: Sequence[str]) -> list[tuple[str, str]]:
    """``(key, directory)`` pairs the run will create, as far as the command line tells (no interpolations)."""
    found = []
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key in DIR_KEYS and value and "${" not in value:
            found.append((key, value))
    if not any(k.startswith("hydra.") for k, _ in found):  # the run directory goes under paths.log_dir
        if not any(k == "paths.log_dir" for k, _ in found):
            found.append(("paths.log_dir", os.environ.get("RESNET_CIFAR_LOGS", "logs")))
    else:
        found = [(k, v) for k, v in found if k.startswith("hydra.")]
    return found


def unwritable_reason(directory: str | os.PathLike) -> str | None:
    """Why ``directory`` cannot be created or written to, or None if it can."""
    path = Path(directory).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_output_dirs(argv: Sequence[str] | None = None) -> None:
    """Exit with ``error: ...`` (status 2) if an output directory named on the command line cannot be created."""
    for key, directory in output_dirs(sys.argv[1:] if argv is None else argv):
        reason = unwritable_reason(directory)
        if reason:
            print(
                f"error: {key}={directory} cannot be used as an output directory: {reason}; choose another directory",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(EXIT_USER_ERROR)
