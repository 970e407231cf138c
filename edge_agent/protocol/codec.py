"""MQTT topics and payloads of edge-agent (protocol version 1). Pure: no I/O, no globals that change.

Topics (``<device>`` and ``<pipeline>`` match ``[A-Za-z0-9_.-]{1,64}``)::

    edge/v1/<device>/results/<pipeline>   agent -> coordinator   result      QoS 1
    edge/v1/<device>/ack                  coordinator -> agent   ack         QoS 1, never retained
    edge/v1/<device>/status               agent (and its will)   status      QoS 1, retained
    edge/v1/<device>/heartbeat            agent                  heartbeat   QoS 1
    edge/v1/<device>/events               agent                  event       QoS 1
    edge/v1/<device>/cmd/<name>           operator -> agent      command     QoS 1

Every payload is a JSON object with ``"v": 1`` and ``"kind"``; the JSON Schemas live in
``edge_agent/protocol/schemas/<kind>.json`` and ``docs/mqtt.md`` explains them. Acks, commands and results may
carry an Ed25519 signature (``sig``, see ``signing.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from edge_agent.errors import EdgeAgentError

PROTOCOL_VERSION = 1
ROOT = "edge/v1"
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TopicKind = Literal["results", "ack", "status", "heartbeat", "events", "cmd"]
_SINGLE = ("ack", "status", "heartbeat", "events")


class CodecError(EdgeAgentError):
    """A payload or topic that does not follow the protocol."""

    code = "payload_invalid"


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` when it is a valid topic level (device id, pipeline, command name)."""
    if not NAME_RE.match(name):
        raise CodecError(f"invalid {what} {name!r}: expected [A-Za-z0-9_.-]{{1,64}}")
    return name


def results_topic(device: str, pipeline: str) -> str:
    return f"{ROOT}/{check_name(device, 'device')}/results/{check_name(pipeline, 'pipeline')}"


def ack_topic(device: str) -> str:
    return f"{ROOT}/{check_name(device, 'device')}/ack"


def status_topic(device: str) -> str:
    return f"{ROOT}/{check_name(device, 'device')}/status"


def heartbeat_topic(device: str) -> str:
    return f"{ROOT}/{check_name(device, 'device')}/heartbeat"


def events_topic(device: str) -> str:
    return f"{ROOT}/{check_name(device, 'device')}/events"


def command_topic(device: str, name: str) -> str:
    return f"{ROOT}/{check_name(device, 'device')}/cmd/{check_name(name, 'command')}"


def command_filter(device: str) -> str:
    """Subscription filter for every command addressed to ``device``."""
    return f"{ROOT}/{check_name(device, 'device')}/cmd/+"


def coordinator_filters(share_group: str | None = None) -> list[str]:
    """What a coordinator subscribes to; results optionally through ``$share/<group>/``."""
    results = f"{ROOT}/+/results/+"
    if share_group:
        results = f"$share/{check_name(share_group, 'share group')}/{results}"
    return [results, f"{ROOT}/+/status", f"{ROOT}/+/heartbeat", f"{ROOT}/+/events"]


@dataclass(frozen=True)
class Topic:
    """A parsed topic: ``device``, ``kind`` and, for results and commands, ``name`` (pipeline or command)."""

    device: str
    kind: TopicKind
    name: str | None = None


def parse_topic(topic: str) -> Topic:
    """Parse an ``edge/v1/...`` topic; raises CodecError for anything else."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != "edge" or parts[1] != "v1" or not NAME_RE.match(parts[2]):
        raise CodecError(f"not an edge/v1 topic: {topic[:200]!r}")
    device, kind = parts[2], parts[3]
    if len(parts) == 4 and kind in _SINGLE:
        return Topic(device, kind)  # type: ignore[arg-type]
    if len(parts) == 5 and kind in ("results", "cmd") and NAME_RE.match(parts[4]):
        return Topic(device, kind, parts[4])  # type: ignore[arg-type]
    raise CodecError(f"unknown edge/v1 topic: {topic[:200]!r}")


def dumps(payload: dict[str, Any]) -> bytes:
    """Encode a payload as compact UTF-8 JSON (NaN/inf become null, as orjson does)."""
    return orjson.dumps(payload)


def loads(data: bytes, *, max_bytes: int = 1 << 20) -> dict[str, Any]:
    """Decode a JSON object; raises CodecError for non-JSON, invalid UTF-8, NaN, non-objects or oversize."""
    if len(data) > max_bytes:
        raise CodecError(f"payload of {len(data)} bytes exceeds {max_bytes}")
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"payload is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CodecError("payload is not a JSON object")
    return value


def result_payload(
    *,
    device: str,
    epoch: str,
    base: int,
    result_id: str,
    seq: int,
    input_id: str,
    pipeline: str,
    model: str,
    model_version: str,
    created_at: float,
    sent_at: float,
    body: dict[str, Any],
) -> dict[str, Any]:
    """A result message. ``base``: every seq below it (same epoch) is settled on the agent (acked or dropped)."""
    return {
        "v": PROTOCOL_VERSION,
        "kind": "result",
        "device": device,
        "epoch": epoch,
        "base": base,
        "result_id": result_id,
        "seq": seq,
        "input_id": input_id,
        "pipeline": pipeline,
        "model": model,
        "model_version": model_version,
        "created_at": created_at,
        "sent_at": sent_at,
        "body": body,
    }


def ack_payload(*, device: str, epoch: str, seq: int, ts: float, exp: float | None = None) -> dict[str, Any]:
    """Cumulative acknowledgement: every result of ``device``/``epoch`` with seq <= ``seq`` is committed.

    ``exp``: the ack is void after this time (checked by agents that verify ack signatures)."""
    payload: dict[str, Any] = {
        "v": PROTOCOL_VERSION, "kind": "ack", "device": device, "epoch": epoch, "seq": seq, "ts": ts
    }
    if exp is not None:
        payload["exp"] = exp
    return payload


def status_payload(*, device: str, state: Literal["online", "offline"], ts: float) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "kind": "status", "device": device, "state": state, "ts": ts}


def heartbeat_payload(
    *,
    device: str,
    ts: float,
    state: str,
    uptime_s: float,
    outbox: dict[str, Any],
    publisher: dict[str, Any],
    health: dict[str, Any],
) -> dict[str, Any]:
    return {
        "v": PROTOCOL_VERSION,
        "kind": "heartbeat",
        "device": device,
        "ts": ts,
        "state": state,
        "uptime_s": round(uptime_s, 3),
        "outbox": outbox,
        "publisher": publisher,
        "health": health,
    }


def event_payload(
    *, device: str, ts: float, event: str, severity: Literal["info", "warning", "alarm"], data: dict[str, Any]
) -> dict[str, Any]:
    return {
        "v": PROTOCOL_VERSION,
        "kind": "event",
        "device": device,
        "ts": ts,
        "event": event,
        "severity": severity,
        "data": data,
    }


@dataclass(frozen=True)
class Ack:
    device: str
    epoch: str
    seq: int


MAX_ACK_BYTES = 4096


def parse_ack(data: bytes) -> Ack:
    """Decode and check an ack payload."""
    return parse_ack_value(loads(data, max_bytes=MAX_ACK_BYTES))


def parse_ack_value(value: dict[str, Any]) -> Ack:
    """Check a decoded ack payload (its signature is checked by the caller, on the same ``value``)."""
    device, epoch, seq = value.get("device"), value.get("epoch"), value.get("seq")
    if (
        value.get("kind") != "ack"
        or not isinstance(device, str)
        or not isinstance(epoch, str)
        or not isinstance(seq, int)
        or isinstance(seq, bool)
        or seq < 0
    ):
        raise CodecError("malformed ack")
    return Ack(device, epoch, seq)


_RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "device": (str,),
    "epoch": (str,),
    "base": (int,),
    "result_id": (str,),
    "seq": (int,),
    "input_id": (str,),
    "pipeline": (str,),
    "model": (str,),
    "model_version": (str,),
    "created_at": (float, int),
    "body": (dict,),
}


def parse_result(data: bytes, *, max_bytes: int = 1 << 20) -> dict[str, Any]:
    """Decode a result payload and check the fields the coordinator relies on (types, not the body)."""
    value = loads(data, max_bytes=max_bytes)
    if value.get("kind") != "result" or value.get("v") != PROTOCOL_VERSION:
        raise CodecError("not a v1 result payload")
    for key, types in _RESULT_FIELDS.items():
        item = value.get(key)
        if not isinstance(item, types) or isinstance(item, bool):
            raise CodecError(f"result field {key!r} missing or of the wrong type")
    if value["seq"] < 1 or value["base"] < 1:
        raise CodecError("result seq and base must be >= 1")
    return value
