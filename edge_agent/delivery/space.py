"""Free space on the state disk, and the outbox's reserve: room kept so acknowledged rows can always be deleted.

Deleting rows from SQLite needs room first: the changed pages go to the write-ahead log before the
database file gives anything back. On a disk filled to the last byte (by the agent's own backlog or by
anything else) even a one-row delete fails with "database or disk is full", and the outbox can never
shrink again. So the outbox keeps ``<db>.reserve``, a file of ``reserve_bytes`` allocated up front
(``posix_fallocate``: real blocks, not a sparse file). When a write fails for lack of space the reserve is
deleted, the acknowledged rows are deleted in small transactions and the log is truncated; the reserve is
allocated again once the disk has room for it and ``min_free_bytes`` besides.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged process may still write under ``directory`` (``f_bavail``); raises OSError."""
    st = os.statvfs(directory)
    return int(st.f_bavail) * int(st.f_frsize)


class Reserve:
    """The reserve file (see the module docstring). Not thread-safe: the outbox's writer thread owns it."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.held = False
        self.spent = False  # released for a full disk and not allocated again yet
        if size > 0 and path.is_file():
            try:
                self.held = path.stat().st_blocks * 512 >= size
            except OSError:
                self.held = False
            if not self.held:
                path.unlink(missing_ok=True)  # a partial reserve from a crash or a full disk: start over

    def ensure(self, free: int, spare: int) -> bool:
        """Allocate the reserve when it is missing and the disk has room for it plus ``spare`` bytes."""
        if self.held or self.size <= 0:
            return self.held
        if free < self.size + spare:
            return False
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("outbox: cannot allocate the %d-byte reserve %s: %s", self.size, self.path, exc.strerror)
            return False
        self.held = True
        if self.spent:
            log.info("outbox: %d-byte disk reserve allocated again (%s)", self.size, self.path)
        self.spent = False
        return True

    def release(self) -> bool:
        """Delete the reserve so its blocks can take the write that failed; True when there was one."""
        if not self.held:
            return False
        self.held = False
        self.spent = True
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("outbox: cannot release the reserve %s: %s", self.path, exc.strerror)
            return False
        log.warning("outbox: disk full; released the %d-byte reserve to delete acknowledged rows", self.size)
        return True
