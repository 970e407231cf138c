"""Waiting on a condition with a deadline: polls a cheap predicate, never sleeps as synchronisation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def wait_for(cond: Callable[[], bool], timeout: float = 20.0, interval: float = 0.01) -> bool:
    """True as soon as ``cond()`` holds; False if it still does not at the deadline."""
    deadline = time.monotonic() + timeout
    ev = threading.Event()
    while time.monotonic() < deadline:
        if cond():
            return True
        ev.wait(interval)
    return cond()
