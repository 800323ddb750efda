"""Host-side reads and copies of files in instance directories.

A sandboxed process could place a symlink or a FIFO where the gateway expects one of its
files, so every host-side open here uses O_NOFOLLOW and accepts only a regular file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path


class NotRegularFileError(OSError):
    """The path is a symlink, a directory, a FIFO or another file that is not regular."""


def open_regular(path: Path) -> int:
    """Open `path` read-only without following a symlink; return the fd of a regular file.

    Raises `FileNotFoundError` when it is missing and `NotRegularFileError` when it is not a
    regular file. O_NONBLOCK keeps the open from blocking on a FIFO.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            raise
        if os.path.islink(path):
            raise NotRegularFileError(f"{path} is a symlink, not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path, tail_bytes: int | None = None) -> bytes:
    """Return a regular file's content, or its last `tail_bytes` bytes."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as handle:
        if tail_bytes is not None:
            handle.seek(max(0, os.fstat(fd).st_size - tail_bytes))
        return handle.read()


def copy_regular(source: Path, destination: Path) -> None:
    """Copy a regular file's content, mode and times; a symlink at `source` raises.

    `destination` is replaced: an existing entry there is removed first, so a symlink at
    `destination` is not followed either.
    """
    fd = open_regular(source)
    with os.fdopen(fd, "rb") as reader:
        with contextlib.suppress(FileNotFoundError):
            destination.unlink()
        out_fd = os.open(
            destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        with os.fdopen(out_fd, "wb") as writer:
            shutil.copyfileobj(reader, writer)
            status = os.fstat(fd)
            os.fchmod(out_fd, stat.S_IMODE(status.st_mode))
            os.utime(out_fd, ns=(status.st_atime_ns, status.st_mtime_ns))
