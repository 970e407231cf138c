"""Group commit's one shared step: after a first item, take whatever else is already queued, without waiting."""

from __future__ import annotations

import queue
from typing import Protocol, TypeVar

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class NowaitQueue(Protocol[T_co]):
    """``queue.Queue`` and ``queue.SimpleQueue`` alike: raise ``queue.Empty`` when nothing is there."""

    def get_nowait(self) -> T_co: ...


def take_batch(q: NowaitQueue[T | None], first: T, limit: int) -> tuple[list[T], bool]:
    """``first`` plus the items already in ``q``, up to ``limit`` in all. The flag says the stop sentinel (``None``)
    was taken: the caller runs this batch, then ends its loop."""
    batch = [first]
    while len(batch) < limit:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return batch, False
        if item is None:
            return batch, True
        batch.append(item)
    return batch, False
