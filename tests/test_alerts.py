"""Alert rules at the coordinator: each rule fires and resolves with hysteresis, fires once per subject
(de-duplication, cooldown, re-delivered results), and the fleet monitor stores alerts, publishes them on
edge/v1/coordinator/alerts/<rule> (valid against alert.json, signed) and restores them after a restart."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.coordinator.alerts import (
    AlertEngine,
    AlertsConfig,
    DefectSpikeRule,
    DeviceMeta,
    HeadcountDropRule,
    OfflineRule,
    OutbreakRule,
    distance_km,
)
from edge_agent.coordinator.config import parse_coordinator_config
from edge_agent.coordinator.monitor import FleetMonitor
from edge_agent.coordinator.store import DeviceUpdate, SqliteStore
from edge_agent.coordinator.summary import Summary, summarize
from edge_agent.errors import ConfigError
from edge_agent.protocol import codec, signing
from edge_agent.transport.base import InboundMessage, MqttSettings
from edge_agent.transport.mqtt import PahoTransport
from edge_agent.updates.format import key_id
from tests.fleet_fixtures import crop, inspection, livestock, result_row
from tests.support.broker import Broker
from tests.support.coordinator_proc import CoordinatorProcess
from tests.support.wait import wait_for

T0 = 1_700_000_000.0
SCHEMA = json.loads(resources.files("edge_agent.protocol").joinpath("schemas").joinpath("alert.json").read_text())


class Recorder:
    """The part of a transport the monitor uses: publish (None while "disconnected")."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.connected = True

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        if not self.connected:
            return None
        self.published.append((topic, payload))
        return len(self.published)


def valid(alert: dict[str, Any]) -> None:
    jsonschema.validate(json.loads(codec.dumps(alert)), SCHEMA, cls=jsonschema.Draft202012Validator)


def engine(**rules: Any) -> AlertEngine:
    meta = {
        "a1": DeviceMeta(site="farm-a", lat=-1.28, lon=36.82), "a2": DeviceMeta(site="farm-a", lat=-1.29, lon=36.83),
        "b1": DeviceMeta(site="farm-b", lat=-1.30, lon=36.84), "far": DeviceMeta(site="farm-z", lat=0.5, lon=35.0),
    }
    rules.setdefault("device_offline", OfflineRule(enabled=False))
    return AlertEngine(AlertsConfig(cooldown_s=100, **rules), meta)


def rust() -> Summary:
    return Summary(kind="crop", disease="Bean___rust", labels=frozenset({"Bean___rust"}))


def test_summaries_of_each_sector() -> None:
    import orjson

    assert summarize(orjson.dumps({"body": crop("Bean___rust")})).disease == "Bean___rust"
    assert summarize(orjson.dumps({"body": crop(None)})).disease is None
    assert summarize(orjson.dumps({"body": inspection(True)})).defect is True
    assert summarize(orjson.dumps({"body": livestock(7)})).headcount == 7
    assert summarize(b"not json") == Summary() and summarize(b"[1]") == Summary()


def test_outbreak_fires_once_per_site_and_resolves_below_the_lower_bar() -> None:
    e = engine(disease_outbreak=OutbreakRule(count=3, window_s=1000))
    out: list[dict[str, Any]] = []
    out += e.observe_result("r1", "a1", "leaf", T0, rust(), T0)
    out += e.observe_result("r1", "a1", "leaf", T0, rust(), T0)  # re-delivered: counted once
    out += e.observe_result("r2", "b1", "leaf", T0, rust(), T0)  # another site
    out += e.observe_result("r3", "a2", "leaf", T0 + 1, rust(), T0 + 1)
    assert out == []
    out = e.observe_result("r4", "a2", "leaf", T0 + 2, rust(), T0 + 2)
    assert [(a["rule"], a["subject"], a["state"], a["value"], a["site"]) for a in out] == [
        ("disease_outbreak", "Bean___rust@farm-a", "firing", 3, "farm-a")]
    valid(out[0])
    assert e.observe_result("r5", "a1", "leaf", T0 + 3, rust(), T0 + 3) == []  # still firing: no duplicate
    assert e.tick(T0 + 1000.5) == []  # r1 left the window: 3 left, not below count/2 = 1
    resolved = e.tick(T0 + 1003.5)  # all gone
    assert [(a["id"], a["state"]) for a in resolved] == [(out[0]["id"], "resolved")]
    valid(resolved[0])


def test_outbreak_within_a_radius() -> None:
    assert 1.0 < distance_km(-1.28, 36.82, -1.29, 36.83) < 2.0
    e = engine(disease_outbreak=OutbreakRule(count=3, window_s=1000, radius_km=5))
    e.observe_result("r1", "a1", "leaf", T0, rust(), T0)
    e.observe_result("r2", "far", "leaf", T0, rust(), T0)  # 200 km away
    assert e.observe_result("r3", "a2", "leaf", T0, rust(), T0) == []
    out = e.observe_result("r4", "b1", "leaf", T0, rust(), T0)  # farm-b is 3 km from farm-a
    assert len(out) == 1 and "within 5 km" in out[0]["message"] and out[0]["value"] == 3


def test_defect_spike_against_the_baseline_with_hysteresis() -> None:
    rule = DefectSpikeRule(window_s=100, baseline_s=1000, factor=3, min_rate=0.1, min_samples=10, clear_factor=1.5)
    e = engine(defect_spike=rule)
    seq = 0

    def parts(n: int, failed: int, start: float) -> list[dict[str, Any]]:
        nonlocal seq
        out: list[dict[str, Any]] = []
        for i in range(n):
            seq += 1
            s = Summary(kind="inspection", defect=(i + 1) * failed // n > i * failed // n)  # spread evenly
            out += e.observe_result(f"p{seq}", "cam", "line1", start + i * 0.01, s, start + i * 0.01)
        return out

    assert parts(100, 5, T0) == []  # baseline 5 %
    assert parts(10, 1, T0 + 150) == []  # 10 %: under 3 x 5 %
    fired = parts(10, 4, T0 + 160)  # recent window: 5/20 = 25 % >= 15 %
    assert [(a["rule"], a["subject"], a["state"]) for a in fired] == [("defect_spike", "cam/line1", "firing")]
    assert fired[0]["baseline"] == 0.05
    valid(fired[0])
    assert parts(10, 2, T0 + 170) == []  # 7/30 = 23 %: still firing, nothing new
    assert parts(30, 0, T0 + 180) == []  # 7/60 = 11.7 %: above 1.5 x 5 % = 7.5 %: stays (hysteresis)
    resolved = parts(60, 0, T0 + 190)  # 7/120 = 5.8 %
    assert [a["state"] for a in resolved] == ["resolved"]
    assert parts(20, 20, T0 + 200) == []  # right away again: cooldown (100 s)


def test_headcount_drop_and_recovery() -> None:
    e = engine(headcount_drop=HeadcountDropRule(window_s=60, baseline_s=600, drop_fraction=0.3, clear_fraction=0.1))
    n = 0

    def count(value: int, at: float) -> list[dict[str, Any]]:
        nonlocal n
        n += 1
        return e.observe_result(f"h{n}", "pen-cam", "pen", at, Summary(kind="livestock", headcount=value), at)

    for i in range(20):
        assert count(10, T0 + i * 10) == []
    assert count(8, T0 + 300) == []  # -20 %: not enough
    fired = count(5, T0 + 301)  # mean of the last minute: 6.5 (8 and 5), under 70 % of 10
    assert [(a["rule"], a["value"], a["baseline"]) for a in fired] == [("headcount_drop", 6.5, 10.0)]
    assert count(5, T0 + 302) == []
    assert count(8, T0 + 340) == []  # recovering, under 90 % of the baseline it fired on
    resolved = count(10, T0 + 380) + count(10, T0 + 381)  # mean 9 (8, 10): within 10 % of 10
    assert [a["state"] for a in resolved] == ["resolved"]


def test_device_offline_longer_than_t() -> None:
    e = engine(device_offline=OfflineRule(after_s=60))
    assert e.observe_device("d", T0, "online", T0) == []
    assert e.observe_device("d", T0 + 10, "offline", T0 + 10) == []  # LWT
    assert e.tick(T0 + 69) == []
    fired = e.tick(T0 + 71)
    assert [(a["rule"], a["subject"], a["device"]) for a in fired] == [("device_offline", "d", "d")]
    assert "offline for 61 s" in fired[0]["message"]
    assert e.tick(T0 + 200) == []  # de-duplicated
    resolved = e.observe_device("d", T0 + 210, "online", T0 + 210)
    assert [a["state"] for a in resolved] == ["resolved"]
    # silent (no LWT, e.g. the broker never noticed): a heartbeat last heard long ago
    e.observe_device("quiet", T0, None, T0)
    assert e.tick(T0 + 59) == [] and len(e.tick(T0 + 61)) == 1


def test_the_monitor_never_holds_up_ingest(tmp_path: Path) -> None:
    monitor = FleetMonitor(SqliteStore(tmp_path / "c.db"), None, AlertsConfig())  # not started: nothing drains
    batch = [result_row("d", 1, T0, inspection(True))]
    for _ in range(1001):
        monitor(batch, [])
    assert monitor.counters["batches_skipped"] == 1


def test_config_carries_rules_and_device_metadata() -> None:
    cfg = parse_coordinator_config({
        "devices": {"a1": {"site": "farm-a", "lat": 1.0, "lon": 2.0}},
        "alerts": {"disease_outbreak": {"count": 2, "radius_km": 3}, "device_offline": {"after_s": 30}},
        "http": {"enabled": True, "port": 0},
    }, "c.yaml")
    assert cfg.alerts.disease_outbreak.count == 2 and cfg.devices["a1"].site == "farm-a"
    assert cfg.http_settings().enabled
    legacy = parse_coordinator_config({"dashboard": {"enabled": True, "port": 9}}, "c.yaml")
    assert legacy.http_settings().port == 9
    with pytest.raises(ConfigError, match=r"alerts\.defect_spike\.factor"):
        parse_coordinator_config({"alerts": {"defect_spike": {"factor": 0.5}}}, "c.yaml")


def test_monitor_stores_publishes_signed_alerts_and_does_not_repeat_them_after_a_restart(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    transport = Recorder()
    key = Ed25519PrivateKey.generate()
    config = AlertsConfig(disease_outbreak=OutbreakRule(count=2, window_s=10_000),
                          device_offline=OfflineRule(after_s=5))
    meta = {"a1": DeviceMeta(site="farm-a"), "a2": DeviceMeta(site="farm-a")}
    now = [T0 + 100]
    monitor = FleetMonitor(store, transport, config, meta, ack_key=key, clock=lambda: now[0])
    monitor.start()
    rows = [result_row("a1", 1, T0 + 1, crop("Bean___rust")), result_row("a2", 1, T0 + 2, crop("Bean___rust"))]
    store.commit_batch(rows, [])
    monitor.process((rows, []))
    monitor.stop()
    firing = store.alerts(state="firing")
    assert [(a["rule"], a["subject"]) for a in firing] == [("disease_outbreak", "Bean___rust@farm-a")]
    published = [m for m in transport.published if m[0] == codec.coordinator_alert_topic("disease_outbreak")]
    assert len(published) == 1
    payload = json.loads(published[0][1])
    valid(payload)
    assert payload["id"] == firing[0]["id"] and signing.verify(payload, {key_id(key.public_key()): key.public_key()})

    # a restart: the firing alert is restored, the replayed results raise nothing new
    transport2 = Recorder()
    monitor2 = FleetMonitor(store, transport2, config, meta, clock=lambda: now[0])
    monitor2.start()
    monitor2.process(None)
    monitor2.stop()
    assert [a["id"] for a in store.alerts()] == [firing[0]["id"]]
    assert not [m for m in transport2.published if "alerts" in m[0]]
    # the devices in the store went quiet: offline alerts once the store says so
    store.commit_batch([], [DeviceUpdate("a1", T0 + 100, state="offline")])
    monitor2.process(([], [DeviceUpdate("a1", T0 + 100, state="offline")]))
    now[0] = T0 + 106
    monitor2.process(None)
    assert {a["subject"] for a in store.alerts(state="firing")} == {"Bean___rust@farm-a", "a1", "a2"}


class Client:
    """A plain MQTT client: what it receives on its filters, and publish."""

    def __init__(self, port: int, client_id: str, filters: list[str]) -> None:
        self.filters = filters
        self.ready = threading.Event()
        self.received: list[InboundMessage] = []
        self.transport = PahoTransport(MqttSettings(port=port, client_id=client_id))
        self.transport.start(self)

    def on_connected(self, session_present: bool) -> None:
        if self.filters:
            self.transport.subscribe(self.filters, qos=1)
        self.ready.set()

    def on_disconnected(self, reason: str) -> None:
        self.ready.clear()

    def on_message(self, message: InboundMessage) -> None:
        self.received.append(message)

    def on_published(self, token: int, ok: bool, reason: str) -> None: ...


def test_a_real_coordinator_publishes_an_offline_alert_on_mosquitto_and_serves_it(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    coordinator = CoordinatorProcess(tmp_path / "coord", broker.port, extra_config=(
        "devices: {barn-1: {site: ranch}}\nalerts: {tick_s: 0.2, device_offline: {after_s: 1}}\n"))
    watcher = device = None
    try:
        coordinator.start(wait_connected=True)
        watcher = Client(broker.port, "watcher", ["edge/v1/coordinator/alerts/#"])
        device = Client(broker.port, "barn-1", [])
        assert watcher.ready.wait(10) and device.ready.wait(10)

        def status(state: str) -> None:
            payload = codec.status_payload(device="barn-1", state=state, ts=time.time())  # type: ignore[arg-type]
            assert device is not None and device.transport.publish(codec.status_topic("barn-1"), codec.dumps(payload),
                                                                   qos=1, retain=True) is not None

        status("online")
        status("offline")  # what its last will says
        assert wait_for(lambda: len(watcher.received) >= 1, 15), coordinator.read_log()[-2000:]
        fired = json.loads(watcher.received[0].payload)
        valid(fired)
        assert watcher.received[0].topic == "edge/v1/coordinator/alerts/device_offline"
        assert (fired["state"], fired["subject"], fired["site"]) == ("firing", "barn-1", "ranch")
        status("online")
        assert wait_for(lambda: len(watcher.received) >= 2, 15)
        resolved = json.loads(watcher.received[1].payload)
        assert (resolved["id"], resolved["state"]) == (fired["id"], "resolved")
        with urllib.request.urlopen(f"http://127.0.0.1:{coordinator.dashboard_port}/api/v1/alerts", timeout=5) as r:
            stored = json.loads(r.read())["alerts"]
        assert [(a["id"], a["state"]) for a in stored] == [(fired["id"], "resolved")]
        with urllib.request.urlopen(f"http://127.0.0.1:{coordinator.dashboard_port}/metrics", timeout=5) as r:
            assert "edge_coordinator_alerts_raised_total 1.0" in r.read().decode()
    finally:
        for client in (watcher, device):
            if client is not None:
                client.transport.stop()
        coordinator.close()
        broker.close()
