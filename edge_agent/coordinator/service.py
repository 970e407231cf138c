"""The coordinator service: subscribe, store exactly once, commit, then acknowledge per device.

Transport callbacks only enqueue. One worker takes whatever arrived (up to ``batch_max``), commits
it in one transaction, publishes the cumulative ack of every (device, epoch) it touched (QoS 1, never
retained, signed with the coordinator's key when one is configured, valid for ``ack_ttl_s``) and only
then acknowledges the MQTT messages to the broker (manual ack), so a crash at any point leaves the
agent's rows in place and they are simply sent again (and acknowledged again: duplicates are re-acked).

Results from a device with a public key in ``CoordinatorAuth.device_keys`` must carry its signature;
forged ones are quarantined like any refused message (reason ``result_<why>``) and counted (``forged``).

No message can jam it (issue 13):

* every message is checked before the transaction (``codec.parse_device_message``: sizes, depth,
  64-bit ranges, ``base <= seq + 1``, names, strings); a refused one is quarantined in the store's
  dead-letter table with its reason, in the same transaction as the batch, and acknowledged to the
  broker like any other, so the broker's in-flight window never fills with it;
* should the store still refuse a batch because of what is in it, the batch is split in halves until
  the culprit is alone, and that one is quarantined (``store_rejected``);
* refusals are logged by reason code: the first of each, then at most once a minute (a hostile device
  cannot flood the log);
* a store that is unavailable (locked, unreachable, I/O) is reconnected with exponential backoff and
  the same batch retried: nothing is acknowledged to the broker before it is committed.

Device events (``edge/v1/<device>/events``) are checked the same way (operator feedback and livestock
events against their schema) and stored in the same transaction, de-duplicated (``coordinator.events``);
the livestock alerts and reports inside a result's ``body.sector`` are stored as the same events.

Its own availability is retained on ``edge/v1/coordinator/status`` (``online`` with a session id, and
``offline`` as the last will). The session id changes on every start and whenever the broker lost our
session; agents then re-send their unacknowledged results at once instead of waiting for their
re-publish timer (whatever they sent while no session was subscribed is gone from the broker).
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_agent.batching import take_batch
from edge_agent.coordinator import events as device_events
from edge_agent.coordinator.events import EventRow
from edge_agent.coordinator.store import BatchOutcome, DeadLetter, DeviceUpdate, ResultRow, Store
from edge_agent.errors import StoreRejectedError, StoreUnavailableError
from edge_agent.protocol import codec, signing
from edge_agent.protocol.signing import AuthError, CoordinatorAuth
from edge_agent.transport.base import InboundMessage, Transport, Will

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)


def coordinator_will(client_id: str, ack_key: Ed25519PrivateKey | None = None) -> Will:
    """The last will to give the coordinator's transport: retained ``offline`` on the coordinator status topic."""
    payload = codec.coordinator_status_payload(state="offline", coordinator=client_id, session=None, ts=time.time())
    if ack_key is not None:
        payload = signing.sign(payload, ack_key)
    return Will(codec.coordinator_status_topic(), codec.dumps(payload), qos=1, retain=True)


@dataclass(frozen=True)
class _Item:
    """One inbound message and what it became: a result row (with the livestock events it carries), a device
    update, device events, a dead letter or nothing."""

    message: InboundMessage
    result: ResultRow | None = None
    device: DeviceUpdate | None = None
    dead: DeadLetter | None = None
    events: tuple[EventRow, ...] = ()


ACK_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds (s) of the ingest-to-ack latency histogram (received from the broker -> ack published)."""
INGEST_RATE_WINDOW_S = 60.0

Observer = Callable[[Sequence[ResultRow], Sequence[DeviceUpdate]], None]
"""Told what each committed batch held (results, device updates), on the worker thread: must only enqueue."""


class LatencyHistogram:
    """Cumulative histogram (Prometheus style) of ingest-to-ack seconds; written by the worker thread only."""

    def __init__(self, bounds: Sequence[float] = ACK_LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if seconds <= b), len(self.bounds))
        self.counts[i] += 1
        self.sum += seconds
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        cumulative, total = [], 0
        for c in self.counts:
            total += c
            cumulative.append(total)
        return {"bounds": list(self.bounds), "cumulative": cumulative, "sum": self.sum, "count": self.count}


class _Stopping(Exception):
    """Raised inside the worker when a stop interrupts a store retry: nothing is acknowledged."""


class Coordinator:
    def __init__(
        self,
        store: Store,
        transport: Transport,
        *,
        share_group: str | None = None,
        batch_max: int = 1000,
        max_payload_bytes: int = 1 << 20,
        client_id: str = "edge-coordinator",
        retry_min_s: float = 0.5,
        retry_max_s: float = 30.0,
        auth: CoordinatorAuth | None = None,
    ) -> None:
        self.store = store
        self.auth = auth or CoordinatorAuth()
        self.refusals = signing.Refusals()
        self.transport = transport
        self.filters = codec.coordinator_filters(share_group)
        self.batch_max = batch_max
        self.max_payload_bytes = max_payload_bytes
        self.client_id = client_id
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "received",
                "inserted",
                "duplicates",
                "events_inserted",
                "events_duplicates",
                "events_skipped",
                "invalid",
                "forged",
                "dead_letters",
                "dropped",
                "acks_sent",
                "settled",
                "store_errors",
                "store_reconnects",
                "connects",
                "sessions",
            ),
            0,
        )
        self.dead_letter_reasons: dict[str, int] = {}
        self.ack_latency = LatencyHistogram()
        self.observers: list[Observer] = []
        self._ingested: deque[tuple[float, int]] = deque()
        self.store_ok = True
        self.session: str | None = None
        self.connected = threading.Event()
        self._inbox: queue.SimpleQueue[InboundMessage | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # transport listener -------------------------------------------------------
    def on_connected(self, session_present: bool) -> None:
        self.counters["connects"] += 1
        self.transport.subscribe(self.filters, qos=1)
        if self.session is None or not session_present:  # whatever was queued for an old session is gone
            self.session = secrets.token_hex(8)
            self.counters["sessions"] += 1
        # after SUBSCRIBE on the same connection: the broker handles both in order, so an agent that sees
        # this status and re-sends reaches our subscription
        self._publish_status("online")
        self.connected.set()
        log.info(
            "coordinator: connected (session present: %s, session %s), subscribed %s",
            session_present, self.session, self.filters,
        )

    def on_disconnected(self, reason: str) -> None:
        self.connected.clear()

    def on_message(self, message: InboundMessage) -> None:
        self._inbox.put(message)

    def on_published(self, token: int, ok: bool, reason: str) -> None:
        if not ok:
            log.error("coordinator: broker refused an ack: %s", reason)

    # lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="coordinator", daemon=True)
        self._thread.start()
        self.transport.start(self)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        if self.connected.is_set():
            self._publish_status("offline")
        self.transport.stop(timeout)

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.counters,
            "connected": self.connected.is_set(),
            "store_ok": self.store_ok,
            "session": self.session,
            "dead_letter_reasons": dict(self.dead_letter_reasons),
            "ack_latency": self.ack_latency.snapshot(),
            "ingest_rate": self.ingest_rate(),
        }

    def ingest_rate(self, now: float | None = None) -> float:
        """Results stored per second over the last ``INGEST_RATE_WINDOW_S`` (first time only)."""
        now = time.monotonic() if now is None else now
        points = list(self._ingested)
        recent = sum(n for t, n in points if t >= now - INGEST_RATE_WINDOW_S)
        return recent / INGEST_RATE_WINDOW_S

    def _publish_status(self, state: str) -> None:
        payload = codec.coordinator_status_payload(
            state="online" if state == "online" else "offline",
            coordinator=self.client_id,
            session=self.session if state == "online" else None,
            ts=time.time(),
        )
        if self.auth.ack_key is not None:
            payload = signing.sign(payload, self.auth.ack_key)
        self.transport.publish(codec.coordinator_status_topic(), codec.dumps(payload), qos=1, retain=True)

    # worker ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                return
            batch, stop = take_batch(self._inbox, first, self.batch_max)
            try:
                self._process(batch)
            except Exception:
                log.exception("coordinator: batch of %d failed; not acknowledged", len(batch))
            if stop:
                return

    def _process(self, batch: list[InboundMessage]) -> None:
        now = time.time()
        items = [self._classify(message, now) for message in batch]
        try:
            outcomes = self._commit(items)
        except _Stopping:
            log.warning("coordinator: stopping; %d messages left unacknowledged (the broker re-delivers them)",
                        len(batch))
            return
        marks: dict[tuple[str, str], int] = {}
        for outcome in outcomes:
            self.counters["inserted"] += outcome.inserted
            self.counters["duplicates"] += outcome.duplicates
            self.counters["events_inserted"] += outcome.events_inserted
            self.counters["events_duplicates"] += outcome.events_duplicates
            for key, seq in outcome.watermarks.items():
                marks[key] = max(marks.get(key, seq), seq)
        for (device, epoch), seq in marks.items():
            ts = time.time()
            payload = codec.ack_payload(device=device, epoch=epoch, seq=seq, ts=ts, exp=ts + self.auth.ack_ttl_s)
            if self.auth.ack_key is not None:
                payload = signing.sign(payload, self.auth.ack_key)
            if self.transport.publish(codec.ack_topic(device), codec.dumps(payload), qos=1, retain=False) is not None:
                self.counters["acks_sent"] += 1
        for message in batch:
            self.transport.ack(message)
        self.counters["settled"] += len(batch)
        acked = time.time()
        results = [i.result for i in items if i.result is not None]
        for r in results:
            self.ack_latency.observe(max(0.0, acked - r.received_at))
        inserted = sum(o.inserted for o in outcomes)
        if inserted:
            mono = time.monotonic()
            self._ingested.append((mono, inserted))
            while self._ingested and self._ingested[0][0] < mono - INGEST_RATE_WINDOW_S:
                self._ingested.popleft()
        devices = [i.device for i in items if i.device is not None]
        for observer in self.observers:
            try:
                observer(results, devices)
            except Exception:
                log.exception("coordinator: an observer failed (the batch is stored and acknowledged)")

    def _classify(self, message: InboundMessage, now: float) -> _Item:
        """Check one message before any transaction; a refused one becomes a dead letter (never raises)."""
        self.counters["received"] += 1
        if message.topic == codec.coordinator_status_topic():
            return _Item(message)  # our own availability (or another coordinator's): nothing to store
        try:
            checked = codec.parse_device_message(message.topic, message.payload, max_bytes=self.max_payload_bytes)
            if checked is None:
                return _Item(message)
            parsed, value = checked
            if isinstance(parsed, codec.ResultMessage):
                self.auth.check_result(parsed.device, value)
            if isinstance(parsed, codec.EventMessage):
                return _Item(message, events=(device_events.event_row(parsed, now),))
        except codec.CodecError as exc:
            return self._refused(message, exc.reason, exc.message, now)
        except AuthError as exc:
            return self._refused(message, f"result_{exc.reason}", exc.message, now, counter="forged")
        except Exception as exc:  # a bug must not stop the fleet either
            log.exception("coordinator: unexpected error checking a message on %.200s", message.topic)
            return self._refused(message, "payload_invalid", f"{type(exc).__name__}: {exc}", now)
        if isinstance(parsed, codec.ResultMessage):
            found, skipped = device_events.result_events(parsed, now)
            self.counters["events_skipped"] += skipped
            return _Item(message, events=tuple(found), result=ResultRow(
                result_id=parsed.result_id,
                device=parsed.device,
                epoch=parsed.epoch,
                seq=parsed.seq,
                base=parsed.base,
                input_id=parsed.input_id,
                pipeline=parsed.pipeline,
                model=parsed.model,
                model_version=parsed.model_version,
                created_at=parsed.created_at,
                received_at=now,
                payload=message.payload,
            ))
        if isinstance(parsed, codec.StatusMessage):
            return _Item(message, device=DeviceUpdate(parsed.device, parsed.ts, state=parsed.state))
        if isinstance(parsed, codec.HeartbeatMessage):
            return _Item(message, device=DeviceUpdate(parsed.device, now, heartbeat=value))
        return _Item(message)

    def _refused(
        self, message: InboundMessage, reason: str, detail: str, now: float, counter: str = "invalid"
    ) -> _Item:
        self.counters[counter] += 1
        unlogged = self.refusals.note(reason, time.monotonic())
        if unlogged is not None:
            log.warning("coordinator: quarantining a message on %.200s (%s): %.300s%s", message.topic, reason, detail,
                        f" ({unlogged} more since)" if unlogged else "")
        return _Item(message, dead=DeadLetter.of(message.topic, message.payload, reason, detail, now))

    def _commit(self, items: Sequence[_Item]) -> list[BatchOutcome]:
        """Commit ``items``; a batch the store refuses is split until the culprit is alone and quarantined."""
        try:
            return [self._commit_retrying(items)]
        except StoreRejectedError as exc:
            if len(items) > 1:
                half = len(items) // 2
                return self._commit(items[:half]) + self._commit(items[half:])
            (item,) = items
            if item.result is not None and item.events:  # the events it carries never cost a result
                self.counters["events_skipped"] += len(item.events)
                log.error("coordinator: the store refused the events of a result on %.200s (%s); stored without",
                          item.message.topic, exc.message)
                return self._commit([_Item(item.message, result=item.result)])
            if item.dead is not None:  # not even a dead letter can be stored: say so, acknowledge, go on
                self.counters["dropped"] += 1
                log.error("coordinator: could not quarantine a message on %.200s (%s); dropped it",
                          item.message.topic, exc.message)
                return []
            detail = exc.message
            log.error("coordinator: the store refused a message on %.200s: %s", item.message.topic, detail)
            dead = DeadLetter.of(item.message.topic, item.message.payload, "store_rejected", detail, time.time())
            return self._commit([_Item(item.message, dead=dead)])

    def _commit_retrying(self, items: Sequence[_Item]) -> BatchOutcome:
        """One transaction for ``items``; an unavailable store is reconnected with backoff until it works."""
        results = [i.result for i in items if i.result is not None]
        devices = [i.device for i in items if i.device is not None]
        dead = [i.dead for i in items if i.dead is not None]
        events = [e for i in items for e in i.events]
        if not (results or devices or dead or events):
            return BatchOutcome(0, 0, {})  # our own status, a cleared retained status: nothing to write
        delay = self.retry_min_s
        reconnect = False
        while True:
            try:
                if reconnect:
                    self.counters["store_reconnects"] += 1
                    self.store.reconnect()
                outcome = self.store.commit_batch(results, devices, dead, events)
            except StoreUnavailableError as exc:
                self.counters["store_errors"] += 1
                if self.store_ok:
                    log.error("coordinator: store unavailable (%s); %d messages wait, unacknowledged", exc.message,
                              len(items))
                else:
                    log.warning("coordinator: store still unavailable (%s); next try in %.1f s", exc.message, delay)
                self.store_ok = False
                if self._stop.wait(delay):
                    raise _Stopping from exc
                delay = min(delay * 2, self.retry_max_s)
                reconnect = True
                continue
            if not self.store_ok:
                log.warning("coordinator: store available again")
            self.store_ok = True
            for letter in dead:
                self.counters["dead_letters"] += 1
                self.dead_letter_reasons[letter.reason] = self.dead_letter_reasons.get(letter.reason, 0) + 1
            return outcome
