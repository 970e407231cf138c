"""Fault tests R1-R11 of RELIABILITY.md, scaled down to stay bounded, against a real Mosquitto.

Each asserts the invariant: unique results at the coordinator == inputs accepted by the agent.
Transport duplicates are allowed (and reported by the coordinator's counters), never counted as failures.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.coordinator.service import Coordinator
from edge_agent.delivery.outbox import OutboxLimits
from edge_agent.delivery.publisher import PublisherSettings
from edge_agent.transport.base import InboundMessage, MqttSettings
from edge_agent.transport.mqtt import PahoTransport
from tests.support.broker import Broker
from tests.support.delivery import Agent, start_agent, start_coordinator, wait_until
from tests.support.faultproxy import FaultProxy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.close()


def coordinator_ids(coordinator: Coordinator, device: str = "dev1") -> set[str]:
    return coordinator.store.result_ids(device)


def assert_invariant(coordinator: Coordinator, agent: Agent, accepted: int, timeout: float = 60) -> float:
    """Wait until the coordinator holds exactly ``accepted`` unique results and the outbox is empty."""
    waited = wait_until(
        lambda: coordinator.store.count_results(agent.device) >= accepted and agent.outbox.stats().backlog == 0,
        timeout,
        f"{accepted} results at the coordinator and an empty outbox",
    )
    assert coordinator.store.count_results(agent.device) == accepted
    return waited


class Feeder(threading.Thread):
    """Accepts inputs continuously (like uploads arriving) until stopped; every accept must succeed."""

    def __init__(self, agent: Agent, prefix: str = "f", pause: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.agent, self.prefix, self.pause = agent, prefix, pause
        self.accepted = 0
        self.refused = 0
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            if self.agent.accept(f"{self.prefix}{i}"):
                self.accepted += 1
            else:
                self.refused += 1
            i += 1
            self.halt.wait(self.pause)

    def stop(self) -> int:
        self.halt.set()
        self.join(10)
        return self.accepted


def test_r1_no_fault_all_results_unique_at_the_coordinator(tmp_path: Path, broker: Broker) -> None:
    coordinator = start_coordinator(tmp_path / "c.db", broker.port)
    agent = start_agent(tmp_path / "agent", broker.port)
    try:
        n = 2000
        t0 = time.monotonic()
        accepted = agent.feed([f"r1-{i}" for i in range(n)], threads=8)
        assert_invariant(coordinator, agent, len(accepted))
        elapsed = time.monotonic() - t0
        assert len(accepted) == n
        assert coordinator_ids(coordinator) == {r for r in coordinator_ids(coordinator)}
        print(f"\nR1: {n} results accepted, stored and e2e-acked in {elapsed:.2f} s = {n / elapsed:.0f} results/s")
    finally:
        agent.stop()
        coordinator.stop()


def test_r2_broker_sigkilled_five_times_mid_stream(tmp_path: Path, broker: Broker) -> None:
    coordinator = start_coordinator(tmp_path / "c.db", broker.port)
    agent = start_agent(tmp_path / "agent", broker.port)
    feeder = Feeder(agent)
    feeder.start()
    try:
        for kill in range(5):
            target = coordinator.store.count_results("dev1") + 20

            def progressed(target: int = target) -> bool:
                return coordinator.store.count_results("dev1") > target

            wait_until(progressed, 30, f"progress before kill {kill}")
            broker.kill()
            assert feeder.is_alive() and feeder.refused == 0  # accepting continues while the broker is gone
            broker.start()
        t_last_fault = time.monotonic()
        accepted = feeder.stop()
        assert_invariant(coordinator, agent, accepted, timeout=90)
        drain = time.monotonic() - t_last_fault
        assert feeder.refused == 0
        print(f"\nR2: {accepted} accepted across 5 broker SIGKILLs; all delivered {drain:.2f} s after the last "
              f"restart; transport duplicates at the coordinator: {coordinator.counters['duplicates']}")
    finally:
        feeder.halt.set()
        agent.stop()
        coordinator.stop()


def agent_process(state: Path, port: int, count: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.delivery", str(state), str(port), str(count)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )


def test_r3_agent_sigkilled_twice(tmp_path: Path, broker: Broker) -> None:
    state, n = tmp_path / "agent", 1500
    coordinator = start_coordinator(tmp_path / "c.db", broker.port)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # kill 1: mid-stream (inputs being accepted and results written)
        procs.append(agent_process(state, broker.port, n))
        wait_until(lambda: coordinator.store.count_results("dev1") > 200, 30, "first results")
        os.kill(procs[-1].pid, signal.SIGKILL)
        procs[-1].wait()
        # kill 2: with a backlog the broker acknowledged but the coordinator never saw
        procs.append(agent_process(state, broker.port, n))
        wait_until(lambda: coordinator.store.count_results("dev1") > 400, 30, "progress after restart")
        coordinator.stop()
        db = sqlite3.connect(state / "outbox.db")
        wait_until(lambda: db.execute("SELECT COUNT(*) FROM results").fetchone()[0] > 100, 30, "a backlog")
        os.kill(procs[-1].pid, signal.SIGKILL)
        procs[-1].wait()
        coordinator = start_coordinator(tmp_path / "c.db", broker.port)
        procs.append(agent_process(state, broker.port, n))
        assert procs[-1].stdout is not None and procs[-1].stdout.readline() == b"fed\n"
        wait_until(
            lambda: coordinator.store.count_results("dev1") >= n
            and db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0,
            60,
            "everything delivered after two agent kills",
        )
        accepted = {r for (r,) in db.execute("SELECT input_id FROM inputs WHERE state = 'done'")}
        pending = db.execute("SELECT COUNT(*) FROM inputs WHERE state = 'pending'").fetchone()[0]
        db.close()
        store = sqlite3.connect(tmp_path / "c.db")
        stored = [r for (r,) in store.execute("SELECT input_id FROM results WHERE device = 'dev1'")]
        store.close()
        assert pending == 0
        assert len(accepted) == n
        assert sorted(stored) == sorted(accepted)  # every accepted input has exactly one result
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        coordinator.stop()


def test_r4_coordinator_offline_then_broker_sigkilled(tmp_path: Path, broker: Broker) -> None:
    coordinator = start_coordinator(tmp_path / "c.db", broker.port)
    agent = start_agent(tmp_path / "agent", broker.port)
    try:
        first = agent.feed([f"a{i}" for i in range(200)])
        assert_invariant(coordinator, agent, 200)
        coordinator.stop()
        second = agent.feed([f"b{i}" for i in range(300)])
        wait_until(lambda: agent.publisher.counters["broker_acked"] >= 400, 20, "broker acknowledged the backlog")
        assert agent.outbox.stats().backlog == 300  # a broker PUBACK is not delivery
        broker.kill()  # the broker's queue for the coordinator dies with it
        broker.start()
        coordinator = start_coordinator(tmp_path / "c.db", broker.port)
        assert_invariant(coordinator, agent, len(first) + len(second))
    finally:
        agent.stop()
        coordinator.stop()


def test_r5_coordinator_offline_past_the_broker_queue_limit(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker", max_queued_messages=50)
    broker.start()
    coordinator = start_coordinator(tmp_path / "c.db", broker.port)
    agent = start_agent(tmp_path / "agent", broker.port)
    try:
        wait_until(coordinator.connected.is_set, 10, "coordinator session created")
        coordinator.stop()
        accepted = agent.feed([f"q{i}" for i in range(1000)])
        wait_until(lambda: agent.publisher.counters["broker_acked"] >= 200, 20, "a window queued at the broker")
        coordinator = start_coordinator(tmp_path / "c.db", broker.port)
        assert_invariant(coordinator, agent, len(accepted))
        assert agent.publisher.counters["republished"] > 0  # what the broker dropped was sent again
    finally:
        agent.stop()
        coordinator.stop()
        broker.close()


ACL_DENY = """user coord
topic readwrite edge/#
pattern write edge/v1/%u/status
pattern write edge/v1/%u/heartbeat
pattern write edge/v1/%u/events
pattern read edge/v1/%u/ack
pattern read edge/v1/%u/cmd/#
"""


def test_r6_acl_forbids_the_results_topic(tmp_path: Path) -> None:
    users = {"dev1": "pw-dev1", "coord": "pw-coord"}
    broker = Broker(tmp_path / "broker", users=users, acl=ACL_DENY)
    broker.start()
    coordinator = start_coordinator(tmp_path / "c.db", broker.port, username="coord", password="pw-coord")
    agent = start_agent(tmp_path / "agent", broker.port, username="dev1", password="pw-dev1")
    try:
        accepted = agent.feed([f"acl{i}" for i in range(100)])
        wait_until(lambda: agent.publisher.counters["rejected"] >= 100, 20, "refusals counted")
        assert agent.outbox.stats().backlog == 100  # nothing deleted
        assert agent.publisher.state == "degraded"
        assert coordinator.store.count_results() == 0
        broker.set_acl(ACL_DENY + "pattern write edge/v1/%u/results/#\n")  # fixed, reloaded with SIGHUP
        assert_invariant(coordinator, agent, len(accepted), timeout=30)
    finally:
        agent.stop()
        coordinator.stop()
        broker.close()


class Spy:
    """Collects messages on a filter through a real MQTT connection."""

    def __init__(self, port: int, topic_filter: str) -> None:
        self.messages: list[InboundMessage] = []
        self.topic_filter = topic_filter
        self.transport = PahoTransport(MqttSettings(port=port, client_id=f"spy-{os.getpid()}-{id(self)}"))
        self.ready = threading.Event()
        self.transport.start(self)

    def on_connected(self, session_present: bool) -> None:
        self.transport.subscribe([self.topic_filter])
        self.ready.set()

    def on_disconnected(self, reason: str) -> None: ...

    def on_published(self, token: int, ok: bool, reason: str) -> None: ...

    def on_message(self, message: InboundMessage) -> None:
        self.messages.append(message)

    def seen(self, fragment: bytes) -> bool:
        return any(fragment in m.payload for m in list(self.messages))


def half_open(tmp_path: Path, broker: Broker, fault: str) -> None:
    """R7/R11: the link (blackhole) or the broker (SIGSTOP) goes silent while results keep coming."""
    keepalive = 2
    proxy = FaultProxy(broker.port)
    coordinator = start_coordinator(tmp_path / "c.db", broker.port)
    agent = start_agent(tmp_path / "agent", proxy.port, keepalive_s=keepalive)
    spy = Spy(broker.port, "edge/v1/dev1/status")
    feeder = Feeder(agent, pause=0.01)
    try:
        wait_until(lambda: agent.publisher.state == "connected" and spy.ready.is_set(), 10, "connected")
        feeder.start()
        wait_until(lambda: coordinator.store.count_results("dev1") > 50, 20, "results flowing")
        t0 = time.monotonic()
        if fault == "blackhole":
            proxy.set("blackhole")
        else:
            broker.freeze()
        detected = wait_until(lambda: agent.publisher.state == "degraded", 1.5 * keepalive + 3, "loss detected")
        if fault == "blackhole":  # the broker notices too and publishes the will
            wait_until(lambda: spy.seen(b'"offline"'), 1.5 * keepalive + 4, "offline status")
        wait_until(lambda: time.monotonic() - t0 > 6, 10, "fault held for 6 s")
        proxy.set("pass")
        broker.thaw()
        accepted = feeder.stop()
        assert feeder.refused == 0
        assert_invariant(coordinator, agent, accepted, timeout=60)
        print(f"\n{fault}: loss detected after {detected:.2f} s (keepalive {keepalive} s)")
    finally:
        feeder.halt.set()
        broker.thaw()
        t_stop = time.monotonic()
        agent.stop()
        assert time.monotonic() - t_stop < 10  # no deadlock on shutdown
        spy.transport.stop()
        coordinator.stop()
        proxy.close()


def test_r7_half_open_link(tmp_path: Path, broker: Broker) -> None:
    half_open(tmp_path, broker, "blackhole")


def test_r11_broker_frozen(tmp_path: Path, broker: Broker) -> None:
    half_open(tmp_path, broker, "sigstop")


def test_r8_slow_lossy_link(tmp_path: Path, broker: Broker) -> None:
    proxy = FaultProxy(broker.port)
    proxy.set("pass", delay_s=0.3, bandwidth_bps=64 * 1024)
    coordinator = start_coordinator(tmp_path / "c.db", broker.port)
    settings = PublisherSettings(window=50, batch=25, ack_timeout_s=5.0, republish_per_s=100, heartbeat_s=1.0)
    agent = start_agent(tmp_path / "agent", proxy.port, settings=settings, keepalive_s=5)
    try:
        accepted = agent.feed([f"s{i}" for i in range(300)])
        max_in_flight = 0
        for _ in range(3):
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                max_in_flight = max(max_in_flight, agent.publisher.snapshot()["in_flight"])
                time.sleep(0.05)  # sampling the window while the link is slow
            proxy.reset()
        assert_invariant(coordinator, agent, len(accepted), timeout=90)
        assert max_in_flight <= 50
        assert agent.publisher.counters["disconnects"] >= 1
    finally:
        agent.stop()
        coordinator.stop()
        proxy.close()


def test_r9_outbox_full_refuses_new_inputs_and_recovers(tmp_path: Path, broker: Broker) -> None:
    limits = OutboxLimits(max_bytes=200 * 400, min_free_bytes=0)
    agent = start_agent(tmp_path / "agent", broker.port, limits=limits)
    coordinator: Coordinator | None = None
    try:
        accepted = agent.feed([f"full{i}" for i in range(600)], threads=2)
        assert 50 < len(accepted) < 600  # the byte cap refused the rest
        assert agent.outbox.stats().refused_full == 600 - len(accepted)
        coordinator = start_coordinator(tmp_path / "c.db", broker.port)
        assert_invariant(coordinator, agent, len(accepted))  # the backlog keeps flowing
        more = agent.feed([f"later{i}" for i in range(100)])  # and accepting recovers by itself
        assert len(more) == 100
        assert_invariant(coordinator, agent, len(accepted) + 100)
    finally:
        agent.stop()
        if coordinator is not None:
            coordinator.stop()


def test_r10_garbage_in_the_outbox_database(tmp_path: Path, broker: Broker) -> None:
    coordinator = start_coordinator(tmp_path / "c.db", broker.port)
    spy = Spy(broker.port, "edge/v1/dev1/events")
    agent = start_agent(tmp_path / "agent", broker.port)
    try:
        before = agent.feed([f"g{i}" for i in range(100)])
        assert_invariant(coordinator, agent, 100)
        agent.stop()
        (tmp_path / "agent" / "outbox.db").write_bytes(os.urandom(64 * 1024))
        agent = start_agent(tmp_path / "agent", broker.port)  # starts, quarantines, alarms
        assert agent.outbox.stats().alarms
        wait_until(lambda: spy.seen(b"outbox_corrupt"), 10, "alarm event")
        after = agent.feed([f"h{i}" for i in range(100)])  # keeps accepting
        assert_invariant(coordinator, agent, len(before) + len(after))
        assert list((tmp_path / "agent").glob("outbox.db.corrupt-*"))
    finally:
        agent.stop()
        spy.transport.stop()
        coordinator.stop()


def write_agent_config(tmp_path: Path, port: int) -> Path:
    """The real agent (``edge-agent run``): a tiny classifier built here, a watched folder, MQTT to ``port``."""
    import io

    import numpy as np
    from PIL import Image as PILImage

    from tests.support.onnx_models import classifier_manifest, tiny_classifier, write_bundle

    labels = ["Apple___healthy", "Apple___Apple_scab", "Corn___healthy"]
    bundle = tmp_path / "models" / "tiny_leaf"
    bundle.mkdir(parents=True)
    onnx_path = tiny_classifier(bundle / "model.onnx", n_classes=len(labels))
    write_bundle(bundle, classifier_manifest(onnx_path, labels, name="tiny_leaf", thresholds={"ood": 5.0}))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rng = np.random.default_rng(3)
    for i in range(200):
        buf = io.BytesIO()
        PILImage.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        (inbox / f"leaf-{i:03d}.png").write_bytes(buf.getvalue())
    config = tmp_path / "agent.yaml"
    config.write_text(f"""\
device_id: dev-e2e
state_dir: {tmp_path / 'state'}
models_dir: {tmp_path / 'models'}
shutdown_timeout_s: 5
models:
  - name: leaf
    bundle: tiny_leaf
pipelines:
  - name: crop
    kind: crop
    model: leaf
    workers: 2
    queue_size: 8
sources:
  - type: folder
    name: inbox
    pipeline: crop
    path: {inbox}
    poll_interval_s: 0.05
    settle_s: 0.0
mqtt:
  host: 127.0.0.1
  port: {port}
  heartbeat_s: 1
  reconnect_max_s: 1
metrics:
  enabled: false
""")
    return config


def test_r3_real_agent_process_sigkilled_twice_mid_inference(tmp_path: Path, broker: Broker) -> None:
    """End to end through ``edge-agent run`` (folder -> pipeline -> outbox -> MQTT -> coordinator)."""
    config = write_agent_config(tmp_path, broker.port)
    coordinator = start_coordinator(tmp_path / "c.db", broker.port)
    cmd = [sys.executable, "-c", "from edge_agent.cli import main; main()", "run", "--config", str(config)]
    procs: list[subprocess.Popen[bytes]] = []

    def stored() -> int:
        return coordinator.store.count_results("dev-e2e")

    try:
        for threshold in (20, 80):
            procs.append(subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_until(lambda t=threshold: stored() > t, 60, f"more than {threshold} results")  # type: ignore[misc]
            os.kill(procs[-1].pid, signal.SIGKILL)
            procs[-1].wait()
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_until(lambda: stored() >= 200, 90, "all 200 files stored")
        store = sqlite3.connect(tmp_path / "c.db")
        inputs = [r for (r,) in store.execute("SELECT input_id FROM results WHERE device = 'dev-e2e'")]
        store.close()
        assert len(inputs) == len(set(inputs)) == 200  # every accepted file exactly one result
        assert sorted(p.name for p in (tmp_path / "inbox").glob("*.png")) == []
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        coordinator.stop()
