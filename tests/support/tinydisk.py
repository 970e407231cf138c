"""A real, tiny tmpfs for disk-full tests (root only: CI runs as root), and a filler that takes its last byte.

``tiny_disk(path, size)`` mounts a tmpfs of ``size`` at ``path`` and unmounts it afterwards. Not root is a
test failure with a clear message, never a skip: a skipped disk-full test would hide the very thing it checks.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.delivery.space import free_bytes


@contextlib.contextmanager
def tiny_disk(path: Path, size: str = "3m") -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("disk-full tests mount a real tmpfs and need root (CI runs as root): run them as root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)  # still in use: detach now, freed when closed


def fill(disk: Path, leave: int = 0, name: str = "filler") -> int:
    """Grow ``disk/name`` until at most ``leave`` bytes are free; returns the bytes free afterwards."""
    fd = os.open(disk / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    block = b"\0" * 4096
    try:
        while free_bytes(disk) > leave:
            want = min(len(block), free_bytes(disk) - leave)
            try:
                os.write(fd, block[: max(want, 1)])
            except OSError:
                break
    finally:
        os.close(fd)
    return free_bytes(disk)


def unfill(disk: Path, name: str = "filler") -> None:
    (disk / name).unlink(missing_ok=True)
