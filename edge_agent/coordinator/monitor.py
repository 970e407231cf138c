"""The fleet monitor: one thread that feeds committed batches to the alert rules and the dashboard's view.

The coordinator's worker only enqueues (``Coordinator.observers``); this thread summarises each result,
runs the rules (``alerts.AlertEngine``) on every batch and every ``alerts.tick_s``, stores each alert
change (``Store.save_alerts``) and publishes it on ``edge/v1/coordinator/alerts/<rule>`` (QoS 1, not
retained, signed with the ack key when there is one). What could not be stored or published (store
down, broker away) is kept and tried again on the next tick, in order.

On start it restores the firing alerts from the store (a restart raises no duplicate), the devices'
availability, and the results of the rules' windows (at most ``SEED_MAX`` of them).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from edge_agent.coordinator.alerts import AlertEngine, AlertsConfig, DeviceMeta
from edge_agent.coordinator.store import DeviceUpdate, ResultQuery, ResultRow, Store
from edge_agent.coordinator.summary import summarize
from edge_agent.coordinator.view import DAYS, FleetView
from edge_agent.errors import StorageError
from edge_agent.protocol import codec, signing

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

MAX_PENDING_BATCHES = 1000
"""Committed batches waiting for the monitor at most; beyond, a batch is skipped by the rules (counted,
logged): the ingest path never waits for alerting."""
SEED_MAX = 50_000
"""At most this many stored results are replayed into the rules and the view on start."""

class Publisher(Protocol):
    """The part of a ``Transport`` the monitor uses."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None: ...


_Batch = tuple[Sequence[ResultRow], Sequence[DeviceUpdate]]


class FleetMonitor:
    def __init__(
        self,
        store: Store,
        transport: Publisher | None,
        config: AlertsConfig,
        devices: dict[str, DeviceMeta] | None = None,
        *,
        ack_key: Ed25519PrivateKey | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.transport = transport
        self.config = config
        self.engine = AlertEngine(config, dict(devices or {}))
        self.view = FleetView(dict(devices or {}))
        self.ack_key = ack_key
        self.clock = clock
        self.counters = {"alerts_fired": 0, "alerts_resolved": 0, "alerts_published": 0, "alert_store_errors": 0,
                         "batches_skipped": 0}
        self.changed = threading.Condition()
        self.version = 0
        """Bumped whenever the view or the alerts change (the dashboard's stream waits on it)."""
        self._lock = threading.Lock()
        self._serial = threading.Lock()
        self._inbox: queue.Queue[_Batch | None] = queue.Queue(MAX_PENDING_BATCHES)
        self._unsaved: list[dict[str, Any]] = []
        self._unpublished: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None

    # coordinator observer (worker thread: enqueue only) -----------------------------------------
    def __call__(self, results: Sequence[ResultRow], devices: Sequence[DeviceUpdate]) -> None:
        try:
            self._inbox.put_nowait((list(results), list(devices)))
        except queue.Full:
            self.counters["batches_skipped"] += 1
            if self.counters["batches_skipped"] in (1, 10, 100) or self.counters["batches_skipped"] % 1000 == 0:
                log.warning("monitor: %d batches skipped by the alert rules (they fall behind ingest)",
                            self.counters["batches_skipped"])

    # lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self._restore()
        except StorageError as exc:
            log.warning("monitor: could not restore from the store (%s); starting empty", exc.message)
        self._thread = threading.Thread(target=self._run, name="fleet-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(queue.Full):
            self._inbox.put(None, timeout=timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "charts": self.view.charts(self.clock()),
                "latest": list(self.view.latest),
                "firing": [dict(a) for a in self.engine.active()],
                "version": self.version,
            }

    # the thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            tick = False
            try:
                item = self._inbox.get(timeout=self.config.tick_s)
            except queue.Empty:
                item, tick = None, True
            if item is None and not tick:
                return
            try:
                self.process(item)
            except Exception:
                log.exception("monitor: failed on a batch (the results are stored; alerts may be late)")

    def process(self, batch: _Batch | None) -> None:
        """Feed one batch (None: a tick alone), then store and publish what changed (one caller at a time)."""
        with self._serial:
            self._process(batch)

    def _process(self, batch: _Batch | None) -> None:
        now = self.clock()
        changes: list[dict[str, Any]] = []
        with self._lock:
            if batch is not None:
                results, devices = batch
                for d in devices:
                    changes += self.engine.observe_device(d.device, d.ts, d.state, now)
                for r in results:
                    summary = summarize(r.payload)
                    self.view.add(r.result_id, r.device, r.pipeline, r.created_at, summary)
                    if self.config.enabled:
                        changes += self.engine.observe_result(r.result_id, r.device, r.pipeline, r.created_at,
                                                              summary, now)
            if self.config.enabled:
                changes += self.engine.tick(now)
            if (batch is not None and batch[0]) or changes:
                self.version += 1
        for alert in changes:
            self.counters["alerts_fired" if alert["state"] == "firing" else "alerts_resolved"] += 1
            log.warning("alert %s: %s (%s)", alert["state"], alert["message"], alert["rule"])
        self._unsaved += changes
        self._unpublished += changes
        self._flush()
        if changes or (batch is not None and batch[0]):
            with self.changed:
                self.changed.notify_all()

    def _flush(self) -> None:
        if self._unsaved:
            try:
                self.store.save_alerts(self._unsaved)
                self._unsaved = []
            except StorageError as exc:
                self.counters["alert_store_errors"] += 1
                log.warning("monitor: could not store %d alert changes (%s); next tick", len(self._unsaved),
                            exc.message)
        while self._unpublished and self.transport is not None:
            alert = self._unpublished[0]
            payload = signing.sign(alert, self.ack_key) if self.ack_key is not None else alert
            token = self.transport.publish(codec.coordinator_alert_topic(alert["rule"]), codec.dumps(payload), qos=1)
            if token is None:
                break  # not connected: next tick
            self._unpublished.pop(0)
            self.counters["alerts_published"] += 1

    def _restore(self) -> None:
        now = self.clock()
        self.engine.restore(self.store.alerts(state="firing", limit=10_000))
        for d in self.store.devices():
            seen = max(float(x) for x in (d.get("state_ts"), d.get("last_heartbeat"), d.get("last_result"), 0.0)
                       if x is not None)
            self.engine.seed_device(d["device"], str(d.get("state") or "unknown"), float(d.get("state_ts") or seen),
                                    seen)
        changes: list[dict[str, Any]] = []
        rules = self.config
        horizon = max(rules.disease_outbreak.window_s, rules.defect_spike.window_s + rules.defect_spike.baseline_s,
                      rules.headcount_drop.window_s + rules.headcount_drop.baseline_s, DAYS * 86400.0)
        after: tuple[float, str] | None = None
        seeded = 0
        while seeded < SEED_MAX:
            page = self.store.query_results(ResultQuery(since=now - horizon, after=after, limit=1000))
            for r in page:
                summary = summarize(r.payload)
                self.view.add(r.result_id, r.device, r.pipeline, r.created_at, summary)
                changes += self.engine.observe_result(r.result_id, r.device, r.pipeline, r.created_at, summary,
                                                      now)
            seeded += len(page)
            if len(page) < 1000:
                break
            after = (page[-1].created_at, page[-1].result_id)
        # an alert restored as firing is not raised again (de-duplication); anything new is stored and published
        self._unsaved += changes
        self._unpublished += changes
        log.info("monitor: restored %d firing alerts, %d results", len(self.engine.active()), seeded)
