"""The paho adapter against a real Mosquitto: TLS, user names and passwords, failures that must not block."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.errors import ConfigError
from edge_agent.transport import FakeBroker, FakeTransport, InboundMessage, Transport, Will, topic_matches
from edge_agent.transport.base import MqttSettings
from edge_agent.transport.mqtt import PahoTransport, _Client
from tests.support.broker import Broker
from tests.support.delivery import start_agent, start_coordinator, wait_until
from tests.support.faultproxy import FaultProxy
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


# ---------------------------------------------------------------- one contract, both transports
class Inbox:
    def __init__(self) -> None:
        self.messages: list[InboundMessage] = []
        self.published: list[tuple[int, bool]] = []
        self.connected = threading.Event()
        self.filters: list[str] = []
        self.transport: Transport | None = None
        self.disconnects = 0

    def on_connected(self, session_present: bool) -> None:
        if self.transport is not None and self.filters:
            self.transport.subscribe(self.filters)
        self.connected.set()

    def on_disconnected(self, reason: str) -> None:
        self.disconnects += 1
        self.connected.clear()

    def on_message(self, message: InboundMessage) -> None:
        self.messages.append(message)

    def on_published(self, token: int, ok: bool, reason: str) -> None:
        self.published.append((token, ok))

    def payloads(self, topic: str) -> list[bytes]:
        return [m.payload for m in list(self.messages) if m.topic == topic]


class Kit:
    """Makes connected transports of one kind; ``drop`` cuts one uncleanly (so its will fires)."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.fake = FakeBroker()
        self.broker: Broker | None = None
        self.proxies: list[FaultProxy] = []
        self.transports: list[Transport] = []
        if kind == "paho":
            self.broker = Broker(tmp_path / "broker")
            self.broker.start()

    def connect(self, inbox: Inbox, filters: list[str], will: Will | None = None) -> Transport:
        inbox.filters = filters
        transport: Transport
        if self.broker is None:
            transport = FakeTransport(self.fake, will)
        else:
            proxy = FaultProxy(self.broker.port)
            self.proxies.append(proxy)
            settings = MqttSettings(port=proxy.port, client_id=f"c{len(self.transports)}", keepalive_s=5)
            transport = PahoTransport(settings, will)
        inbox.transport = transport
        transport.start(inbox)
        self.transports.append(transport)
        wait_until(inbox.connected.is_set, 10, "connected")
        return transport

    def drop(self, transport: Transport) -> None:
        if isinstance(transport, FakeTransport):
            transport.kill()
        else:
            self.proxies[self.transports.index(transport)].reset()

    def close(self) -> None:
        for transport in self.transports:
            transport.stop()
        for proxy in self.proxies:
            proxy.close()
        if self.broker is not None:
            self.broker.close()


@pytest.fixture(params=["fake", "paho"])
def kit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Kit]:
    k = Kit(request.param, tmp_path)
    yield k
    k.close()


def test_contract_publish_subscribe_confirm(kit: Kit) -> None:
    sub, pub = Inbox(), Inbox()
    kit.connect(sub, ["edge/v1/+/results/+"])
    sender = kit.connect(pub, [])
    token = sender.publish("edge/v1/d/results/p", b"r1", qos=1)
    assert token is not None
    wait_until(lambda: sub.payloads("edge/v1/d/results/p") == [b"r1"] and (token, True) in pub.published, 10, "r1")
    sender.publish("edge/v1/d/other", b"x", qos=1)  # not matching: not delivered
    sender.publish("edge/v1/d/results/p", b"r2", qos=1)
    wait_until(lambda: len(sub.payloads("edge/v1/d/results/p")) == 2, 10, "r2")
    assert sub.payloads("edge/v1/d/other") == []


def test_contract_retained_reaches_late_subscribers(kit: Kit) -> None:
    pub = Inbox()
    sender = kit.connect(pub, [])
    token = sender.publish("edge/v1/d/status", b"online", qos=1, retain=True)
    wait_until(lambda: (token, True) in pub.published, 10, "retained stored")
    late = Inbox()
    kit.connect(late, ["edge/v1/d/status"])
    wait_until(lambda: late.payloads("edge/v1/d/status") == [b"online"], 10, "retained delivered")


def test_contract_will_fires_on_an_unclean_drop_and_publish_needs_a_connection(kit: Kit) -> None:
    watcher, dying = Inbox(), Inbox()
    kit.connect(watcher, ["edge/v1/d/status"])
    transport = kit.connect(dying, [], Will("edge/v1/d/status", b"offline", qos=1, retain=True))
    kit.drop(transport)
    wait_until(lambda: watcher.payloads("edge/v1/d/status") == [b"offline"], 15, "will published")
    wait_until(lambda: dying.disconnects >= 1, 10, "drop noticed by the client")
    if kit.kind == "fake":  # (paho reconnects at once through the healed proxy)
        assert transport.publish("edge/v1/d/results/p", b"x") is None


def _nodelay(transport: PahoTransport) -> int:
    client = transport._client
    assert client is not None
    sock = client.socket()
    assert isinstance(sock, socket.socket)
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_paho_sockets_disable_nagle_and_ack_reads_at_once_also_after_a_reconnect(tmp_path: Path) -> None:
    """Nagle + delayed ACKs held small PUBLISHes and PUBACKs for up to 40 ms (publish p99 ~45 ms under load)."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    inbox = Inbox()
    transport = PahoTransport(MqttSettings(port=broker.port, client_id="nd", reconnect_min_s=0.5, reconnect_max_s=1))
    try:
        transport.start(inbox)
        wait_until(inbox.connected.is_set, 10, "connected")
        assert _nodelay(transport) != 0
        client = transport._client
        assert isinstance(client, _Client)
        wait_until(lambda: client.quickacks > 0, 5, "quick ACK after reading the CONNACK (paho calls our loop_read)")
        first = client.socket()
        broker.restart()
        wait_until(lambda: inbox.disconnects >= 1, 10, "drop noticed")
        wait_until(inbox.connected.is_set, 15, "reconnected")
        assert transport._client is not None and transport._client.socket() is not first
        assert _nodelay(transport) != 0
    finally:
        transport.stop()
        broker.close()


def test_refused_then_healed_link_connects_without_a_restart(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    proxy = FaultProxy(broker.port)
    proxy.set("refuse")
    agent = start_agent(tmp_path / "a", proxy.port)
    try:
        assert agent.accept("r1")
        wait_until(lambda: proxy.accepted >= 2, 10, "two refused attempts (the client keeps retrying)")
        assert agent.publisher.state == "degraded" and not agent.transport.connected
        proxy.set("pass")
        wait_until(lambda: agent.publisher.state == "connected", 10, "connected once the link heals")
    finally:
        agent.stop()
        proxy.close()
        broker.close()
