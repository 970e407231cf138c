"""The publisher against the in-memory broker: e2e-ack deletes, windows, retries, availability, commands."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from prometheus_client import generate_latest

from edge_agent.coordinator.service import Coordinator
from edge_agent.coordinator.store import SqliteStore
from edge_agent.delivery.outbox import Outbox
from edge_agent.delivery.publisher import Publisher, PublisherSettings, availability_will
from edge_agent.metrics import Metrics
from edge_agent.protocol import codec, signing
from edge_agent.protocol.commands import Command, CommandPolicy
from edge_agent.protocol.signing import AgentAuth, CoordinatorAuth
from edge_agent.transport import FakeBroker, FakeTransport, InboundMessage
from edge_agent.updates.format import key_id
from tests.support.delivery import wait_until

QUICK = PublisherSettings(window=50, batch=20, ack_timeout_s=0.3, republish_per_s=1000, heartbeat_s=0.2)


class Recorder:
    """A listener that keeps every message it receives."""

    def __init__(self) -> None:
        self.messages: list[InboundMessage] = []
        self.lock = threading.Lock()

    def on_connected(self, session_present: bool) -> None: ...

    def on_disconnected(self, reason: str) -> None: ...

    def on_published(self, token: int, ok: bool, reason: str) -> None: ...

    def on_message(self, message: InboundMessage) -> None:
        with self.lock:
            self.messages.append(message)

    def payloads(self, suffix: str) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(m.payload) for m in self.messages if m.topic.endswith(suffix)]


def spy(broker: FakeBroker) -> Recorder:
    recorder = Recorder()
    transport = FakeTransport(broker)
    transport.start(recorder)
    transport.subscribe(["edge/v1/#"])
    return recorder


class Rig:
    def __init__(
        self, tmp: Path, settings: PublisherSettings = QUICK, handler: Any = None, *, auth: AgentAuth | None = None,
        policy: CommandPolicy | None = None,
    ) -> None:
        self.broker = FakeBroker()
        self.spy = spy(self.broker)
        self.outbox = Outbox(tmp / "outbox.db", "dev1")
        self.transport = FakeTransport(self.broker, availability_will("dev1"))
        health = {"models": [{"name": "leaf", "version": "1"}]}
        self.publisher = Publisher(
            self.outbox, self.transport, "dev1", lambda: health, settings, handler, auth=auth, policy=policy
        )
        self.coordinator: Coordinator | None = None
        self.tmp = tmp

    def add(self, n: int, start: int = 0) -> None:
        for i in range(start, start + n):
            self.outbox.accept_input(f"i{i}", source="t", pipeline="crop", spool_path=None, meta={})
            self.outbox.add_result(f"i{i}", pipeline="crop", model="leaf", model_version="1", body={"i": i})

    def start_coordinator(self, auth: CoordinatorAuth | None = None) -> Coordinator:
        self.coordinator = Coordinator(SqliteStore(self.tmp / "coord.db"), FakeTransport(self.broker), auth=auth)
        self.coordinator.start()
        return self.coordinator

    def command(self, name: str, payload: bytes) -> None:
        self.broker.route(codec.command_topic("dev1", name), payload, False)

    def ack(self, payload: dict[str, Any] | bytes) -> None:
        data = payload if isinstance(payload, bytes) else codec.dumps(payload)
        self.broker.route(codec.ack_topic("dev1"), data, False)

    def refused(self, code: str) -> int:
        return self.publisher.refusals.counts.get(code, 0)

    def close(self) -> None:
        self.publisher.stop(2)
        if self.coordinator is not None:
            self.coordinator.stop(2)
        self.outbox.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def test_delivers_everything_and_deletes_on_the_coordinators_ack(rig: Rig) -> None:
    rig.start_coordinator()
    rig.publisher.start()
    rig.add(300)
    wait_until(lambda: rig.outbox.stats().backlog == 0, 10, "outbox drained")
    assert rig.coordinator is not None and rig.coordinator.store.count_results() == 300
    assert rig.publisher.state == "connected"
    payload = rig.spy.payloads("/results/crop")[0]
    jsonschema.validate(payload, schema("result"))
    assert payload["device"] == "dev1" and payload["seq"] == 1 and payload["body"] == {"i": 0}


def schema(kind: str) -> dict[str, Any]:
    path = resources.files("edge_agent.protocol").joinpath("schemas").joinpath(f"{kind}.json")
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def test_broker_ack_alone_deletes_nothing_and_the_window_stays_bounded(rig: Rig) -> None:
    rig.publisher.start()
    rig.add(200)
    wait_until(lambda: rig.publisher.counters["broker_acked"] >= 50, 5, "first window broker-acked")
    assert rig.outbox.stats().backlog == 200
    assert rig.publisher.snapshot()["in_flight"] <= 50
    assert rig.publisher.counters["published"] == 50
    # the coordinator comes late: what stayed unacknowledged is published again and then deleted
    rig.start_coordinator()
    wait_until(lambda: rig.outbox.stats().backlog == 0, 10, "drain after late coordinator")
    assert rig.publisher.counters["republished"] >= 50


def test_publishing_goes_on_while_the_outbox_cannot_commit_the_deletion_of_acked_rows(tmp_path: Path) -> None:
    """Deleting acknowledged rows waits for the outbox writer's fsync; publishing must not wait with it."""
    r = Rig(tmp_path, PublisherSettings(window=2, batch=2, ack_timeout_s=30, heartbeat_s=60))
    stall = sqlite3.connect(r.outbox.path, isolation_level=None)
    try:
        r.add(6)
        stall.execute("BEGIN IMMEDIATE")  # another writer holds the lock: the outbox writer cannot commit
        coordinator = r.start_coordinator()
        r.publisher.start()
        # window 2: rows 3-6 only go out after acks whose deletions cannot commit yet
        wait_until(lambda: coordinator.store.count_results() == 6, 10, "all rows delivered while the writer stalls")
        assert r.outbox.stats().backlog == 6  # nothing deleted yet: still safe to re-send after a crash
        assert r.publisher.counters["acked"] == 0
        stall.execute("ROLLBACK")
        wait_until(lambda: r.outbox.stats().backlog == 0, 10, "acked rows deleted once the writer can commit")
        wait_until(lambda: r.publisher.counters["acked"] == 6, 5, "deletions counted")
        assert r.publisher.counters["errors"] == 0
    finally:
        if stall.in_transaction:
            stall.execute("ROLLBACK")
        stall.close()
        r.close()


def test_republish_rate_is_bounded(tmp_path: Path) -> None:
    r = Rig(tmp_path, PublisherSettings(window=100, batch=100, ack_timeout_s=0.2, republish_per_s=20, heartbeat_s=60))
    try:
        r.publisher.start()
        r.add(100)
        wait_until(lambda: r.publisher.counters["republished"] > 0, 5, "first re-publish")
        t0, n0 = time.monotonic(), r.publisher.counters["republished"]
        wait_until(lambda: time.monotonic() - t0 > 1.0, 2, "one second")
        n1, elapsed = r.publisher.counters["republished"], time.monotonic() - t0
        # 100 rows are due every 0.2 s (500/s unbounded); the bucket allows 20/s plus a burst of 20
        assert 0 < n1 - n0 <= 20 * elapsed + 20
    finally:
        r.close()


def test_starts_while_the_broker_is_down_reports_degraded_and_catches_up(rig: Rig) -> None:
    rig.broker.go_down()
    t0 = time.monotonic()
    rig.publisher.start()
    assert time.monotonic() - t0 < 0.5
    rig.add(20)
    assert rig.publisher.state == "degraded"
    rig.start_coordinator()
    rig.broker.come_up()
    wait_until(lambda: rig.outbox.stats().backlog == 0, 10, "drain after broker came up")
    assert str(rig.publisher.state) == "connected"


def test_refused_publishes_are_counted_kept_and_delivered_once_allowed(rig: Rig) -> None:
    rig.broker.denied = ["edge/v1/+/results/#"]
    rig.start_coordinator()
    rig.publisher.start()
    rig.add(30)
    wait_until(lambda: rig.publisher.counters["rejected"] >= 30, 5, "rejections")
    assert rig.publisher.state == "degraded"
    assert rig.outbox.stats().backlog == 30
    assert [e["event"] for e in rig.spy.payloads("/events")].count("publish_rejected") == 1
    rig.broker.denied = []
    wait_until(lambda: rig.outbox.stats().backlog == 0, 10, "drain once allowed")


def test_availability_is_retained_online_then_offline_and_the_will_fires(rig: Rig) -> None:
    rig.publisher.start()
    wait_until(lambda: codec.status_topic("dev1") in rig.broker.retained, 2, "status retained")
    assert json.loads(rig.broker.retained[codec.status_topic("dev1")])["state"] == "online"
    rig.transport.kill()
    assert json.loads(rig.broker.retained[codec.status_topic("dev1")])["state"] == "offline"


def test_clean_stop_publishes_offline(rig: Rig) -> None:
    rig.publisher.start()
    wait_until(lambda: codec.status_topic("dev1") in rig.broker.retained, 2, "status retained")
    rig.publisher.stop(2)
    status = json.loads(rig.broker.retained[codec.status_topic("dev1")])
    jsonschema.validate(status, schema("status"))
    assert status["state"] == "offline" and rig.publisher.state == "stopped"


def test_heartbeat_carries_health_backlog_and_counters(rig: Rig) -> None:
    rig.add(3)
    rig.publisher.start()
    wait_until(lambda: len(rig.spy.payloads("/heartbeat")) >= 2, 5, "two heartbeats")
    beat = rig.spy.payloads("/heartbeat")[-1]
    jsonschema.validate(beat, schema("heartbeat"))
    assert beat["health"]["models"] == [{"name": "leaf", "version": "1"}]
    assert "backlog" in beat["outbox"] and "published" in beat["publisher"]


def keys(n: int = 1) -> tuple[list[Ed25519PrivateKey], dict[str, Ed25519PublicKey]]:
    private = [Ed25519PrivateKey.generate() for _ in range(n)]
    return private, {key_id(k.public_key()): k.public_key() for k in private}


def test_doubtful_acks_are_refused_by_code_and_delete_nothing(rig: Rig) -> None:
    """No keys (the loopback demo): retained acks, acks for another device or epoch, for a seq never assigned
    or beyond what the broker confirmed, and garbage are refused or clamped; only a confirmed ack deletes."""
    ours = rig.outbox.epoch
    rig.add(5)
    rig.broker.retained[codec.ack_topic("dev1")] = codec.dumps(codec.ack_payload(device="dev1", epoch=ours, seq=5,
                                                                                  ts=1.0))
    rig.broker.denied = ["edge/v1/+/results/#"]  # the broker confirms nothing yet
    rig.publisher.start()
    wait_until(lambda: rig.publisher.counters["rejected"] >= 5, 5, "publishes refused by the broker")
    for device, epoch, seq in (("dev1", "other-epoch", 5), ("dev2", ours, 5), ("dev1", ours, 99), ("dev1", ours, 5)):
        rig.ack(codec.ack_payload(device=device, epoch=epoch, seq=seq, ts=1.0))
    rig.ack(b"garbage")
    wait_until(lambda: rig.publisher.counters["acks_clamped"] == 1, 5, "the unconfirmed ack clamped")
    assert {c: rig.refused(c) for c in ("ack_retained", "ack_other_epoch", "ack_wrong_device", "ack_beyond_sent",
                                       "ack_malformed")} == dict.fromkeys(("ack_retained", "ack_other_epoch",
                                       "ack_wrong_device", "ack_beyond_sent", "ack_malformed"), 1)
    assert rig.publisher.counters["acks_refused"] == 5
    rig.broker.denied = []
    wait_until(lambda: rig.publisher.counters["broker_acked"] >= 5, 5, "confirmed by the broker")
    rig.add(1, start=5)
    wait_until(lambda: rig.publisher.counters["broker_acked"] >= 6, 5, "still alive")
    assert rig.outbox.stats().backlog == 6  # nothing deleted by any of them
    rig.ack(codec.ack_payload(device="dev1", epoch=ours, seq=4, ts=1.0))
    wait_until(lambda: rig.outbox.stats().backlog == 2, 5, "a confirmed ack deletes through its seq")
    beat = rig.publisher.snapshot()
    assert beat["refusals"]["ack_retained"] == 1 and beat["acks_refused"] == 5
    metrics = Metrics()
    metrics.bind_publisher(rig.publisher.snapshot)
    text = generate_latest(metrics.registry).decode()
    assert 'edge_agent_control_refused_total{code="ack_retained"} 1.0' in text
    assert 'edge_agent_control_refused_total{code="ack_beyond_sent"} 1.0' in text


def test_signed_acks_flow_and_forged_ones_are_refused(tmp_path: Path) -> None:
    (coordinator_key, stranger), trusted = keys(2)
    trusted.pop(key_id(stranger.public_key()))
    r = Rig(tmp_path, auth=AgentAuth(ack_keys=trusted))
    try:
        r.publisher.start()
        r.add(5)
        wait_until(lambda: r.publisher.counters["broker_acked"] >= 5, 5, "published")
        epoch, now = r.outbox.epoch, time.time()

        def ack(seq: int, device: str = "dev1", ts: float = now, exp: float = now + 60) -> dict[str, Any]:
            return codec.ack_payload(device=device, epoch=epoch, seq=seq, ts=ts, exp=exp)

        tampered = signing.sign(ack(1), coordinator_key)
        tampered["seq"] = 5
        for payload in (
            ack(5),  # unsigned
            signing.sign(ack(5), stranger),
            tampered,
            signing.sign(ack(5, ts=now - 4000, exp=now - 3600), coordinator_key),  # captured an hour ago
            signing.sign(ack(5, ts=now + 3600, exp=now + 3660), coordinator_key),  # from the future
            signing.sign(ack(5, device="dev2"), coordinator_key),  # another device's, replayed on our topic
        ):
            r.ack(payload)
        codes = ("ack_unsigned", "ack_untrusted_key", "ack_bad_signature", "ack_expired", "ack_from_future",
                 "ack_wrong_device")
        wait_until(lambda: r.publisher.counters["acks_refused"] == 6, 5, "six refusals")
        assert {c: r.refused(c) for c in codes} == dict.fromkeys(codes, 1)
        assert r.outbox.stats().backlog == 5
        # the coordinator's own signed acks are taken: everything is delivered and deleted
        forged = len(r.spy.payloads("/ack"))
        r.start_coordinator(CoordinatorAuth(ack_key=coordinator_key, ack_ttl_s=60))
        wait_until(lambda: r.outbox.stats().backlog == 0, 10, "drained by signed acks")
        acks = r.spy.payloads("/ack")[forged:]
        assert acks and all(a["sig"]["key_id"] == key_id(coordinator_key.public_key()) for a in acks)
        jsonschema.validate(acks[-1], schema("ack"))
        assert r.publisher.counters["acks_refused"] == 6
        assert not r.broker.retained_for(codec.ack_topic("dev1"))  # acks are never retained
    finally:
        r.close()


def test_signed_results_are_stored_and_forged_ones_dropped(tmp_path: Path) -> None:
    (device_key, other), _ = keys(2)
    r = Rig(tmp_path, auth=AgentAuth(result_key=device_key))
    try:
        coordinator = r.start_coordinator(
            CoordinatorAuth(device_keys={"dev1": {key_id(device_key.public_key()): device_key.public_key()}})
        )
        r.publisher.start()
        r.add(3)
        wait_until(lambda: r.outbox.stats().backlog == 0, 10, "signed results stored and acked")
        genuine = r.spy.payloads("/results/crop")[0]
        jsonschema.validate(genuine, schema("result"))
        forged = [
            {**genuine, "result_id": "f" * 32, "seq": 9},  # altered after signing
            {k: v for k, v in {**genuine, "result_id": "e" * 32}.items() if k != "sig"},  # unsigned
            signing.sign({**genuine, "result_id": "d" * 32}, other),  # signed by another key
        ]
        for payload in forged:
            r.broker.route(codec.results_topic("dev1", "crop"), codec.dumps(payload), False)
        wait_until(lambda: coordinator.counters["forged"] == 3, 5, "forged results dropped")
        assert coordinator.store.count_results() == 3
        strict = CoordinatorAuth(require_device_keys=True)
        with pytest.raises(signing.AuthError):  # a device without a key, when every device must have one
            strict.check_result("dev1", genuine)
    finally:
        r.close()


def test_commands_good_bad_and_replayed(tmp_path: Path) -> None:
    calls: list[Command] = []

    def handler(cmd: Command) -> dict[str, Any]:
        calls.append(cmd)
        return {"applied": cmd.args}

    r = Rig(tmp_path, handler=handler)
    try:
        r.publisher.start()
        wait_until(lambda: r.transport.filters != [], 2, "subscribed")
        r.command("ping", b'{"id": "c1"}')
        r.command("ping", b"\xff\xfe not json")
        r.command("self_destruct", b'{"id": "c2"}')
        r.command("set_thresholds", b'{"id": "c3", "args": {"pipeline": "crop", "score": 0.7}}')
        r.command("set_thresholds", b'{"id": "c3", "args": {"pipeline": "crop", "score": 0.7}}')
        r.command("set_thresholds", b'{"id": "c4", "args": {"pipeline": "crop", "score": NaN}}')
        r.command("ping", b"x" * (10 * 1024 * 1024))
        r.command("set_heartbeat_interval", b'{"id": "c5", "args": {"seconds": 120}}')
        wait_until(lambda: len(r.spy.payloads("/events")) >= 8, 5, "eight command results")
        results = [e["data"] for e in r.spy.payloads("/events") if e["event"] == "command_result"]
        for event in r.spy.payloads("/events"):
            jsonschema.validate(event, schema("event"))
        outcome = [(d["id"], d["ok"], d.get("code")) for d in results]
        assert outcome == [
            ("c1", True, None),
            (None, False, "command_not_json"),
            ("c2", False, "command_unknown"),
            ("c3", True, None),
            ("c3", False, "command_replayed"),
            (None, False, "command_not_json"),
            (None, False, "command_too_large"),
            ("c5", True, None),
        ]
        assert [c.args for c in calls] == [{"pipeline": "crop", "score": 0.7}]
        assert r.publisher.heartbeat_s == 120
        assert r.publisher.state == "connected"
    finally:
        r.close()


def test_commands_need_a_trusted_signature_and_stay_within_the_policy(tmp_path: Path) -> None:
    """With operator keys: unsigned, forged, expired, retained, misdirected, disallowed and out-of-bounds commands
    are refused with their code and change nothing; a refused command never burns the id of a real one."""
    (operator, stranger), trusted = keys(2)
    trusted.pop(key_id(stranger.public_key()))
    calls: list[Command] = []

    def handler(cmd: Command) -> dict[str, Any]:
        calls.append(cmd)
        return {"applied": cmd.args}

    policy = CommandPolicy(
        allow=frozenset({"ping", "set_thresholds", "set_heartbeat_interval"}),
        bounds={"set_thresholds": {"score": (0.05, 0.95)}, "set_heartbeat_interval": {"seconds": (5, 3600)}},
    )
    r = Rig(tmp_path, handler=handler, auth=AgentAuth(command_keys=trusted), policy=policy)
    now = time.time()

    def cmd(name: str, cid: str, args: dict[str, Any] | None = None, *, key: Ed25519PrivateKey | None = operator,
            device: str = "dev1", ts: float = now, exp: float = now + 60) -> bytes:
        payload = {"v": 1, "id": cid, "device": device, "name": name, "args": args or {}, "ts": ts, "exp": exp}
        return codec.dumps(signing.sign(payload, key) if key is not None else payload)

    try:
        r.broker.retained[codec.command_topic("dev1", "ping")] = cmd("ping", "ok1")  # sits on the broker
        r.publisher.start()
        wait_until(lambda: r.transport.filters != [], 2, "subscribed")
        silence = {"pipeline": "crop", "score": 1.0}
        r.command("set_thresholds", cmd("set_thresholds", "f1", silence, key=None))  # the finding: unsigned
        r.command("set_thresholds", cmd("set_thresholds", "f2", {"pipeline": "crop", "score": 0.5}, key=stranger))
        r.command("set_thresholds", cmd("set_thresholds", "f3", silence))  # signed, but out of bounds
        r.command("set_heartbeat_interval", cmd("set_heartbeat_interval", "f4", {"seconds": 86400}))
        r.command("ping", cmd("ping", "f5", ts=now - 7200, exp=now - 3600))
        r.command("ping", cmd("ping", "f6", device="dev2"))
        r.command("heartbeat", cmd("heartbeat", "f7"))  # not in the allow-list
        r.command("ping", cmd("set_thresholds", "f8", silence))  # signed for another command name
        r.command("ping", cmd("ping", "ok1"))  # the same id, sent properly: runs (the refusal burnt nothing)
        r.command("set_thresholds", cmd("set_thresholds", "ok2", {"pipeline": "crop", "score": 0.6}))
        r.command("set_thresholds", cmd("set_thresholds", "ok2", {"pipeline": "crop", "score": 0.6}))  # replayed
        wait_until(lambda: len(r.spy.payloads("/events")) >= 12, 5, "twelve command results")
        outcome = [(e["data"]["id"], e["data"].get("code")) for e in r.spy.payloads("/events")]
        assert outcome == [
            ("ok1", "command_retained"),
            ("f1", "command_unsigned"),
            ("f2", "command_untrusted_key"),
            ("f3", "command_out_of_bounds"),
            ("f4", "command_out_of_bounds"),
            ("f5", "command_expired"),
            ("f6", "command_wrong_target"),
            ("f7", "command_not_allowed"),
            ("f8", "command_wrong_target"),
            ("ok1", None),
            ("ok2", None),
            ("ok2", "command_replayed"),
        ]
        assert [c.args for c in calls] == [{"pipeline": "crop", "score": 0.6}]
        assert r.publisher.heartbeat_s == QUICK.heartbeat_s
        assert r.publisher.counters["commands_refused"] == 10 and r.refused("command_out_of_bounds") == 2
    finally:
        r.close()


def coordinator_online(session: str) -> bytes:
    return codec.dumps(codec.coordinator_status_payload(state="online", coordinator="c", session=session, ts=1.0))


def test_a_new_coordinator_session_heard_live_resends_the_unacknowledged_tail_at_once(tmp_path: Path) -> None:
    """Issue 13, finding 7: no waiting for the 30 s re-publish timer when the coordinator lost what we sent."""
    settings = PublisherSettings(window=50, batch=50, ack_timeout_s=30, heartbeat_s=60, resend_min_interval_s=0.5)
    r = Rig(tmp_path, settings)
    topic = codec.coordinator_status_topic()
    r.broker.retained[topic] = coordinator_online("s1")  # there before we subscribe: our connect re-sends anyway

    def barrier(n: int) -> None:  # a command is handled after whatever was routed before it
        r.command("ping", codec.dumps({"id": f"b{n}"}))
        wait_until(lambda: r.publisher.counters["commands_ok"] >= n, 5, f"barrier {n}")

    try:
        r.publisher.start()
        r.add(30)
        wait_until(lambda: r.publisher.counters["published"] == 30, 5, "30 in flight, no coordinator")
        barrier(1)
        assert r.publisher.snapshot()["coordinator_session"] == "s1"
        assert r.publisher.counters["published"] == 30 and r.publisher.counters["coordinator_sessions"] == 0

        r.broker.route(topic, coordinator_online("s2"), False)  # live: the coordinator restarted
        wait_until(lambda: r.publisher.counters["republished"] == 30, 2, "the tail re-sent at once")
        r.broker.route(topic, coordinator_online("s2"), False)  # the same session again: nothing
        r.broker.route(topic, b"{not json", False)  # garbage: ignored
        r.broker.route(topic, codec.dumps(codec.coordinator_status_payload(
            state="offline", coordinator="c", session=None, ts=2.0)), False)  # offline: nothing to do
        barrier(2)
        assert r.publisher.counters["republished"] == 30 and r.publisher.counters["errors"] == 0

        r.broker.route(topic, coordinator_online("s3"), False)
        wait_until(lambda: r.publisher.counters["republished"] == 60, 2, "second re-send")
        t0 = time.monotonic()
        r.broker.route(topic, coordinator_online("s4"), False)  # at most one re-send per resend_min_interval_s
        wait_until(lambda: r.publisher.counters["republished"] == 90, 3, "third re-send, spaced")
        assert time.monotonic() - t0 >= 0.4
        assert r.publisher.counters["coordinator_sessions"] == 3 and r.publisher.counters["published"] == 30
        assert r.outbox.stats().backlog == 30  # re-sending deletes nothing
    finally:
        r.close()


def test_with_ack_keys_only_a_signed_coordinator_status_triggers_the_resend(tmp_path: Path) -> None:
    (coordinator_key, stranger), trusted = keys(2)
    trusted.pop(key_id(stranger.public_key()))
    settings = PublisherSettings(window=50, batch=50, ack_timeout_s=30, heartbeat_s=60, resend_min_interval_s=0.1)
    r = Rig(tmp_path, settings, auth=AgentAuth(ack_keys=trusted))
    topic = codec.coordinator_status_topic()

    def online(session: str, key: Ed25519PrivateKey | None) -> bytes:
        payload = codec.coordinator_status_payload(state="online", coordinator="c", session=session, ts=1.0)
        return codec.dumps(signing.sign(payload, key) if key is not None else payload)

    try:
        r.publisher.start()
        r.add(10)
        wait_until(lambda: r.publisher.counters["published"] == 10, 5, "10 in flight")
        r.broker.route(topic, online("s1", None), False)
        r.broker.route(topic, online("s2", stranger), False)
        wait_until(lambda: r.refused("coordinator_status_untrusted_key") == 1, 2, "the stranger's status refused")
        assert r.refused("coordinator_status_unsigned") == 1
        assert r.publisher.counters["published"] == 10 and r.publisher.snapshot()["coordinator_session"] is None
        r.broker.route(topic, online("s3", coordinator_key), False)
        wait_until(lambda: r.publisher.counters["republished"] == 10, 2, "re-sent on the signed status")
        valid_payload = json.loads(online("s4", coordinator_key))
        jsonschema.validate(valid_payload, schema("coordinator"))
    finally:
        r.close()


def test_the_coordinator_announces_signed_sessions_and_its_will(tmp_path: Path) -> None:
    (key,), trusted = keys(1)
    broker = FakeBroker()
    recorder = spy(broker)
    from edge_agent.coordinator.service import coordinator_will

    will = coordinator_will("c1", key)
    transport = FakeTransport(broker, will)
    coordinator = Coordinator(SqliteStore(tmp_path / "c.db"), transport, client_id="c1",
                              auth=CoordinatorAuth(ack_key=key))
    coordinator.start()
    try:
        wait_until(lambda: len(recorder.payloads("coordinator/status")) == 1, 2, "online announced")
        online = recorder.payloads("coordinator/status")[0]
        assert (online["state"], online["coordinator"], online["session"]) == ("online", "c1", coordinator.session)
        signing.verify(online, trusted)
        jsonschema.validate(online, schema("coordinator"))
        first = coordinator.session
        transport.mark_disconnected("gone")  # the broker lost our session: a new one on the next connect
        transport.mark_connected()
        wait_until(lambda: len(recorder.payloads("coordinator/status")) == 2, 2, "online again")
        assert recorder.payloads("coordinator/status")[1]["session"] == coordinator.session != first
        offline = json.loads(will.payload)
        signing.verify(offline, trusted)
        assert offline["state"] == "offline" and "session" not in offline
    finally:
        coordinator.stop(2)


def test_a_crashed_agent_shows_offline_at_the_coordinator(tmp_path: Path) -> None:
    """The will is set once at connect, before the ``online`` status: both carry the connection's timestamp, so the
    coordinator (which keeps the newest state by ``ts``) takes the will's ``offline`` when the agent dies; a clean
    stop's ``offline`` is newer still, and so is the next connection's ``online``."""
    session_ts = time.time()
    broker = FakeBroker()
    outbox = Outbox(tmp_path / "outbox.db", "dev1")
    transport = FakeTransport(broker, availability_will("dev1", session_ts))
    publisher = Publisher(outbox, transport, "dev1", lambda: {}, QUICK, session_ts=session_ts)
    coordinator = Coordinator(SqliteStore(tmp_path / "coord.db"), FakeTransport(broker))
    coordinator.start()

    def state() -> str | None:
        devices = {d["device"]: d for d in coordinator.store.devices()}
        return devices.get("dev1", {}).get("state")

    try:
        publisher.start()
        wait_until(lambda: state() == "online", 5, "online stored")
        transport.kill()  # the broker publishes the will
        wait_until(lambda: state() == "offline", 5, "the will's offline stored")
        transport.mark_connected()  # reconnected: online again, same session timestamp
        wait_until(lambda: state() == "online", 5, "online again after the reconnect")
    finally:
        publisher.stop(2)
        coordinator.stop(2)
        outbox.close()
    assert state() == "offline"
