"""Send one command to a device and wait for its answer: what ``edge-coordinator command`` runs.

The command is built (and checked) here, signed with the operator's Ed25519 key, published once (QoS 1, never
retained) on ``edge/v1/<device>/cmd/<name>``; the answer is the device's ``command_result`` event with the same id.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.protocol import codec, signing
from edge_agent.protocol.commands import parse_command
from edge_agent.transport.base import InboundMessage, MqttSettings, Transport


def build_command(
    device: str,
    name: str,
    args: dict[str, Any],
    *,
    key: Ed25519PrivateKey | None,
    ttl_s: float = 300.0,
    command_id: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """A command payload naming ``device`` and ``name``, valid for ``ttl_s``, signed with ``key`` when given.

    Raises CommandError/CodecError for what the agent would refuse anyway (bad name, id or arguments)."""
    codec.check_name(device, "device")
    ts = time.time() if now is None else now
    payload: dict[str, Any] = {
        "v": 1,
        "id": command_id or f"op-{int(ts)}-{secrets.token_hex(4)}",
        "device": device,
        "name": name,
        "args": args,
        "ts": ts,
        "exp": ts + ttl_s,
    }
    parse_command(name, codec.dumps(payload))  # same checks as the agent's, before anything is sent
    return signing.sign(payload, key) if key is not None else payload


class _Waiter:
    """Transport listener: publishes the command once connected, then waits for its ``command_result``."""

    def __init__(self, transport: Transport, device: str, name: str, payload: dict[str, Any]) -> None:
        self.transport, self.device, self.name, self.payload = transport, device, name, payload
        self.sent = threading.Event()
        self.answered = threading.Event()
        self.answer: dict[str, Any] | None = None
        self.refused: str | None = None

    def on_connected(self, session_present: bool) -> None:
        if self.sent.is_set():
            return
        # the broker handles our SUBSCRIBE before our PUBLISH, so the answer cannot slip past us
        self.transport.subscribe([codec.events_topic(self.device)], qos=1)
        topic = codec.command_topic(self.device, self.name)
        if self.transport.publish(topic, codec.dumps(self.payload), qos=1, retain=False) is not None:
            self.sent.set()

    def on_disconnected(self, reason: str) -> None: ...

    def on_published(self, token: int, ok: bool, reason: str) -> None:
        if not ok:
            self.refused = reason
            self.answered.set()

    def on_message(self, message: InboundMessage) -> None:
        try:
            event = codec.loads(message.payload)
        except codec.CodecError:
            return
        data = event.get("data")
        if event.get("event") == "command_result" and isinstance(data, dict) and data.get("id") == self.payload["id"]:
            self.answer = data
            self.answered.set()


def send_command(
    transport: Transport, device: str, name: str, payload: dict[str, Any], *, wait_s: float, connect_s: float = 10.0
) -> dict[str, Any]:
    """Publish ``payload`` through ``transport`` and wait up to ``wait_s`` for the device's answer.

    Returns ``{"sent": bool, "answer": <command_result data> | None, "refused_by_broker": reason | None}``."""
    waiter = _Waiter(transport, device, name, payload)
    transport.start(waiter)
    try:
        sent = waiter.sent.wait(connect_s)
        if sent and wait_s > 0:
            waiter.answered.wait(wait_s)
        return {"sent": sent, "answer": waiter.answer, "refused_by_broker": waiter.refused}
    finally:
        transport.stop(2.0)


def operator_settings(base: MqttSettings) -> MqttSettings:
    """The operator's connection: a throw-away client id and session (never the coordinator's own)."""
    from dataclasses import replace

    return replace(base, client_id=f"{base.client_id}-cmd-{secrets.token_hex(4)}", clean_start=True,
                   session_expiry_s=0, manual_ack=False)
