"""Small file and process facts shared by what vipd keeps on disk (the spool, the operator's state,
the run folders): a durable write, a folder's fsync, whether a PID is alive."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "pid_alive", "write_durably"]


def fsync_dir(path: Path) -> None:
    """Make the entries of ``path`` (a rename into it, a new file) survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the folder, so that a crash
    leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def pid_alive(pid: int) -> bool:
    """Whether a process has this PID (someone else's counts; a reused PID looks alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
