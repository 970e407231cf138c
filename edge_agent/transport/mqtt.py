"""MQTT 5 transport over paho-mqtt 2.x: the only module that imports paho.

paho keeps QoS 1 messages in memory only and its ``is_published()`` breaks for messages published
while disconnected, so this adapter reports delivery solely through ``on_published`` (from paho's
``on_publish``, with the MQTT 5 reason code) and refuses to publish while disconnected.
"""

from __future__ import annotations

import logging
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
        client = paho.Client(
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
