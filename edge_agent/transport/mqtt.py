"""MQTT 5 transport over paho-mqtt 2.x: the only module that imports paho.

paho keeps QoS 1 messages in memory only and its ``is_published()`` breaks for messages published
while disconnected, so this adapter reports delivery solely through ``on_published`` (from paho's
``on_publish``, with the MQTT 5 reason code) and refuses to publish while disconnected.

paho leaves Nagle's algorithm on, and so does Mosquitto by default (``set_tcp_nodelay false``): a small
PUBLISH written while an earlier segment is still unacknowledged then waits for the broker's delayed
TCP ACK (40 ms on Linux), which made publish-to-PUBACK p99 40-50 ms whenever publishes came in bursts.
Every socket this adapter opens gets ``TCP_NODELAY``. The same stall happens the other way round: a
broker with Nagle on (Mosquitto's default) holds a PUBACK until we have ACKed its previous segment,
and Linux delays that ACK; so after each read of the socket the client asks for the ACK at once
(``TCP_QUICKACK``, Linux only). Together they took publish-to-PUBACK p99 under inference load on a
2-core board from ~45 ms to ~11 ms.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent.errors import ConfigError
from edge_agent.transport.base import InboundMessage, MqttSettings, TransportListener, Will

log = logging.getLogger(__name__)
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class _Client(paho.Client):
    """paho's client, sending the TCP ACK for whatever it has just read at once (see the module docstring)."""

    quickacks = 0

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        setsockopt = getattr(self._sock, "setsockopt", None)
        if _QUICKACK is not None and setsockopt is not None:
            try:
                setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                self.quickacks += 1
            except OSError:  # not a TCP socket, or closed meanwhile
                pass
        return rc


class PahoTransport:
    """Transport over one paho client with its own network thread; reconnects forever with backoff."""

    def __init__(self, settings: MqttSettings, will: Will | None = None) -> None:
        self.settings = settings
        self.will = will
        self._client: paho.Client | None = None
        self._listener: TransportListener | None = None

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected()

    def _build(self) -> paho.Client:
        s = self.settings
        client = _Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=True,
            manual_ack=s.manual_ack,
        )
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            try:
                client.tls_set(
                    ca_certs=s.ca_file, certfile=s.cert_file, keyfile=s.key_file, tls_version=ssl.PROTOCOL_TLS_CLIENT
                )
            except (OSError, ValueError, ssl.SSLError) as exc:
                raise ConfigError(f"mqtt tls: cannot load certificates: {exc}") from exc
        if self.will is not None:
            client.will_set(self.will.topic, self.will.payload, qos=self.will.qos, retain=self.will.retain)
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(0)
        low = max(1, round(s.reconnect_min_s))
        client.reconnect_delay_set(min_delay=low, max_delay=max(low, round(s.reconnect_max_s)))
        client.connect_timeout = s.connect_timeout_s
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def start(self, listener: TransportListener) -> None:
        self._listener = listener
        client = self._build()
        self._client = client
        props: Properties | None = None
        if self.settings.session_expiry_s > 0:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.settings.session_expiry_s
        client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive_s,
            clean_start=self.settings.clean_start,
            properties=props,
        )
        client.loop_start()
        log.info("mqtt: connecting to %s:%d as %r", self.settings.host, self.settings.port, self.settings.client_id)

    def stop(self, timeout: float = 5.0) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.disconnect()
        finally:
            client.loop_stop()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        client = self._client
        if client is None or not client.is_connected():
            return None
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.debug("mqtt: publish to %s not sent: %s", topic, paho.error_string(info.rc))
            return None
        return int(info.mid)

    def subscribe(self, filters: Sequence[str], qos: int = 1) -> None:
        client = self._client
        if client is None or not filters:
            return
        client.subscribe([(f, SubscribeOptions(qos=qos)) for f in filters])

    def ack(self, message: InboundMessage) -> None:
        client = self._client
        if client is not None and self.settings.manual_ack and message.qos > 0:
            client.ack(message.token, message.qos)

    # paho callbacks (network thread): translate and hand over, never block
    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        try:  # before CONNECT is written, on every (re)connect; see the module docstring
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError) as exc:  # not a TCP socket (e.g. a unix socket or websocket wrapper)
            log.debug("mqtt: cannot set TCP_NODELAY: %s", exc)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("mqtt: connection refused: %s", reason)
            return
        log.info("mqtt: connected to %s:%d", self.settings.host, self.settings.port)
        if self._listener is not None:
            self._listener.on_connected(bool(flags.session_present))

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        log.debug("mqtt: connect to %s:%d failed", self.settings.host, self.settings.port)
        if self._listener is not None:
            self._listener.on_disconnected("connect failed")

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        log.warning("mqtt: disconnected: %s", reason)
        if self._listener is not None:
            self._listener.on_disconnected(str(reason))

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if self._listener is not None:
            self._listener.on_published(int(mid), not reason.is_failure, str(reason))

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self._listener is not None:
            self._listener.on_message(InboundMessage(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), msg.mid))
