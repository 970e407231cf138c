"""File-system helpers every durable writer shares: a file's sha256, a directory's fsync, one agent per state dir."""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path, *, best_effort: bool = False) -> None:
    """Make the directory entries in ``path`` durable (after a create or rename in it).

    ``best_effort``: a file system that cannot open or fsync a directory is tolerated (the rename itself still
    happened); otherwise the ``OSError`` propagates."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        if best_effort:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not best_effort:
            raise
    finally:
        os.close(fd)


def lock_dir(path: Path, name: str = "agent.lock") -> int:
    """Take an exclusive, non-blocking ``flock`` on ``path/name`` (created if missing) and return its descriptor,
    which holds the lock until closed. Raises ``BlockingIOError``/``OSError`` when another process holds it."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / name, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd
