"""The coordinator service: subscribe, store exactly once, commit, then acknowledge per device.

Transport callbacks only enqueue. One worker takes whatever arrived (up to ``batch_max``), commits
it in one transaction, publishes the cumulative ack of every (device, epoch) it touched (QoS 1, never
retained, signed with the coordinator's key when one is configured, valid for ``ack_ttl_s``) and only
then acknowledges the MQTT messages to the broker (manual ack), so a crash at any point leaves the
agent's rows in place and they are simply sent again (and acknowledged again: duplicates are re-acked).

Results from a device with a public key in ``CoordinatorAuth.device_keys`` must carry its signature;
forged ones are dropped before the transaction and counted (``forged``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from edge_agent.coordinator.store import DeviceUpdate, ResultRow, Store
from edge_agent.errors import EdgeAgentError
from edge_agent.protocol import codec, signing
from edge_agent.protocol.signing import AuthError, CoordinatorAuth
from edge_agent.transport.base import InboundMessage, Transport

log = logging.getLogger(__name__)


class Coordinator:
    def __init__(
        self,
        store: Store,
        transport: Transport,
        *,
        share_group: str | None = None,
        batch_max: int = 1000,
        max_payload_bytes: int = 1 << 20,
        auth: CoordinatorAuth | None = None,
    ) -> None:
        self.store = store
        self.auth = auth or CoordinatorAuth()
        self.refusals = signing.Refusals()
        self.transport = transport
        self.filters = codec.coordinator_filters(share_group)
        self.batch_max = batch_max
        self.max_payload_bytes = max_payload_bytes
        self.counters: dict[str, int] = dict.fromkeys(
            ("received", "inserted", "duplicates", "invalid", "forged", "acks_sent", "store_errors", "connects"), 0
        )
        self.connected = threading.Event()
        self._inbox: queue.SimpleQueue[InboundMessage | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # transport listener -------------------------------------------------------
    def on_connected(self, session_present: bool) -> None:
        self.counters["connects"] += 1
        self.transport.subscribe(self.filters, qos=1)
        self.connected.set()
        log.info("coordinator: connected (session present: %s), subscribed %s", session_present, self.filters)

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
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        self.transport.stop(timeout)

    def snapshot(self) -> dict[str, Any]:
        return {**self.counters, "connected": self.connected.is_set()}

    # worker ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.batch_max:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                self._process(batch)
            except Exception:
                log.exception("coordinator: batch of %d failed; not acknowledged", len(batch))
            if stop:
                return

    def _process(self, batch: list[InboundMessage]) -> None:
        now = time.time()
        results: list[ResultRow] = []
        devices: list[DeviceUpdate] = []
        for message in batch:
            self.counters["received"] += 1
            try:
                parsed = self._parse(message, now)
            except AuthError as exc:  # TODO(dead letters): quarantine once the store has a dead-letter table
                self.counters["forged"] += 1
                unlogged = self.refusals.note(f"result_{exc.reason}", time.monotonic())
                if unlogged is not None:
                    log.warning("coordinator: dropping a forged result on %.200s (result_%s): %s%s", message.topic,
                                exc.reason, exc.message, f" ({unlogged} more since)" if unlogged else "")
                continue
            except EdgeAgentError as exc:
                self.counters["invalid"] += 1
                log.warning("coordinator: dropping invalid message on %.200s: %s", message.topic, exc)
                continue
            if isinstance(parsed, ResultRow):
                results.append(parsed)
            elif parsed is not None:
                devices.append(parsed)
        try:
            outcome = self.store.commit_batch(results, devices)
        except EdgeAgentError:
            self.counters["store_errors"] += 1
            log.exception("coordinator: store failed; %d messages left unacknowledged", len(batch))
            return
        self.counters["inserted"] += outcome.inserted
        self.counters["duplicates"] += outcome.duplicates
        for (device, epoch), seq in outcome.watermarks.items():
            ts = time.time()
            payload = codec.ack_payload(device=device, epoch=epoch, seq=seq, ts=ts, exp=ts + self.auth.ack_ttl_s)
            if self.auth.ack_key is not None:
                payload = signing.sign(payload, self.auth.ack_key)
            if self.transport.publish(codec.ack_topic(device), codec.dumps(payload), qos=1, retain=False) is not None:
                self.counters["acks_sent"] += 1
        for message in batch:
            self.transport.ack(message)

    def _parse(self, message: InboundMessage, now: float) -> ResultRow | DeviceUpdate | None:
        topic = codec.parse_topic(message.topic)
        if topic.kind == "results":
            value = codec.parse_result(message.payload, max_bytes=self.max_payload_bytes)
            if value["device"] != topic.device:
                raise codec.CodecError("result device does not match its topic")
            self.auth.check_result(topic.device, value)
            return ResultRow(
                result_id=value["result_id"],
                device=value["device"],
                epoch=value["epoch"],
                seq=value["seq"],
                base=value["base"],
                input_id=value["input_id"],
                pipeline=value["pipeline"],
                model=value["model"],
                model_version=value["model_version"],
                created_at=float(value["created_at"]),
                received_at=now,
                payload=message.payload,
            )
        if topic.kind == "status":
            if not message.payload:
                return None
            value = codec.loads(message.payload, max_bytes=65536)
            state = value.get("state")
            if state not in ("online", "offline"):
                raise codec.CodecError("status without a valid state")
            ts = value.get("ts")
            return DeviceUpdate(topic.device, float(ts) if isinstance(ts, int | float) else now, state=state)
        if topic.kind == "heartbeat":
            value = codec.loads(message.payload, max_bytes=self.max_payload_bytes)
            return DeviceUpdate(topic.device, now, heartbeat=value)
        if topic.kind == "events":
            value = codec.loads(message.payload, max_bytes=self.max_payload_bytes)
            log.info("coordinator: event from %s: %s %s", topic.device, value.get("event"), value.get("data"))
        return None
