"""The paho adapter against a real Mosquitto: TLS, user names and passwords, failures that must not block."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.errors import ConfigError
from edge_agent.transport import topic_matches
from edge_agent.transport.base import MqttSettings
from edge_agent.transport.mqtt import PahoTransport
from tests.support.broker import Broker
from tests.support.delivery import start_agent, start_coordinator, wait_until
from tests.support.tls import TlsFiles, make_tls

USERS = {"dev1": "pw-dev1", "coord": "pw-coord"}


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("edge/v1/+/results/+", "edge/v1/d/results/crop", True),
        ("edge/v1/+/results/+", "edge/v1/d/results/crop/x", False),
        ("edge/v1/#", "edge/v1/d/status", True),
        ("edge/v1/d/ack", "edge/v1/d/ack", True),
        ("edge/v1/d/ack", "edge/v1/e/ack", False),
        ("$share/g/edge/v1/+/status", "edge/v1/d/status", True),
        ("edge/+", "edge/v1/d", False),
    ],
)
def test_topic_matching(flt: str, topic: str, expected: bool) -> None:
    assert topic_matches(flt, topic) is expected


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return make_tls(tmp_path / "tls")


@pytest.fixture
def tls_broker(tmp_path: Path, tls: TlsFiles) -> Iterator[Broker]:
    broker = Broker(tmp_path / "broker", users=USERS, tls=tls)
    broker.start()
    yield broker
    broker.close()


def test_delivery_over_tls_with_passwords(tmp_path: Path, tls: TlsFiles, tls_broker: Broker) -> None:
    coordinator = start_coordinator(
        tmp_path / "c.db", tls_broker.port, username="coord", password=USERS["coord"], ca_file=tls.ca
    )
    agent = start_agent(tmp_path / "a", tls_broker.port, username="dev1", password=USERS["dev1"], ca_file=tls.ca)
    try:
        accepted = agent.feed([f"t{i}" for i in range(50)])
        wait_until(lambda: agent.outbox.stats().backlog == 0, 30, "delivered over TLS")
        assert coordinator.store.count_results("dev1") == len(accepted) == 50
        assert "pw-dev1" not in repr(agent.transport.settings)  # secrets stay out of logs and reprs
    finally:
        agent.stop()
        coordinator.stop()


@pytest.mark.parametrize("fault", ["wrong_ca", "wrong_password", "plain_tcp"])
def test_refused_connections_leave_the_agent_degraded_not_blocked(
    tmp_path: Path, tls: TlsFiles, tls_broker: Broker, fault: str
) -> None:
    other_ca = make_tls(tmp_path / "other").ca
    ca = {"wrong_ca": other_ca, "wrong_password": tls.ca, "plain_tcp": None}[fault]
    password = "nope" if fault == "wrong_password" else USERS["dev1"]
    agent = start_agent(tmp_path / "a", tls_broker.port, username="dev1", password=password, ca_file=ca)
    try:
        assert agent.accept("x1")  # accepting works without a broker
        wait_until(lambda: tls_broker.read_log().count("New connection") >= 1, 10, "a connection attempt")
        assert agent.publisher.state == "degraded"
        assert agent.outbox.stats().backlog == 1
        assert not agent.transport.connected
    finally:
        agent.stop()


def test_missing_certificate_fails_fast_with_a_config_error(tmp_path: Path) -> None:
    transport = PahoTransport(MqttSettings(tls=True, ca_file=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError) as info:
        transport.start(object())  # type: ignore[arg-type]
    assert "tls" in info.value.message
