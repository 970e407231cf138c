"""The transport interface: a small publish/subscribe contract that the publisher and coordinator use.

Implementations: ``edge_agent.transport.mqtt.PahoTransport`` (MQTT 5 over paho-mqtt, the only
module importing paho) and ``edge_agent.transport.fake.FakeTransport`` (in-memory, for tests).
Callbacks on the listener may arrive on any thread and must not block: queue and return.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Will:
    """Last will: published by the broker when the connection dies without a clean disconnect."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class MqttSettings:
    """How to reach the broker. Secrets stay out of ``repr``."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    keepalive_s: int = 30
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    clean_start: bool = True
    session_expiry_s: int = 0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 5.0
    max_inflight: int = 1000
    manual_ack: bool = False
    connect_timeout_s: float = 10.0


@dataclass(frozen=True)
class InboundMessage:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    token: int = 0
    """Transport-specific handle for ``Transport.ack`` (the MQTT packet id)."""


class TransportListener(Protocol):
    def on_connected(self, session_present: bool) -> None: ...

    def on_disconnected(self, reason: str) -> None: ...

    def on_message(self, message: InboundMessage) -> None: ...

    def on_published(self, token: int, ok: bool, reason: str) -> None:
        """The broker answered publish ``token``: ``ok`` False means it refused it (e.g. MQTT 5 0x87)."""


class Transport(Protocol):
    @property
    def connected(self) -> bool: ...

    def start(self, listener: TransportListener) -> None:
        """Begin connecting in the background and keep reconnecting; never blocks."""

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the will is not sent) and stop background work."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        """Hand a message to the broker connection; returns a token for ``on_published`` or None if not sent."""

    def subscribe(self, filters: Sequence[str], qos: int = 1) -> None: ...

    def ack(self, message: InboundMessage) -> None:
        """Acknowledge an inbound QoS 1 message (only meaningful with ``manual_ack``)."""


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching with ``+`` and ``#``; ``$share/<group>/`` prefixes are stripped."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    fparts, tparts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(fparts):
        if part == "#":
            return True
        if i >= len(tparts) or (part != "+" and part != tparts[i]):
            return False
    return len(fparts) == len(tparts)
