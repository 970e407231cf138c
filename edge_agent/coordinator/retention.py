"""The store's retention policy (``store.retention``): a background thread that keeps results bounded by age and
count, and device events by age and count.

Each pass deletes in short batches until the store is within bounds, so inserts are never held up for
long; a store error is logged and the next pass tries again (retention never stops the coordinator)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from edge_agent.coordinator.config import RetentionConfig
from edge_agent.errors import StorageError

log = logging.getLogger(__name__)


class Prunable(Protocol):
    def prune(self, *, older_than: float | None = None, keep: int | None = None, limit: int = 5000) -> int: ...

    def prune_events(self, *, older_than: float | None = None, keep: int | None = None, limit: int = 5000) -> int: ...


class Retention:
    """Runs ``store.prune`` every ``cfg.interval_s`` (first pass at start); ``deleted`` counts what went."""

    def __init__(self, store: Prunable, cfg: RetentionConfig) -> None:
        self.store = store
        self.cfg = cfg
        self.deleted = 0
        self.events_deleted = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return any(x is not None for x in (self.cfg.max_age_days, self.cfg.max_results, self.cfg.max_events))

    def run_once(self, now: float | None = None) -> int:
        """One pass: prune batch after batch until a batch comes back short, results then events. Returns the
        results deleted (``events_deleted`` counts the events)."""
        if not self.active:
            return 0
        now = time.time() if now is None else now
        older_than = now - self.cfg.max_age_days * 86_400 if self.cfg.max_age_days is not None else None
        total = 0
        while not self._stop.is_set():
            n = self.store.prune(older_than=older_than, keep=self.cfg.max_results, limit=self.cfg.batch)
            total += n
            if n < self.cfg.batch:
                break
        self.deleted += total
        events = 0
        while not self._stop.is_set():
            n = self.store.prune_events(older_than=older_than, keep=self.cfg.max_events, limit=self.cfg.batch)
            events += n
            if n < self.cfg.batch:
                break
        self.events_deleted += events
        if total or events:
            log.info("retention: deleted %d results, %d events", total, events)
        return total

    def start(self) -> None:
        if self.active and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except StorageError as exc:
                self.errors += 1
                log.warning("retention: pass failed (next in %.0f s): %s", self.cfg.interval_s, exc)
            self._stop.wait(self.cfg.interval_s)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
