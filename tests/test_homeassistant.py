"""Home Assistant MQTT discovery: the configs follow HA's conventions and their templates, rendered with Jinja2 as
Home Assistant does, read the right values from the retained state; checked end to end against a real Mosquitto."""

from __future__ import annotations

import json
import re
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from jinja2.sandbox import SandboxedEnvironment

from edge_agent.config import parse_config
from edge_agent.delivery.homeassistant import DEFECT_WINDOW, HomeAssistant, node_id, state_topic
from edge_agent.delivery.outbox import Outbox
from edge_agent.delivery.publisher import Publisher, PublisherSettings, availability_will
from edge_agent.errors import ConfigError
from edge_agent.protocol import codec
from edge_agent.transport.base import InboundMessage, MqttSettings
from edge_agent.transport.mqtt import PahoTransport
from tests.support.broker import Broker
from tests.support.wait import wait_for

JINJA = SandboxedEnvironment()
HA_CONFIG_TOPIC = re.compile(r"^homeassistant/(sensor|binary_sensor)/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+/config$")
PIPELINES = [("leaf", "crop"), ("line1", "inspection"), ("pen", "livestock"), ("raw", "plain")]


def render(template: str, payload: dict[str, Any]) -> str:
    return JINJA.from_string(template).render(value_json=payload).strip()


def crop_body(label: str, healthy: bool, confidence: float) -> dict[str, Any]:
    condition = label.split("___")[1]
    return {"predictions": [{"label": label, "score": confidence}], "kind": "crop", "sector": {
        "crop": "Corn", "condition": condition, "label": label, "healthy": healthy, "recognised": True,
        "confidence": confidence}}


def part_body(passed: bool) -> dict[str, Any]:
    return {"predictions": [], "kind": "inspection", "sector": {
        "verdict": "pass" if passed else "fail", "passed": passed, "score": 0.1 if passed else 0.9}}


def test_discovery_configs_follow_home_assistant_conventions() -> None:
    ha = HomeAssistant("barn.1", PIPELINES)
    configs = ha.discovery()
    topics = [t for t, _ in configs]
    assert all(HA_CONFIG_TOPIC.match(t) for t in topics), topics
    assert node_id("barn.1") == "barn_1" and all("/barn_1/" in t for t in topics)
    assert len(set(topics)) == len(topics)
    unique_ids = [c["unique_id"] for _, c in configs]
    assert len(set(unique_ids)) == len(unique_ids)
    assert {json.dumps(c["device"], sort_keys=True) for _, c in configs} == {json.dumps(
        {"identifiers": ["edge_agent_barn.1"], "name": "barn.1", "manufacturer": "edge-agent", "model": "edge-agent",
         "sw_version": configs[0][1]["device"]["sw_version"]}, sort_keys=True)}
    for topic, config in configs:
        assert config["state_topic"].startswith("edge/v1/barn.1/"), topic
        if topic.endswith("/status/config"):  # the connectivity sensor is always available: it *is* the status
            assert "availability" not in config and config["state_topic"] == codec.status_topic("barn.1")
        else:
            assert config["availability"] == [{
                "topic": "edge/v1/barn.1/status", "value_template": "{{ value_json.state }}",
                "payload_available": "online", "payload_not_available": "offline"}]
    keys = {c["unique_id"].removeprefix("edge_agent_barn.1_") for _, c in configs}
    assert {"status", "backlog", "leaf_diagnosis", "leaf_confidence", "line1_defect_rate", "line1_verdict",
            "pen_headcount", "raw_label", "raw_results"} <= keys
    assert HomeAssistant("d", PIPELINES, discovery_prefix="ha/test").discovery()[0][0].startswith("ha/test/")


def test_state_templates_read_diagnosis_confidence_counts_and_defect_rate() -> None:
    ha = HomeAssistant("dev1", PIPELINES, state_interval_s=10)
    ha.observe("leaf", 1795440000.0, crop_body("Corn___healthy", True, 0.5))
    ha.observe("leaf", 1795440001.0, crop_body("Corn___Common_rust", False, 0.9731))
    for i in range(DEFECT_WINDOW + 20):  # the first 20 all fail, then 1 in 4 of the latest DEFECT_WINDOW
        ha.observe("line1", 1795440000.0 + i, part_body(passed=i >= 20 and i % 4 != 0))
    ha.observe("pen", 1795440000.0, {"kind": "livestock", "sector": {
        "in_frame": 3, "counts": {"unique": 12, "by_label": {"cow": 12}, "forward": 5, "backward": 1}}})
    ha.observe("raw", 1795440000.0, {"predictions": [{"label": "cat", "score": 0.25, "index": 1}]})
    ha.observe("unknown", 1.0, {})  # ignored
    states = dict(ha.states(0.0))
    schema = json.loads(resources.files("edge_agent.protocol").joinpath("schemas/state.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for state in states.values():
        jsonschema.validate(json.loads(codec.dumps(state)), schema, cls=jsonschema.Draft202012Validator)
    assert set(states) == {state_topic("dev1", p) for p, _ in PIPELINES}
    assert ha.states(1.0) == []  # throttled, and nothing changed
    assert len(ha.states(1.0, force=True)) == 4

    def values(pipeline: str) -> dict[str, str]:
        state = states[state_topic("dev1", pipeline)]
        return {c["unique_id"].rsplit(f"{pipeline}_", 1)[1]: render(c["value_template"], state)
                for _, c in ha.discovery() if c["state_topic"] == state_topic("dev1", pipeline)}

    assert values("leaf") == {"diagnosis": "Common_rust", "label": "Corn___Common_rust", "confidence": "97.31",
                              "disease": "ON", "results": "2", "last_result": "2026-11-23T13:20:01+00:00"}
    line = values("line1")
    assert (line["defect_rate"], line["defects"], line["results"], line["verdict"]) == ("25.0", "45", "120", "pass")
    assert line["confidence"] == "10.0"
    pen = values("pen")
    assert (pen["headcount"], pen["in_frame"], pen["crossed_forward"], pen["crossed_backward"]) == ("12", "3", "5", "1")
    assert (values("raw")["label"], values("raw")["confidence"]) == ("cat", "25.0")
    heartbeat = codec.heartbeat_payload(device="dev1", ts=1.0, state="connected", uptime_s=1.0,
                                        outbox={"backlog": 7}, publisher={}, health={})
    backlog = next(c for t, c in ha.discovery() if t.endswith("/backlog/config"))
    assert render(backlog["value_template"], heartbeat) == "7"


def test_home_assistant_config_keys() -> None:
    base = "device_id: d\nmodels: [{name: m, bundle: b}]\npipelines: [{name: p, kind: plain, model: m}]\n"
    cfg = parse_config(base)
    assert (cfg.home_assistant.enabled, cfg.home_assistant.discovery_prefix) == (False, "homeassistant")
    cfg = parse_config(base + "home_assistant: {enabled: true, discovery_prefix: ha/site-1}\n")
    assert (cfg.home_assistant.enabled, cfg.home_assistant.discovery_prefix) == (True, "ha/site-1")
    for bad in ("ha/+", "ha/#", "/ha", ""):
        with pytest.raises(ConfigError, match=r"home_assistant\.discovery_prefix"):
            parse_config(base + f"home_assistant: {{enabled: true, discovery_prefix: '{bad}'}}\n")


class Watcher:
    """A real MQTT client that records the latest message (and its retain flag) per topic."""

    def __init__(self, port: int, *filters: str) -> None:
        self.latest: dict[str, InboundMessage] = {}
        self.filters = list(filters)
        self.lock = threading.Lock()
        self.transport = PahoTransport(MqttSettings(port=port, client_id="ha-watcher"))
        self.transport.start(self)

    def on_connected(self, session_present: bool) -> None:
        self.transport.subscribe(self.filters, qos=1)

    def on_disconnected(self, reason: str) -> None: ...

    def on_published(self, token: int, ok: bool, reason: str) -> None: ...

    def on_message(self, message: InboundMessage) -> None:
        with self.lock:
            self.latest[message.topic] = message

    def json(self, topic: str) -> dict[str, Any] | None:
        with self.lock:
            message = self.latest.get(topic)
        return json.loads(message.payload) if message is not None else None


def test_discovery_and_state_through_a_real_mosquitto(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    outbox = Outbox(tmp_path / "outbox.db", "dev1")
    ha = HomeAssistant("dev1", [("leaf", "crop"), ("line1", "inspection")], state_interval_s=0.1)
    transport = PahoTransport(MqttSettings(port=broker.port, client_id="dev1"), availability_will("dev1"))
    publisher = Publisher(outbox, transport, "dev1", dict, PublisherSettings(idle_poll_s=0.1), home_assistant=ha)
    watcher: Watcher | None = None
    try:
        publisher.start()
        assert wait_for(lambda: publisher.state == "connected", 10)
        for i, (pipeline, body) in enumerate([("leaf", crop_body("Corn___Northern_Leaf_Blight", False, 0.88)),
                                              ("line1", part_body(True)), ("line1", part_body(False))]):
            outbox.accept_input(f"i{i}", source="t", pipeline=pipeline, spool_path=None, meta={})
            outbox.add_result(f"i{i}", pipeline=pipeline, model="m", model_version="1", body=body)
        publisher.wake()
        assert wait_for(lambda: publisher.counters["published"] == 3, 10)
        # a late subscriber (Home Assistant starting after the agent) gets every config and state, retained
        watcher = Watcher(broker.port, "homeassistant/#", "edge/v1/dev1/state/+", "edge/v1/dev1/status")
        configs = ha.discovery()
        line_state = state_topic("dev1", "line1")
        assert wait_for(lambda: all(watcher.json(t) is not None for t, _ in configs)
                        and (watcher.json(line_state) or {}).get("results") == 2, 10), sorted(watcher.latest)
        assert all(watcher.latest[t].retain for t, _ in configs)
        for topic, config in configs:
            assert watcher.json(topic) == config
        status_topic = codec.status_topic("dev1")
        leaf = watcher.json(state_topic("dev1", "leaf"))
        assert leaf is not None and render(configs[2][1]["value_template"], leaf) == "Northern_Leaf_Blight"
        rate = next(c for t, c in configs if t.endswith("/line1_defect_rate/config"))
        assert render(rate["value_template"], watcher.json(line_state) or {}) == "50.0"
        online = watcher.json(status_topic)
        avail = configs[2][1]["availability"][0]["value_template"]
        assert online is not None and render(avail, online) == "online"
        # availability: the agent goes offline (clean stop; the last will says the same when its link dies)
        publisher.stop(5)
        assert wait_for(lambda: (watcher.json(status_topic) or {}).get("state") == "offline", 10)
        assert render(avail, watcher.json(status_topic) or {}) == "offline"
    finally:
        if watcher is not None:
            watcher.transport.stop()
        outbox.close()
        broker.close()


def test_the_shipped_acl_lets_a_device_announce_only_itself(tmp_path: Path) -> None:
    from tests.support.broker import ShippedBroker
    from tests.support.tls import make_tls
    from tests.test_control_auth import Client

    tls = make_tls(tmp_path / "tls")
    users = {"farm-01": "pw-farm", "mallory": "pw-mallory", "homeassistant": "pw-ha"}
    broker = ShippedBroker(tmp_path / "broker", users=users, tls=tls)
    broker.start()
    clients: list[Client] = []
    try:
        ha_user = Client(broker.tls_port, "homeassistant", username="homeassistant", password=users["homeassistant"],
                         ca_file=tls.ca, subscribe=("homeassistant/#", "edge/v1/+/state/+"))
        device = Client(broker.tls_port, "farm-01", username="farm-01", password=users["farm-01"], ca_file=tls.ca)
        mallory = Client(broker.tls_port, "mallory", username="mallory", password=users["mallory"], ca_file=tls.ca)
        clients += [ha_user, device, mallory]
        ha = HomeAssistant("farm-01", [("leaf", "crop")])
        for topic, config in ha.discovery():
            assert device.publish(topic, config, retain=True), topic
        state_t, state = ha.states(0.0, force=True)[0]
        assert device.publish(state_t, state, retain=True)
        # another device can neither announce entities under farm-01's node nor write its state
        assert not mallory.publish(ha.discovery()[0][0], {"name": "fake"}, retain=True)
        assert not mallory.publish(state_t, {"results": 999}, retain=True)
        assert mallory.publish(HomeAssistant("mallory", []).discovery()[0][0], {"name": "own"}, retain=True)
        # Home Assistant's user reads them all and may not publish commands
        wanted = {t for t, _ in ha.discovery()} | {state_t}
        assert wait_for(lambda: wanted <= {m.topic for m in list(ha_user.messages)}, 10)
        assert all(json.loads(m.payload) != {"name": "fake"} for m in list(ha_user.messages))
        assert not ha_user.publish(codec.command_topic("farm-01", "ping"), b'{"id": "x"}')
    finally:
        for client in clients:
            client.close()
        broker.close()


def test_the_agent_service_announces_itself_when_enabled(tmp_path: Path) -> None:
    """The composition root wires it: a real Service (tiny classifier, folder source) over a fake broker."""
    from edge_agent.agent.service import Service
    from edge_agent.config import load_config
    from edge_agent.transport.fake import FakeBroker
    from tests.support.onnx_models import classifier_manifest, tiny_classifier, write_bundle
    from tests.test_service import LABELS, fake_transports, png, write_config

    models = tmp_path / "models"
    (models / "tiny_leaf").mkdir(parents=True)
    onnx_path = tiny_classifier(models / "tiny_leaf" / "model.onnx", n_classes=len(LABELS))
    write_bundle(models / "tiny_leaf", classifier_manifest(onnx_path, LABELS, name="tiny_leaf"))
    cfg = load_config(write_config(tmp_path, models, mqtt="mqtt:\n  heartbeat_s: 0.2\n",
                                   extra="home_assistant:\n  enabled: true\n  discovery_prefix: ha\n"))
    broker = FakeBroker()
    service = Service(cfg, transport_factory=fake_transports(broker))
    service.start()
    try:
        for i in range(3):
            (tmp_path / "inbox" / f"leaf{i}.png").write_bytes(png(i))
        state_t = state_topic("dev-1", "crop")

        def state() -> dict[str, Any]:
            found = dict(broker.retained_for(state_t))
            return json.loads(found[state_t]) if state_t in found else {}

        assert wait_for(lambda: state().get("results") == 3, 30), state()
        configs = dict(broker.retained_for("ha/#"))
        diagnosis = json.loads(configs["ha/sensor/dev-1/crop_diagnosis/config"])
        assert diagnosis["unique_id"] == "edge_agent_dev-1_crop_diagnosis"
        assert diagnosis["state_topic"] == state_t
        assert render(diagnosis["value_template"], state()) in {"healthy", "Apple_scab", "not recognised"}
        assert "ha/binary_sensor/dev-1/status/config" in configs
        backlog = json.loads(configs["ha/sensor/dev-1/backlog/config"])
        assert wait_for(lambda: any(t == codec.heartbeat_topic("dev-1") for t, _ in list(broker.published)), 10)
        heartbeats = [json.loads(p) for t, p in list(broker.published) if t == codec.heartbeat_topic("dev-1")]
        assert render(backlog["value_template"], heartbeats[-1]).isdigit()
    finally:
        service.stop()
