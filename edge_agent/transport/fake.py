"""An in-memory broker and transport with MQTT-like semantics, for tests and demos.

``FakeBroker`` routes synchronously: retained messages, wildcards, ``$share`` groups (round robin),
last wills, a deny list of topic filters (publishes answered with "not authorized", like MQTT 5
reason code 0x87), and ``go_down()`` / ``come_up()`` to simulate an unreachable broker.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence

from edge_agent.transport.base import InboundMessage, TransportListener, Will, topic_matches


class FakeBroker:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._clients: list[FakeTransport] = []
        self.retained: dict[str, bytes] = {}
        self.denied: list[str] = []
        self.up = True
        self.published: list[tuple[str, bytes]] = []
        self._rr = itertools.count()

    def attach(self, client: FakeTransport) -> None:
        with self._lock:
            self._clients.append(client)
        if self.up:
            client.mark_connected()

    def detach(self, client: FakeTransport, *, send_will: bool) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
        if send_will and client.will is not None:
            self.route(client.will.topic, client.will.payload, client.will.retain)

    def go_down(self) -> None:
        with self._lock:
            self.up = False
            clients = list(self._clients)
        for client in clients:
            client.mark_disconnected("broker down")

    def come_up(self) -> None:
        with self._lock:
            self.up = True
            clients = list(self._clients)
        for client in clients:
            client.mark_connected()

    def route(self, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            self.published.append((topic, payload))
            if retain:
                if payload:
                    self.retained[topic] = payload
                else:
                    self.retained.pop(topic, None)
            plain: list[FakeTransport] = []
            groups: dict[str, list[FakeTransport]] = {}
            for client in self._clients:
                for flt in client.filters:
                    if client.connected and topic_matches(flt, topic):
                        if flt.startswith("$share/"):
                            groups.setdefault(flt.split("/")[1] + flt, []).append(client)
                        else:
                            plain.append(client)
                        break
            targets = plain + [members[next(self._rr) % len(members)] for members in groups.values()]
        for client in targets:
            client.deliver(InboundMessage(topic, payload, 1, False, 0))

    def retained_for(self, topic_filter: str) -> list[tuple[str, bytes]]:
        with self._lock:
            return [(t, p) for t, p in self.retained.items() if topic_matches(topic_filter, t)]


class FakeTransport:
    """A client of a FakeBroker implementing the Transport protocol."""

    def __init__(self, broker: FakeBroker, will: Will | None = None) -> None:
        self.broker = broker
        self.will = will
        self.filters: list[str] = []
        self.listener: TransportListener | None = None
        self._connected = False
        self._tokens = itertools.count(1)
        self.acked: list[InboundMessage] = []

    @property
    def connected(self) -> bool:
        return self._connected

    def start(self, listener: TransportListener) -> None:
        self.listener = listener
        self.broker.attach(self)

    def stop(self, timeout: float = 5.0) -> None:
        self._connected = False
        self.broker.detach(self, send_will=False)

    def kill(self) -> None:
        """Drop the connection uncleanly: the broker publishes the will and the client hears of the loss."""
        was_connected, self._connected = self._connected, False
        self.broker.detach(self, send_will=True)
        if was_connected and self.listener is not None:
            self.listener.on_disconnected("connection lost")

    def mark_connected(self) -> None:
        self.filters = []
        self._connected = True
        if self.listener is not None:
            self.listener.on_connected(False)

    def mark_disconnected(self, reason: str) -> None:
        if self._connected:
            self._connected = False
            if self.listener is not None:
                self.listener.on_disconnected(reason)
            if self.will is not None:
                self.broker.retained[self.will.topic] = self.will.payload

    def deliver(self, message: InboundMessage) -> None:
        if self.listener is not None:
            self.listener.on_message(message)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        if not self._connected:
            return None
        token = next(self._tokens)
        denied = any(topic_matches(flt, topic) for flt in self.broker.denied)
        if not denied:
            self.broker.route(topic, payload, retain)
        if self.listener is not None and qos > 0:
            self.listener.on_published(token, not denied, "Not authorized" if denied else "Success")
        return token

    def subscribe(self, filters: Sequence[str], qos: int = 1) -> None:
        self.filters.extend(filters)
        if self.listener is not None:
            for flt in filters:
                for topic, payload in self.broker.retained_for(flt):
                    self.listener.on_message(InboundMessage(topic, payload, 1, True, 0))

    def ack(self, message: InboundMessage) -> None:
        self.acked.append(message)
