"""Issue 13, finding 1: no message can jam the coordinator (real Mosquitto, real coordinator process).

A device that obeys the ACL (it publishes only under its own prefix) sends results with seq/base >= 2^63
and heartbeats nested deeper than orjson can encode. Before the fix one such message raised out of the
store's transaction, the batch was never acknowledged to the broker, the in-flight window filled and no
other device's results were stored, across coordinator restarts too. Now each one is quarantined in the
dead-letter table, acknowledged, and the other device's results are stored and acknowledged on time.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.delivery.publisher import PublisherSettings
from edge_agent.protocol import codec
from edge_agent.transport.base import InboundMessage, MqttSettings
from edge_agent.transport.mqtt import PahoTransport
from tests.support.broker import Broker
from tests.support.coordinator_proc import CoordinatorProcess
from tests.support.delivery import Agent, start_agent, wait_until
from tests.support.wait import wait_for

# the agent re-publishes only after 30 s (the shipped default): on-time delivery cannot come from retries
SLOW_RETRY = PublisherSettings(window=200, batch=100, ack_timeout_s=30.0, republish_per_s=2000, heartbeat_s=1.0)


class RawDevice:
    """A device client that publishes whatever bytes it is given (QoS 1) on its own prefix."""

    def __init__(self, port: int, device: str) -> None:
        self.device = device
        self.ready = threading.Event()
        self.pubacks = 0
        self.transport = PahoTransport(MqttSettings(port=port, client_id=device, max_inflight=1000))
        self.transport.start(self)

    def on_connected(self, session_present: bool) -> None:
        self.ready.set()

    def on_disconnected(self, reason: str) -> None:
        self.ready.clear()

    def on_message(self, message: InboundMessage) -> None: ...

    def on_published(self, token: int, ok: bool, reason: str) -> None:
        self.pubacks += 1

    def publish(self, topic: str, payload: bytes) -> None:
        assert self.ready.wait(10), "hostile device not connected"
        assert self.transport.publish(topic, payload, qos=1) is not None

    def stop(self) -> None:
        self.transport.stop()


def poison(device: str, count: int, start: int = 0) -> list[tuple[str, bytes]]:
    """What the issue sent: results with seq or base >= 2^63, heartbeats nested 300 deep."""
    out: list[tuple[str, bytes]] = []
    for i in range(start, start + count):
        big = 2**63 + i
        seq, base = (big, 1) if i % 2 else (i + 1, big)
        payload = codec.result_payload(
            device=device, epoch="e-evil", base=base, result_id=f"{i:032x}", seq=seq, input_id=f"x{i}",
            pipeline="p", model="m", model_version="1", created_at=1.0, sent_at=1.0, body={},
        )
        out.append((codec.results_topic(device, "p"), codec.dumps(payload)))
        if i % 10 == 0:
            nested = "[" * 300 + "]" * 300
            heartbeat = (
                f'{{"v":1,"kind":"heartbeat","device":"{device}","ts":1.0,"state":"connected","uptime_s":1,'
                f'"outbox":{{"backlog":0,"bytes":0,"oldest_age_s":0,"dropped":0}},"publisher":{{}},'
                f'"health":{{"deep":{nested}}}}}'
            )
            out.append((codec.heartbeat_topic(device), heartbeat.encode()))
    return out


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    # the shipped broker config's in-flight window (deploy/mosquitto/mosquitto.conf)
    b = Broker(tmp_path / "broker", max_inflight_messages=100)
    b.start()
    yield b
    b.close()


def stored_and_acked(coordinator: CoordinatorProcess, agent: Agent, expected: int) -> bool:
    return coordinator.count(agent.device) >= expected and agent.outbox.stats().backlog == 0


def test_poison_from_one_device_never_stops_another_devices_results(tmp_path: Path, broker: Broker) -> None:
    coordinator = CoordinatorProcess(tmp_path / "coord", broker.port)
    coordinator.start(wait_connected=True)
    evil = RawDevice(broker.port, "evil")
    good = start_agent(tmp_path / "good", broker.port, "good", settings=SLOW_RETRY)
    try:
        sent = poison("evil", 110)
        for topic, payload in sent:
            evil.publish(topic, payload)
        wait_until(lambda: evil.pubacks >= len(sent), 10, "the broker took every poison message")
        t0 = time.monotonic()
        good.feed([f"a{i}" for i in range(20)])
        first = wait_until(lambda: stored_and_acked(coordinator, good, 20), 10, "20 good results stored and acked")

        # across a restart: poison queued in the coordinator's persistent session while it is down
        coordinator.kill()
        more = poison("evil", 110, start=110)
        for topic, payload in more:
            evil.publish(topic, payload)
        good.feed([f"b{i}" for i in range(20)])
        wait_until(lambda: evil.pubacks >= len(sent) + len(more), 10, "the broker queued the second round")
        coordinator.start()
        second = wait_until(lambda: stored_and_acked(coordinator, good, 40), 10, "40 good results after a restart")

        assert coordinator.count("good") == 40  # each exactly once
        assert coordinator.count("evil") == 0
        dead = coordinator.query("SELECT topic, reason, length(payload), payload_bytes FROM dead_letters")
        assert len(dead) >= len(sent) + len(more)  # quarantined (at least once each), not lost
        reasons = {reason for _, reason, _, _ in dead}
        assert reasons == {"int_out_of_range", "too_deep"}, reasons
        assert all(stored <= size for _, _, stored, size in dead)
        stats = coordinator.stats()
        assert stats is not None and stats["counters"]["dead_letters"] >= len(more)
        assert "edge_coordinator_dead_letters_total" in coordinator.metrics()
        print(f"\npoison: 20 good results stored and acked {first:.2f} s after the feed (t0 {t0:.0f}) despite "
              f"{len(sent)} poison messages; after a restart with {len(more)} more queued: {second:.2f} s; "
              f"{len(dead)} dead letters ({sorted(reasons)})")
    finally:
        good.stop()
        evil.stop()
        coordinator.close()


# ---------------------------------------------------------------- fuzz: hostile messages of every kind
HOSTILE_INTS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1]),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), HOSTILE_INTS, st.floats(), st.text(max_size=300),
    st.sampled_from(["", "\x00", "a\x00b", "\ud800", "evil", "good", "coordinator", "x" * 70, "p", "e1"]),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
LEVEL = st.one_of(
    st.sampled_from(["p", "other", "a b", "x" * 65, "coordinator", "é"]),
    # what Mosquitto lets through in a topic name (it disconnects a client sending control characters)
    st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn"), blacklist_characters="/+#"), min_size=1,
            max_size=40),
)


def templates(device: str, seq: int) -> dict[str, dict[str, object]]:
    result = codec.result_payload(
        device=device, epoch="e-evil", base=1, result_id=f"{seq:032x}", seq=seq, input_id=f"x{seq}",
        pipeline="p", model="m", model_version="1", created_at=1.0, sent_at=1.0, body={"predictions": []},
    )
    heartbeat = codec.heartbeat_payload(
        device=device, ts=1.0, state="connected", uptime_s=1.0,
        outbox={"backlog": 0, "bytes": 0, "oldest_age_s": 0.0, "dropped": 0}, publisher={}, health={},
    )
    return {
        "results": result,
        "heartbeat": heartbeat,
        "status": codec.status_payload(device=device, state="online", ts=1.0),
        "events": codec.event_payload(device=device, ts=1.0, event="x", severity="info", data={}),
    }


@st.composite
def hostile_message(draw: st.DrawFn, device: str = "evil") -> tuple[str, bytes]:
    """One message on the device's own prefix (what its ACL allows): a valid one bent out of shape, or junk."""
    kind = draw(st.sampled_from(["results", "heartbeat", "status", "events"]))
    how = draw(st.sampled_from(["mutate", "mutate", "ranges", "ranges", "bytes", "deep", "big_int_text", "huge"]))
    topic = f"edge/v1/{device}/{kind}"
    if kind == "results":
        topic += "/" + ("p" if how == "ranges" else draw(LEVEL))
    if how == "bytes":
        return topic, draw(st.binary(max_size=300))
    if how == "huge":
        return topic, b'{"v":1,"pad":"' + b"x" * (1 << 20) + b'"}'
    payload = dict(templates(device, draw(st.integers(1, 10**6)))[kind])
    if how == "ranges":  # well-formed but for numbers and names at and past their limits
        for key in ("seq", "base", "ts", "created_at") if kind == "results" else ("ts", "uptime_s"):
            if key in payload and draw(st.booleans()):
                payload[key] = draw(st.one_of(HOSTILE_INTS, st.floats()))
        if draw(st.booleans()):
            payload["device"] = draw(st.sampled_from(["good", "coordinator", "evil ", "x" * 65, ""]))
        return topic, json.dumps(payload).encode()
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from([*payload, "extra"]))
        action = draw(st.sampled_from(["set", "set", "delete"]))
        if action == "delete":
            payload.pop(key, None)
        else:
            payload[key] = draw(st.one_of(JSON_VALUES, HOSTILE_INTS))
    if how == "deep":
        depth = draw(st.integers(60, 1100))
        payload[draw(st.sampled_from(["body", "health", "data", "outbox", "x"]))] = "@DEEP@"
        text = json.dumps(payload).replace('"@DEEP@"', "[" * depth + "]" * depth)
        return topic, text.encode()
    if how == "big_int_text":  # integers beyond what JSON libraries agree on, written by hand
        text = json.dumps(payload)
        text = text.replace('"seq": ', '"seq": 1' + "0" * draw(st.integers(18, 400)) + ", \"_\": ", 1)
        return topic, text.encode()
    return topic, json.dumps(payload).encode()  # may hold NaN, lone surrogates escaped, huge ints


class Feeder(threading.Thread):
    """The well-behaved device: one result every ``pause`` s until stopped."""

    def __init__(self, agent: Agent, pause: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.agent, self.pause = agent, pause
        self.accepted = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            assert self.agent.accept(f"g{self.accepted}")
            self.accepted += 1
            self.halt.wait(self.pause)


FUZZ_EXAMPLES = 400


def test_fuzz_hostile_device_while_another_device_delivers_on_time(tmp_path: Path, broker: Broker) -> None:
    coordinator = CoordinatorProcess(tmp_path / "coord", broker.port)
    coordinator.start(wait_connected=True)
    evil = RawDevice(broker.port, "evil")
    good = start_agent(tmp_path / "good", broker.port, "good", settings=SLOW_RETRY)
    feeder = Feeder(good)
    cases = {"examples": 0, "messages": 0}

    def settled() -> int:
        stats = coordinator.stats()
        return int(stats["counters"]["settled"]) if stats else -1

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(hostile_message(), min_size=1, max_size=5))
    def hostile_batch(messages: list[tuple[str, bytes]]) -> None:
        before = settled()
        for topic, payload in messages:
            evil.publish(topic, payload)
        cases["examples"] += 1
        cases["messages"] += len(messages)
        # the coordinator took each one and acknowledged it to the broker (or the broker's window would fill)
        assert wait_for(lambda: settled() >= before + len(messages), 10), "the coordinator stopped settling messages"

    try:
        feeder.start()
        t0 = time.monotonic()
        hostile_batch()
        fuzz_s = time.monotonic() - t0
        feeder.halt.set()
        feeder.join(5)
        wait_until(lambda: stored_and_acked(coordinator, good, feeder.accepted), 10, "every good result stored")
        assert coordinator.proc is not None and coordinator.proc.poll() is None
        assert coordinator.count("good") == feeder.accepted
        latencies = sorted(
            r - c for (r, c) in coordinator.query("SELECT received_at, created_at FROM results WHERE device='good'")
        )
        worst = latencies[-1]
        p50 = latencies[len(latencies) // 2]
        stats = coordinator.stats()
        assert stats is not None
        counters = stats["counters"]
        assert counters["dropped"] == 0 and counters["store_ok"]
        assert counters["dead_letters"] == counters["invalid"] + counters["forged"] > 0
        assert worst < 2.0, f"a good result took {worst:.2f} s"  # on time, with hostile traffic alongside
        print(f"\nfuzz: {cases['examples']} cases, {cases['messages']} hostile messages in {fuzz_s:.1f} s; "
              f"{counters['dead_letters']} quarantined {dict(sorted(counters['dead_letter_reasons'].items()))}, "
              f"{coordinator.count('evil')} hostile results valid enough to store; good device: {feeder.accepted} "
              f"results, publish-to-store latency p50 {p50 * 1000:.0f} ms, max {worst * 1000:.0f} ms")
    finally:
        feeder.halt.set()
        good.stop()
        evil.stop()
        coordinator.close()
