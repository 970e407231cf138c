"""Inputs accepted but without a result are never left pending: re-run at start (restart recovery), swept every
``SWEEP_S`` and at once when disk space returns (housekeeping), or rejected with a reason when they cannot run again.

Folder inputs are not handled here: their source retries them from the folder."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path

from edge_agent.config import AgentConfig, FolderSourceConfig
from edge_agent.delivery.interface import PendingInput
from edge_agent.delivery.outbox import Outbox
from edge_agent.errors import InputError, OverloadedError
from edge_agent.flow.pipeline import InputItem, PipelineOutput

log = logging.getLogger(__name__)

SWEEP_S = 60.0
"""Seconds between two sweeps for pending inputs nobody is working on."""

Submit = Callable[[InputItem], "Future[PipelineOutput]"]


class InFlight:
    """The input ids some pipeline is working on right now (thread-safe), so a sweep never runs one twice."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def add(self, input_id: str) -> None:
        with self._lock:
            self._ids.add(input_id)

    def discard(self, input_id: str) -> None:
        with self._lock:
            self._ids.discard(input_id)

    def snapshot(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._ids)


class Recovery:
    """Re-runs pending inputs through ``submit``; ``pipelines`` says which pipelines exist (``pipeline_gone``)."""

    def __init__(
        self,
        cfg: AgentConfig,
        outbox: Outbox,
        pipelines: Mapping[str, object],
        submit: Submit,
        in_flight: InFlight,
        spool_dir: Callable[[str], Path],
    ) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self.pipelines = pipelines
        self.submit = submit
        self.in_flight = in_flight
        self.spool_dir = spool_dir
        self.recovered = 0
        self._stopping = threading.Event()
        self._sweep_now = threading.Event()
        self._recovery: threading.Thread | None = None
        self._housekeeping: threading.Thread | None = None

    # --- at start ---------------------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Re-submit inputs accepted before a restart that have no result yet (folder sources do their own)."""
        self._clean_http_spool()
        todo = self._recoverable([p for p in self.outbox.pending_inputs() if p.source not in self._folders()])
        if not todo:
            return
        log.info("recovery: re-submitting %d accepted inputs without a result", len(todo))
        self._recovery = threading.Thread(target=self._resubmit, args=(todo,), name="recovery", daemon=True)
        self._recovery.start()

    def start_housekeeping(self) -> None:
        self._housekeeping = threading.Thread(target=self._housekeep, name="housekeeping", daemon=True)
        self._housekeeping.start()

    def wake(self) -> None:
        """Sweep now (disk space came back)."""
        self._sweep_now.set()

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        self._sweep_now.set()
        for thread in (self._recovery, self._housekeeping):
            if thread is not None:
                thread.join(timeout)

    # --- while running ----------------------------------------------------------------------------------------------

    def _housekeep(self) -> None:
        """Every SWEEP_S (and at once when space returns): re-run pending inputs nobody is working on."""
        while not self._stopping.is_set():
            self._sweep_now.wait(SWEEP_S)
            self._sweep_now.clear()
            if self._stopping.is_set():
                return
            try:
                self.sweep()
            except Exception:  # a background loop catches, counts, reports and goes on
                log.exception("housekeeping: re-running pending inputs failed")

    def sweep(self, min_age_s: float | None = None) -> int:
        """Re-submit pending inputs (not folder ones: their source retries them) that have no attempt running and
        were accepted more than ``min_age_s`` ago (default: longer than an upload may wait to be submitted)."""
        busy = self.in_flight.snapshot()
        age = self.cfg.http.queue_wait_s + 5.0 if min_age_s is None else min_age_s
        before = time.time() - age
        folders = self._folders()
        todo = [p for p in self.outbox.pending_inputs()
                if p.source not in folders and p.input_id not in busy and p.accepted_at <= before]
        items = self._recoverable(todo)
        if items:
            log.info("housekeeping: re-running %d pending inputs", len(items))
            self._resubmit(items)
        return len(items)

    # --- the parts --------------------------------------------------------------------------------------------------

    def _folders(self) -> set[str]:
        return {s.name for s in self.cfg.sources if isinstance(s, FolderSourceConfig)}

    def _recoverable(self, pending: Sequence[PendingInput]) -> list[InputItem]:
        """Items to re-run for ``pending`` inputs; those that cannot run again are rejected (never left pending)."""
        todo: list[InputItem] = []
        for p in pending:
            if p.pipeline not in self.pipelines:
                self.outbox.reject_input(p.input_id, "pipeline_gone", f"pipeline {p.pipeline!r} is not configured")
            elif p.spool_path and Path(p.spool_path).is_file():
                hints = p.meta.get("hints") if isinstance(p.meta.get("hints"), dict) else {}
                todo.append(
                    InputItem(
                        input_id=p.input_id, pipeline=p.pipeline, source=p.source, spool_path=p.spool_path,
                        hints={str(k): str(v) for k, v in (hints or {}).items()},
                    )
                )
            else:
                self.outbox.reject_input(p.input_id, "input_lost", "no spool file to retry after a restart")
        return todo

    def _clean_http_spool(self) -> None:
        """Uploads interrupted by a crash: partial ``.part`` files, and stored photos with no journal row
        (their client never got an answer, so it sends them again) are deleted."""
        spool = self.spool_dir("http")
        try:
            entries = list(spool.iterdir())
        except OSError:
            return
        removed = 0
        for path in entries:
            if not path.is_file():
                continue
            input_id = path.name.rsplit(".", 1)[0]
            if path.suffix == ".part" or self.outbox.input_state(input_id) is None:
                try:
                    path.unlink()
                    removed += 1
                except OSError as exc:
                    log.warning("recovery: cannot delete %s: %s", path, exc.strerror)
        if removed:
            log.info("recovery: deleted %d unjournalled or partial upload files from %s", removed, spool)

    def _resubmit(self, items: Sequence[InputItem]) -> None:
        for item in items:
            while not self._stopping.is_set():
                try:
                    fut = self.submit(item)
                except OverloadedError:
                    self._stopping.wait(0.05)  # queue full: the recovery backlog waits its turn
                    continue
                self.recovered += 1
                fut.add_done_callback(functools.partial(_drop_spool, item))
                break


def _drop_spool(item: InputItem, fut: Future[PipelineOutput]) -> None:
    """Delete a recovered input's spool file once its result or rejection is journalled (kept for a retry otherwise)."""
    if fut.cancelled() or item.spool_path is None:
        return
    exc = fut.exception()
    if exc is None or isinstance(exc, InputError):
        try:
            Path(item.spool_path).unlink(missing_ok=True)
        except OSError:
            log.warning("recovery: cannot delete spool file of %s", item.input_id)
