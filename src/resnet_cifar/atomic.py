"""The one way this project writes a file: whole or not at all.

A temporary file in the same directory, flushed and fsynced, then ``os.replace``d over the
target (atomic on POSIX and Windows), so a crash, a kill or a full disk mid-write leaves the
previous version intact, never half a file. Used for checkpoints, metrics, statuses and
predictions.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from resnet_cifar.errors import OutputError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported everywhere (e.g. Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", what: str = "", hint: str = "") -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on success it replaces ``path``.

    An ``OSError`` becomes an :class:`OutputError` naming ``what`` (e.g. "checkpoint") and the
    path, with ``hint`` appended; the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode, **({} if "b" in mode else {"newline": "", "encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or type(e).__name__
        raise OutputError(f"cannot write {what + ' ' if what else ''}{path}: {reason}{hint}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any, what: str = "") -> Path:
    """``data`` as indented, key-sorted JSON (non-JSON values as strings), atomically."""
    with atomic_write(path, "w", what) as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return Path(path)
