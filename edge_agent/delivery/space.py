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

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

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


SpaceState = Literal["ok", "low", "full"]
SPACE_CHECK_S = 1.0  # while space is short or the reserve is missing: look at the disk this often
RESUME_MARGIN_BYTES = 1 << 20  # inputs resume at min_free_bytes + this (or + half of min_free_bytes, if less)


class DiskSpace:
    """The state of the disk under ``directory`` as the outbox sees it, with its reserve.

    ``ok``; ``low``: under ``min_free_bytes`` free (new inputs wait; they resume at ``min_free_bytes`` plus a
    margin, so that the log's own growth and truncation do not flip the state); ``full``: a write failed for
    lack of space, or the reserve is spent and not allocated again yet. Listeners hear every change."""

    def __init__(self, directory: Path, min_free_bytes: int, reserve: Reserve) -> None:
        self.directory = directory
        self.min_free_bytes = min_free_bytes
        self.reserve = reserve
        self.state: SpaceState = "ok"
        self.free = -1
        self.next_check = 0.0
        self._full_at = 0.0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[SpaceState, int], None]] = []

    @property
    def tight(self) -> bool:
        return self.state != "ok"

    @property
    def owed(self) -> bool:
        """Something to watch: space short, or a reserve that should be there and is not."""
        return self.state != "ok" or (self.reserve.size > 0 and not self.reserve.held)

    def add_listener(self, listener: Callable[[SpaceState, int], None]) -> None:
        self._listeners.append(listener)

    def check(self) -> SpaceState:
        """Look at the disk now (one statvfs) and update the state; raises OSError."""
        return self._set(free_bytes(self.directory))

    def refresh(self) -> SpaceState:
        """Allocate the reserve again when there is room for it, then update the state (writer thread)."""
        self.next_check = time.monotonic() + SPACE_CHECK_S
        try:
            free = free_bytes(self.directory)
            if self.reserve.size > 0 and not self.reserve.held and self.reserve.ensure(free, 64 * 1024):
                free = free_bytes(self.directory)
        except OSError:
            return self.state
        return self._set(free)

    def out_of_space(self) -> bool:
        """A write failed for lack of space: state ``full``, the reserve released. True when it was held."""
        self._full_at = time.monotonic()
        self.next_check = 0.0
        released = self.reserve.release()
        with contextlib.suppress(OSError):
            self.check()
        return released

    def _set(self, free: int) -> SpaceState:
        full_recently = self._full_at and time.monotonic() - self._full_at < SPACE_CHECK_S
        need = self.min_free_bytes
        if self.state != "ok":
            need += min(RESUME_MARGIN_BYTES, self.min_free_bytes // 2)
        state: SpaceState = "full" if self.reserve.spent or full_recently else ("low" if free < need else "ok")
        with self._lock:
            self.free = free
            changed = state != self.state
            self.state = state
        if changed:
            log.log(logging.INFO if state == "ok" else logging.WARNING,
                    "outbox: disk under %s is %s (%d bytes free, min_free_bytes %d)", self.directory,
                    _SAYS[state], free, self.min_free_bytes)
            for listener in list(self._listeners):
                try:
                    listener(state, free)
                except Exception:  # a listener must never stop the writer
                    log.exception("outbox: disk state listener failed")
        return state


_SAYS = {
    "ok": "no longer short of space",
    "low": "low on space: new inputs wait",
    "full": "full: new inputs wait, acknowledged rows are deleted from the reserve",
}
