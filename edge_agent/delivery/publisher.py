"""The publisher: drains the outbox over a Transport and deletes rows only on the coordinator's ack.

One worker thread owns all state; transport callbacks only enqueue events, so nothing here can
deadlock against the transport's network thread. Protocol (see ``docs/mqtt.md``):

* results are published in seq order, QoS 1, at most ``window`` published-but-unacknowledged;
* a broker PUBACK only means the broker has it; rows are deleted on the cumulative end-to-end ack
  (``edge/v1/<device>/ack``) of the coordinator, for this outbox's epoch; the deletion is committed in
  the background (at most one in flight) so that publishing never waits for the outbox's fsync;
* an ack is trusted only when it is live (a retained one is refused), for this device and epoch, signed by a
  coordinator key when ``AgentAuth.ack_keys`` is set, and unexpired; it never deletes a row the broker has not
  confirmed receiving from us (the part beyond is ignored, and an ack beyond every seq assigned is refused);
* commands: refused when retained, unsigned or expired (when ``AgentAuth.command_keys`` is set), aimed at another
  device, outside the allow-list and bounds (``CommandPolicy``), or replayed (ids journalled in the outbox);
  every refusal is counted by code and logged (first of a code, then at most once a minute);
* whatever stays unacknowledged for ``ack_timeout_s`` is published again, at most ``republish_per_s``;
* after a reconnect everything unacknowledged is sent again from the oldest (duplicates are harmless:
  the coordinator de-duplicates by result id);
* so it is when the coordinator announces a new session (``edge/v1/coordinator/status``, live, not the
  retained copy that arrives with our own subscription): it restarted or the broker lost its session,
  so whatever we sent meanwhile may be gone; at most once per ``resend_min_interval_s``;
* availability is retained on ``.../status`` (``online``, and ``offline`` as the last will);
* heartbeats carry health, backlog, model versions and counters; the state is ``degraded``
  while the broker is unreachable or refuses our publishes;
* events the outbox stores (alarms such as ``outbox_corrupt``) are published QoS 1 and forgotten once
  the broker has them, so an alarm raised while offline, or just before a crash, still goes out.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

from edge_agent.delivery.homeassistant import HomeAssistant
from edge_agent.delivery.interface import StoredResult
from edge_agent.delivery.outbox import Outbox
from edge_agent.errors import EdgeAgentError
from edge_agent.protocol import codec, signing
from edge_agent.protocol.commands import Command, CommandError, CommandPolicy, check_policy, parse_command
from edge_agent.protocol.signing import AgentAuth, AuthError
from edge_agent.transport.base import InboundMessage, Transport, Will

log = logging.getLogger(__name__)
State = Literal["starting", "connected", "degraded", "stopped"]
CommandHandler = Callable[[Command], dict[str, Any]]


@dataclass(frozen=True)
class PublisherSettings:
    window: int = 256
    batch: int = 64
    ack_timeout_s: float = 15.0
    republish_per_s: float = 500.0
    heartbeat_s: float = 30.0
    prune_s: float = 60.0
    idle_poll_s: float = 1.0
    reject_degraded_s: float = 30.0
    resend_min_interval_s: float = 1.0


def availability_will(device_id: str, session_ts: float | None = None) -> Will:
    """The last will to give the transport: retained ``offline`` on the status topic.

    ``session_ts`` stamps it; give the publisher the same one (``Publisher(session_ts=...)``) so that its ``online``
    does not look newer than the will, which is set at connect time and would otherwise lose to it at the
    coordinator (which keeps the newest state by ``ts``, the later arrival on a tie)."""
    ts = time.time() if session_ts is None else session_ts
    payload = codec.dumps(codec.status_payload(device=device_id, state="offline", ts=ts))
    return Will(codec.status_topic(device_id), payload, qos=1, retain=True)


class Publisher:
    """Drains ``outbox`` through ``transport`` (see module docstring). ``start()`` never blocks."""

    def __init__(
        self,
        outbox: Outbox,
        transport: Transport,
        device_id: str,
        health: Callable[[], dict[str, Any]],
        settings: PublisherSettings | None = None,
        command_handler: CommandHandler | None = None,
        *,
        auth: AgentAuth | None = None,
        policy: CommandPolicy | None = None,
        session_ts: float | None = None,
        home_assistant: HomeAssistant | None = None,
    ) -> None:
        self.outbox = outbox
        self.home_assistant = home_assistant
        """Home Assistant discovery: configs on every connect, per-pipeline state as results go out."""
        self.session_ts = session_ts
        """The will's timestamp (see :func:`availability_will`); ``online`` carries it too. None: the time now."""
        self.transport = transport
        self.device_id = codec.check_name(device_id, "device")
        self.health = health
        self.settings = settings or PublisherSettings()
        self.command_handler = command_handler
        self.auth = auth or AgentAuth()
        self.policy = policy or CommandPolicy()
        self.refusals = signing.Refusals()
        self.heartbeat_s = self.settings.heartbeat_s
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "published",
                "republished",
                "broker_acked",
                "rejected",
                "acked",
                "connects",
                "disconnects",
                "heartbeats",
                "commands_ok",
                "commands_refused",
                "acks_refused",
                "acks_stale",
                "acks_clamped",
                "coordinator_sessions",
                "errors",
            ),
            0,
        )
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._connected = False
        self._stopped = threading.Event()
        self._last_reject = 0.0
        self._started_at = time.monotonic()
        self._outstanding: dict[int, float] = {}
        self._mids: dict[int, int] = {}
        self._cursor = 0
        self._sent_through = 0  # the highest seq published so far: sending it again counts as a re-publish
        self._acked = 0
        self._deleted = 0
        self._deleting: tuple[int, Future[int]] | None = None
        self._ack_seen = 0
        self._confirmed = 0  # highest seq the broker confirmed (PUBACK) receiving from us: acks never go beyond
        self._tokens = 0.0
        self._alarms_sent = 0  # of the outbox's memory_alarms (alarms it could not store)
        self._event_mids: dict[int, int] = {}  # transport token -> stored event id
        self._events_delivered: set[int] = set()  # PUBACKed, deletion not committed yet
        self._next_heartbeat = 0.0
        self._next_prune = 0.0
        self.ack_topic = codec.ack_topic(self.device_id)
        self.coordinator_topic = codec.coordinator_status_topic()
        self._coordinator_session: str | None = None
        self._resend_at: float | None = None
        self._last_resend = float("-inf")

    # ------------------------------------------------------------------ public
    @property
    def state(self) -> State:
        if self._stopped.is_set():
            return "stopped"
        if self._thread is None:
            return "starting"
        if not self._connected or time.monotonic() - self._last_reject < self.settings.reject_degraded_s:
            return "degraded"
        return "connected"

    def start(self) -> None:
        self._started_at = time.monotonic()
        if not self.auth.ack_keys:
            log.warning(
                "publisher: acks are unauthenticated (no mqtt.ack_keys): anyone allowed to publish on %s can make "
                "this agent delete results the broker has confirmed; configure coordinator keys outside a loopback "
                "demo", self.ack_topic,
            )
        if not self.auth.command_keys:
            log.warning(
                "publisher: commands are unauthenticated (no commands.trusted_keys): anyone allowed to publish on "
                "%s runs the allowed commands (%s)", codec.command_filter(self.device_id),
                ", ".join(sorted(self.policy.allow)) or "none",
            )
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()
        self.outbox.add_listener(self.wake)
        self.transport.start(self)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline``, disconnect cleanly and stop the worker, within ``timeout`` seconds."""
        if self._thread is None or self._stopped.is_set():
            return
        self.outbox.remove_listener(self.wake)
        self._events.put(("stop", None))
        self._thread.join(timeout)
        self._stopped.set()
        try:
            self.transport.stop(timeout)
        except Exception:
            log.exception("publisher: transport stop failed")

    def wake(self) -> None:
        """Tell the worker that new rows are in the outbox."""
        self._events.put(("wake", None))

    def publish_event(
        self, event: str, severity: Literal["info", "warning", "alarm"], data: dict[str, Any] | None = None
    ) -> None:
        """Send an event on ``edge/v1/<device>/events`` (dropped when offline: events are not durable)."""
        self._events.put(("event", (event, severity, data or {})))

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.counters,
            "state": self.state,
            "in_flight": len(self._outstanding),
            "acked_seq": self._acked,
            "refusals": dict(self.refusals.counts),
            "coordinator_session": self._coordinator_session,
        }

    # ------------------------------------------------------------------ transport listener (any thread)
    def on_connected(self, session_present: bool) -> None:
        self._events.put(("connected", session_present))

    def on_disconnected(self, reason: str) -> None:
        self._events.put(("disconnected", reason))

    def on_message(self, message: InboundMessage) -> None:
        self._events.put(("message", message))

    def on_published(self, token: int, ok: bool, reason: str) -> None:
        self._events.put(("published", (token, ok, reason)))

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        last = time.monotonic()
        while True:
            timeout = self.settings.idle_poll_s if not self._outstanding else 0.1
            try:
                events = [self._events.get(timeout=timeout)]
            except queue.Empty:
                events = []
            while True:
                try:
                    events.append(self._events.get_nowait())
                except queue.Empty:
                    break
            now = time.monotonic()
            self._tokens = min(
                self._tokens + (now - last) * self.settings.republish_per_s, float(self.settings.republish_per_s)
            )
            last = now
            try:
                if any(kind == "stop" for kind, _ in events):
                    self._handle_all([e for e in events if e[0] != "stop"])
                    self._absorb_acks()
                    self._commit_acks(wait=True)
                    self._shutdown()
                    return
                self._handle_all(events)
                self._absorb_acks()
                if self._connected:
                    self._resend_if_due(time.monotonic())
                    self._send_stored_events()
                    self._fill()
                    self._retry(now)
                self._commit_acks()  # never blocks: the delete commits on the outbox writer meanwhile
                self._timers(now)
            except Exception:
                self.counters["errors"] += 1
                log.exception("publisher: loop error (continuing)")

    def _handle_all(self, events: list[tuple[str, Any]]) -> None:
        for kind, value in events:
            if kind == "connected":
                self._on_connected()
            elif kind == "disconnected":
                if self._connected:
                    self.counters["disconnects"] += 1
                    log.warning("publisher: broker connection lost (%s); degraded", value)
                self._connected = False
                self._reset_inflight()
            elif kind == "published":
                self._on_puback(*value)
            elif kind == "message":
                self._on_inbound(value)
            elif kind == "event":
                self._send_event(*value)
            elif kind == "event_forgotten":
                self._events_delivered.discard(value)
            elif kind == "pruned" and value.exception() is not None:
                self.counters["errors"] += 1
                log.error("publisher: outbox prune failed: %s", value.exception())
            # "wake" only ends the wait; the loop then does the work

    def _reset_inflight(self) -> None:
        self._outstanding.clear()
        self._mids.clear()
        self._event_mids.clear()
        self._cursor = 0

    def _on_connected(self) -> None:
        self._connected = True
        self.counters["connects"] += 1
        self._reset_inflight()
        self.transport.subscribe([self.ack_topic, codec.command_filter(self.device_id), self.coordinator_topic], qos=1)
        ts = time.time() if self.session_ts is None else self.session_ts
        online = codec.status_payload(device=self.device_id, state="online", ts=ts)
        self.transport.publish(codec.status_topic(self.device_id), codec.dumps(online), qos=1, retain=True)
        self._alarms_sent = 0  # alarms the outbox could not store: once more on every connection
        self._next_heartbeat = 0.0
        if self.home_assistant is not None:
            for topic, config in self.home_assistant.discovery():
                self.transport.publish(topic, codec.dumps(config), qos=1, retain=True)
            self._send_states(force=True)

    def _send_stored_events(self) -> None:
        """Publish the outbox's stored events not in flight yet (each is deleted on its PUBACK), and the alarms it
        could not store (a database failing at run time), which are sent once per connection."""
        alarms = self.outbox.memory_alarms
        for alarm in alarms[self._alarms_sent :]:
            name, _, message = alarm.partition(": ")
            self._send_event(name, "alarm", {"message": message})
        self._alarms_sent = len(alarms)
        if self.outbox.events_pending <= len(self._event_mids) + len(self._events_delivered):
            return
        flying = set(self._event_mids.values()) | self._events_delivered
        for ev in self.outbox.pending_events():
            if ev.id in flying:
                continue
            payload = codec.event_payload(
                device=self.device_id, ts=ev.created_at, event=ev.event, severity=ev.severity, data=ev.data
            )
            token = self.transport.publish(codec.events_topic(self.device_id), codec.dumps(payload), qos=1)
            if token is None:
                return
            self._event_mids[token] = ev.id

    def _event_forgotten(self, event_id: int, _fut: Future[None]) -> None:
        self._events.put(("event_forgotten", event_id))  # done callback (outbox writer): back to the worker

    def _on_puback(self, token: int, ok: bool, reason: str) -> None:
        event_id = self._event_mids.pop(token, None)
        if event_id is not None:
            if ok:
                self._events_delivered.add(event_id)
                self.outbox.event_sent_async(event_id).add_done_callback(
                    functools.partial(self._event_forgotten, event_id)
                )
            else:  # refused: kept, sent again after the next reconnect
                self._event_mids[-token - 1] = event_id
                log.error("publisher: broker refused stored event %d (%s); kept", event_id, reason)
            return
        seq = self._mids.pop(token, None)
        if seq is None:
            return
        if ok:
            self.counters["broker_acked"] += 1
            self._confirmed = max(self._confirmed, seq)
            return
        self.counters["rejected"] += 1
        first = time.monotonic() - self._last_reject > self.settings.reject_degraded_s
        self._last_reject = time.monotonic()
        if first:
            log.error("publisher: broker refused result seq %d (%s); kept for retry, degraded", seq, reason)
            self._send_event("publish_rejected", "alarm", {"seq": seq, "reason": reason})

    def _on_inbound(self, message: InboundMessage) -> None:
        if message.topic == self.coordinator_topic:
            self._on_coordinator_status(message)
            return
        if message.topic == self.ack_topic:
            self._on_ack(message)
            return
        try:
            topic = codec.parse_topic(message.topic)
        except codec.CodecError:
            return
        if topic.kind == "cmd" and topic.device == self.device_id and topic.name is not None:
            self._run_command(topic.name, message)

    def _refuse(self, code: str, message: str) -> None:
        """Count a refused ack or command by code; log the first of each code, then at most once a minute."""
        unlogged = self.refusals.note(code, time.monotonic())
        if unlogged is not None:
            more = f" ({unlogged} more since the last report)" if unlogged else ""
            log.warning("publisher: refused (%s): %s%s", code, message[:300], more)

    def _on_ack(self, message: InboundMessage) -> None:
        """Take a coordinator ack (see the module docstring); everything doubtful is refused, counted and logged."""
        code, why = self._check_ack(message)
        if code is not None:
            self.counters["acks_refused"] += 1
            self._refuse(code, why)

    def _check_ack(self, message: InboundMessage) -> tuple[str | None, str]:
        if message.retain:
            return "ack_retained", "a retained ack (acks are never retained: a stale or forged one sits on the broker)"
        try:
            value = codec.loads(message.payload, max_bytes=codec.MAX_ACK_BYTES)
            ack = codec.parse_ack_value(value)
        except codec.CodecError as exc:
            return "ack_malformed", str(exc)
        if self.auth.ack_keys:
            try:
                signing.verify(value, self.auth.ack_keys)
                signing.check_lifetime(value, now=time.time(), skew_s=self.auth.max_clock_skew_s)
            except AuthError as exc:
                return f"ack_{exc.reason}", f"ack for seq {ack.seq}: {exc.message}"
        if ack.device != self.device_id:
            return "ack_wrong_device", f"ack for device {ack.device[:64]!r} on our topic"
        if ack.epoch != self.outbox.epoch:
            return "ack_other_epoch", f"ack for epoch {ack.epoch[:64]!r}, ours is {self.outbox.epoch}"
        if ack.seq >= self.outbox.next_seq():
            return "ack_beyond_sent", f"ack for seq {ack.seq}, never assigned (outbox copied or restored? forged?)"
        if ack.seq <= max(self._ack_seen, self._acked):
            self.counters["acks_stale"] += 1  # a re-ack of duplicates, or an old ack: changes nothing
            return None, ""
        if ack.seq > self._confirmed:  # normal right after a restart: the coordinator knows rows we re-send now
            self.counters["acks_clamped"] += 1
            if self._confirmed <= max(self._ack_seen, self._acked):
                return None, ""
        self._ack_seen = min(ack.seq, self._confirmed)
        return None, ""

    def _on_coordinator_status(self, message: InboundMessage) -> None:
        """A new coordinator session, heard live: schedule a re-send of everything unacknowledged.

        With ``AgentAuth.ack_keys`` the status must be signed by one of them (like an ack); a refused one only
        means the re-send waits for the timer. A forged one could at worst cause one re-send per
        ``resend_min_interval_s``: it deletes nothing."""
        try:
            value = codec.loads(message.payload, max_bytes=codec.MAX_STATUS_BYTES, max_depth=8)
            status = codec.parse_coordinator_status_value(value)
            if self.auth.ack_keys:
                signing.verify(value, self.auth.ack_keys)
        except codec.CodecError as exc:
            self._refuse("coordinator_status_malformed", str(exc))
            return
        except AuthError as exc:
            self._refuse(f"coordinator_status_{exc.reason}", f"coordinator status: {exc.message}")
            return
        if status.state != "online" or status.session == self._coordinator_session:
            return
        self._coordinator_session = status.session
        if message.retain:  # it was there before our subscription: our own (re)connect re-sent after it
            return
        self.counters["coordinator_sessions"] += 1
        self._resend_at = max(time.monotonic(), self._last_resend + self.settings.resend_min_interval_s)

    def _resend_if_due(self, now: float) -> None:
        if self._resend_at is None or now < self._resend_at:
            return
        self._resend_at = None
        self._last_resend = now
        log.info("publisher: new coordinator session %s; re-sending %d in flight and the rest of the backlog",
                 self._coordinator_session, len(self._outstanding))
        self._reset_inflight()

    def _absorb_acks(self) -> None:
        """Free the window for everything the coordinator acknowledged (in memory; deleted next)."""
        if self._ack_seen <= self._acked:
            return
        self._acked = self._ack_seen
        for seq in [s for s in self._outstanding if s <= self._acked]:
            del self._outstanding[seq]

    def _commit_acks(self, wait: bool = False) -> None:
        """Delete acknowledged rows: settle the deletion in flight (``wait``: block for it), then start the next."""
        if self._deleting is not None:
            seq, fut = self._deleting
            if not wait and not fut.done():
                return
            self._deleting = None
            try:
                fut.result()  # counted in _count_deleted already
                self._deleted = seq
            except EdgeAgentError as exc:  # rows stay, are re-sent at worst; retried on the next loop
                self.counters["errors"] += 1
                log.error("publisher: deleting acknowledged rows through seq %d failed: %s", seq, exc)
                if wait:
                    return
        if self._acked > self._deleted:
            fut = self.outbox.ack_through_async(self._acked)
            self._deleting = (self._acked, fut)  # settled on a later loop: no extra wake-up per deletion
            fut.add_done_callback(self._count_deleted)
            if wait:
                self._commit_acks(wait=True)

    def _count_deleted(self, fut: Future[int]) -> None:
        """Done callback (outbox writer thread): count the rows as soon as their deletion is on disk."""
        if not fut.cancelled() and fut.exception() is None:
            self.counters["acked"] += fut.result()  # the only writer of this counter; one deletion at a time

    def _publish_row(self, row: StoredResult, base: int) -> bool:
        payload = codec.result_payload(
            device=self.device_id,
            epoch=self.outbox.epoch,
            base=base,
            result_id=row.result_id,
            seq=row.seq,
            input_id=row.input_id,
            pipeline=row.pipeline,
            model=row.model,
            model_version=row.model_version,
            created_at=row.created_at,
            sent_at=time.time(),
            body=row.body,
        )
        if self.auth.result_key is not None:
            payload = signing.sign(payload, self.auth.result_key)
        token = self.transport.publish(codec.results_topic(self.device_id, row.pipeline), codec.dumps(payload), qos=1)
        if token is None:
            return False
        self._mids[token] = row.seq
        self._outstanding[row.seq] = time.monotonic()
        return True

    def _fill(self) -> None:
        window = self.settings.window
        while len(self._outstanding) < window:
            room = min(self.settings.batch, window - len(self._outstanding))
            rows = self.outbox.unacked(after_seq=max(self._cursor, self._acked), limit=room)
            if not rows:
                return
            base = self.outbox.first_unacked_seq()
            for row in rows:
                if not self._publish_row(row, base):
                    return
                self._cursor = row.seq
                if row.seq <= self._sent_through:  # sent before: a reconnect or a new coordinator session re-sends
                    self.counters["republished"] += 1
                else:
                    self._sent_through = row.seq
                    self.counters["published"] += 1
                    if self.home_assistant is not None:
                        self.home_assistant.observe(row.pipeline, row.created_at, row.body)

    def _retry(self, now: float) -> None:
        due = [s for s, t in self._outstanding.items() if now - t >= self.settings.ack_timeout_s]
        if not due or self._tokens < 1:
            return
        due = sorted(due)[: int(self._tokens)]
        rows = self.outbox.unacked(after_seq=due[0] - 1, limit=due[-1] - due[0] + 1)
        wanted = set(due)
        base = self.outbox.first_unacked_seq()
        for seq in due:  # rows that vanished were acked or dropped meanwhile
            if not any(r.seq == seq for r in rows):
                self._outstanding.pop(seq, None)
        for row in rows:
            if row.seq in wanted:
                if not self._publish_row(row, base):
                    return
                self._tokens -= 1
                self.counters["republished"] += 1
        log.info("publisher: re-published %d unacknowledged results", len(wanted))

    def _send_states(self, now: float | None = None, *, force: bool = False) -> None:
        """The retained Home Assistant state of each pipeline that changed (at most once per its interval)."""
        assert self.home_assistant is not None
        for topic, state in self.home_assistant.states(time.monotonic() if now is None else now, force=force):
            self.transport.publish(topic, codec.dumps(state), qos=1, retain=True)

    def _timers(self, now: float) -> None:
        if self._connected and self.home_assistant is not None:
            self._send_states(now)
        if self._connected and now >= self._next_heartbeat:
            self._next_heartbeat = now + self.heartbeat_s
            self._send_heartbeat()
        if now >= self._next_prune:
            self._next_prune = now + self.settings.prune_s
            self.outbox.prune_async().add_done_callback(lambda fut: self._events.put(("pruned", fut)))

    def _send_heartbeat(self) -> None:
        try:
            health = self.health()
        except Exception as exc:
            health = {"error": str(exc)}
        payload = codec.heartbeat_payload(
            device=self.device_id,
            ts=time.time(),
            state=self.state,
            uptime_s=time.monotonic() - self._started_at,
            outbox=self.outbox.stats().to_dict(),
            publisher=self.snapshot(),
            health=health,
        )
        if self.transport.publish(codec.heartbeat_topic(self.device_id), codec.dumps(payload), qos=1) is not None:
            self.counters["heartbeats"] += 1

    def _send_event(self, event: str, severity: Literal["info", "warning", "alarm"], data: dict[str, Any]) -> None:
        payload = codec.event_payload(device=self.device_id, ts=time.time(), event=event, severity=severity, data=data)
        self.transport.publish(codec.events_topic(self.device_id), codec.dumps(payload), qos=1)

    def _run_command(self, name: str, message: InboundMessage) -> None:
        command_id: str | None = None
        try:
            command = self._accept_command(name, message)
            command_id = command.id
            result = self._execute(command)
        except EdgeAgentError as exc:
            self.counters["commands_refused"] += 1
            command_id = command_id or getattr(exc, "command_id", None)
            self._refuse(exc.code, f"command {name[:64]} ({command_id}): {exc.message}")
            self._send_event(
                "command_result",
                "warning",
                {"id": command_id, "name": name[:64], "ok": False, "code": exc.code, "message": exc.message[:500]},
            )
            return
        self.counters["commands_ok"] += 1
        self._send_event("command_result", "info", {"id": command_id, "name": name, "ok": True, "result": result})

    def _accept_command(self, name: str, message: InboundMessage) -> Command:
        """Parse, authenticate, check against the policy, then journal the id: only then may it run.

        The id is journalled last, so a forged or refused command can never burn the id of a real one."""
        command = parse_command(name, message.payload)
        if message.retain:
            raise CommandError("a retained command never runs (publish commands without the retain flag)",
                               "command_retained", command.id)
        if self.auth.command_keys:
            try:
                signing.verify(command.raw, self.auth.command_keys)
                signing.check_lifetime(command.raw, now=time.time(), skew_s=self.auth.max_clock_skew_s,
                                       max_ttl_s=self.auth.command_max_ttl_s)
            except AuthError as exc:
                raise CommandError(exc.message, f"command_{exc.reason}", command.id) from None
            if command.raw.get("device") != self.device_id or command.raw.get("name") != name:
                raise CommandError("a signed command must name this device and command", "command_wrong_target",
                                   command.id)
        elif command.raw.get("device", self.device_id) != self.device_id:
            raise CommandError("the command names another device", "command_wrong_target", command.id)
        check_policy(command, self.policy)
        if not self.outbox.record_command(command.id, command.name):
            raise CommandError(f"command id {command.id!r} already ran", "command_replayed", command.id)
        return command

    def _execute(self, command: Command) -> dict[str, Any]:
        if command.name == "ping":
            return {"pong": True}
        if command.name == "heartbeat":
            self._next_heartbeat = 0.0
            return {}
        if command.name == "republish":
            for seq in self._outstanding:
                self._outstanding[seq] = 0.0
            return {"outstanding": len(self._outstanding)}
        if command.name == "set_heartbeat_interval":
            self.heartbeat_s = float(command.args["seconds"])
            self._next_heartbeat = time.monotonic() + self.heartbeat_s
            return {"seconds": self.heartbeat_s}
        if self.command_handler is None:
            raise CommandError(f"command {command.name} is not supported here", "command_unsupported", command.id)
        return self.command_handler(command)

    def _shutdown(self) -> None:
        if self._connected:
            offline = codec.status_payload(device=self.device_id, state="offline", ts=time.time())
            self.transport.publish(codec.status_topic(self.device_id), codec.dumps(offline), qos=1, retain=True)
        self._stopped.set()
