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

from edge_agent.coordinator.service import Coordinator
from edge_agent.coordinator.store import SqliteStore
from edge_agent.delivery.outbox import Outbox
from edge_agent.delivery.publisher import Publisher, PublisherSettings, availability_will
from edge_agent.protocol import codec
from edge_agent.protocol.commands import Command
from edge_agent.transport import FakeBroker, FakeTransport, InboundMessage
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
    def __init__(self, tmp: Path, settings: PublisherSettings = QUICK, handler: Any = None) -> None:
        self.broker = FakeBroker()
        self.spy = spy(self.broker)
        self.outbox = Outbox(tmp / "outbox.db", "dev1")
        self.transport = FakeTransport(self.broker, availability_will("dev1"))
        health = {"models": [{"name": "leaf", "version": "1"}]}
        self.publisher = Publisher(self.outbox, self.transport, "dev1", lambda: health, settings, handler)
        self.coordinator: Coordinator | None = None
        self.tmp = tmp

    def add(self, n: int, start: int = 0) -> None:
        for i in range(start, start + n):
            self.outbox.accept_input(f"i{i}", source="t", pipeline="crop", spool_path=None, meta={})
            self.outbox.add_result(f"i{i}", pipeline="crop", model="leaf", model_version="1", body={"i": i})

    def start_coordinator(self) -> Coordinator:
        self.coordinator = Coordinator(SqliteStore(self.tmp / "coord.db"), FakeTransport(self.broker))
        self.coordinator.start()
        return self.coordinator

    def command(self, name: str, payload: bytes) -> None:
        self.broker.route(codec.command_topic("dev1", name), payload, False)

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


def test_acks_for_another_epoch_device_or_unassigned_seq_are_ignored(rig: Rig) -> None:
    rig.publisher.start()
    rig.add(5)
    wait_until(lambda: rig.publisher.counters["broker_acked"] >= 5, 5, "published")
    ours = rig.outbox.epoch
    for device, epoch, seq in (("dev1", "other-epoch", 5), ("dev2", ours, 5), ("dev1", ours, 99)):
        ack = codec.ack_payload(device=device, epoch=epoch, seq=seq, ts=1.0)
        rig.broker.route(codec.ack_topic("dev1"), codec.dumps(ack), True)
    rig.broker.route(codec.ack_topic("dev1"), b"garbage", False)
    rig.add(1, start=5)
    wait_until(lambda: rig.publisher.counters["published"] >= 6, 5, "still alive")
    assert rig.outbox.stats().backlog == 6
    assert rig.publisher.counters["acks_ignored"] == 1  # seq 99 was never assigned: a forked outbox


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
