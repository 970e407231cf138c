"""MQTT topics and payloads of edge-agent (protocol version 1). Pure: no I/O, no globals that change.

Topics (``<device>`` and ``<pipeline>`` match ``[A-Za-z0-9_.-]{1,64}``)::

    edge/v1/<device>/results/<pipeline>   agent -> coordinator   result      QoS 1
    edge/v1/<device>/ack                  coordinator -> agent   ack         QoS 1, never retained
    edge/v1/<device>/status               agent (and its will)   status      QoS 1, retained
    edge/v1/<device>/heartbeat            agent                  heartbeat   QoS 1
    edge/v1/<device>/events               agent                  event       QoS 1
    edge/v1/<device>/cmd/<name>           operator -> agent      command     QoS 1
    edge/v1/coordinator/status            coordinator (+ will)   coordinator QoS 1, retained

Every payload is a JSON object with ``"v": 1`` and ``"kind"``; the JSON Schemas live in
``edge_agent/protocol/schemas/<kind>.json`` and ``docs/mqtt.md`` explains them. Acks, commands and results may
carry an Ed25519 signature (``sig``, see ``signing.py``). ``coordinator`` is reserved: no device may take
that id.

What the coordinator accepts from devices is checked here, before anything reaches a store
(:func:`parse_device_message`): sizes, JSON nesting depth, integer ranges that fit a signed 64-bit
column, ``base <= seq + 1``, string lengths without control characters, names that fit topics, and a
``device`` that matches the topic. A refusal is a :class:`CodecError` whose ``reason`` is a stable code
(``REASONS``), which the coordinator records with the quarantined message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.errors import EdgeAgentError

PROTOCOL_VERSION = 1
ROOT = "edge/v1"
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
COORDINATOR = "coordinator"
"""Reserved topic level: ``edge/v1/coordinator/status`` is the coordinator's own availability."""
TopicKind = Literal["results", "ack", "status", "heartbeat", "events", "cmd"]
_SINGLE = ("ack", "status", "heartbeat", "events")
INT64_MAX = 2**63 - 1
MAX_DEPTH = 64
"""Deepest JSON nesting accepted from a device (orjson encodes up to 254 levels; real payloads use < 8)."""
MAX_STATUS_BYTES = 4096
MAX_EVENT_BYTES = 256 * 1024
"""Largest event accepted from a device (a ``part_rejected`` with its largest heat map is about 90 KB)."""
REASONS = (
    "payload_invalid",  # generic
    "topic_invalid",  # not an edge/v1 device topic, or the reserved name
    "too_large",  # over the size limit of its kind
    "not_json",  # not UTF-8 JSON, NaN/Infinity, not an object
    "too_deep",  # nested deeper than MAX_DEPTH
    "kind_invalid",  # wrong "v" or "kind" for its topic
    "device_mismatch",  # "device" differs from the topic's device
    "int_out_of_range",  # seq/base outside [1, 2^63 - 1]
    "seq_invalid",  # base > seq + 1
    "field_invalid",  # any other field of the wrong type, size or pattern
)


class CodecError(EdgeAgentError):
    """A payload or topic that does not follow the protocol; ``reason`` is one of ``REASONS``."""

    code = "payload_invalid"

    def __init__(self, message: str, reason: str = "payload_invalid") -> None:
        super().__init__(message)
        self.reason = reason


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` when it is a valid topic level (device id, pipeline, command name).

    A device may not be called ``coordinator`` (the coordinator's availability topic).
    """
    if not NAME_RE.match(name):
        raise CodecError(f"invalid {what} {name!r}: expected [A-Za-z0-9_.-]{{1,64}}", "topic_invalid")
    if what == "device" and name == COORDINATOR:
        raise CodecError(f"device id {COORDINATOR!r} is reserved for the coordinator", "topic_invalid")
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
    """Parse an ``edge/v1/...`` topic; raises CodecError for anything else (the coordinator's own included)."""
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != "edge" or parts[1] != "v1" or not NAME_RE.match(parts[2]):
        raise CodecError(f"not an edge/v1 topic: {topic[:200]!r}", "topic_invalid")
    device, kind = parts[2], parts[3]
    if device == COORDINATOR:
        raise CodecError(f"not a device topic: {topic[:200]!r}", "topic_invalid")
    if len(parts) == 4 and kind in _SINGLE:
        return Topic(device, kind)  # type: ignore[arg-type]
    if len(parts) == 5 and kind in ("results", "cmd") and NAME_RE.match(parts[4]):
        return Topic(device, kind, parts[4])  # type: ignore[arg-type]
    raise CodecError(f"unknown edge/v1 topic: {topic[:200]!r}", "topic_invalid")


def dumps(payload: dict[str, Any]) -> bytes:
    """Encode a payload as compact UTF-8 JSON (NaN/inf become null, as orjson does)."""
    return orjson.dumps(payload)


def loads(data: bytes, *, max_bytes: int = 1 << 20, max_depth: int | None = None) -> dict[str, Any]:
    """Decode a JSON object; raises CodecError for non-JSON, invalid UTF-8, NaN, non-objects, oversize or
    (with ``max_depth``) nesting deeper than that."""
    if len(data) > max_bytes:
        raise CodecError(f"payload of {len(data)} bytes exceeds {max_bytes}", "too_large")
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        reason = "too_deep" if "depth" in str(exc) else "not_json"
        raise CodecError(f"payload is not valid JSON: {exc}", reason) from exc
    if not isinstance(value, dict):
        raise CodecError("payload is not a JSON object", "not_json")
    if (
        max_depth is not None
        and data.count(b"[") + data.count(b"{") > max_depth  # cheap bound: no deeper than its opening brackets
        and json_depth(value, max_depth) > max_depth
    ):
        raise CodecError(f"payload nested deeper than {max_depth} levels", "too_deep")
    return value


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of decoded JSON (a scalar is 0, ``{}`` and ``[]`` are 1), counted up to ``limit + 1``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((child, depth) for child in children if isinstance(child, dict | list))
    return deepest


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


# ---------------------------------------------------------------- what a device may send (coordinator side)
_NO_CONTROL = r"^[^\x00-\x1f\x7f]{1,%d}$"
DeviceName = Annotated[str, Field(pattern=NAME_RE.pattern)]
Text64 = Annotated[str, Field(pattern=_NO_CONTROL % 64)]
Text256 = Annotated[str, Field(pattern=_NO_CONTROL % 256)]
Seq = Annotated[int, Field(ge=1, le=INT64_MAX)]
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
Timestamp = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Message(BaseModel):
    """Strict (no coercion: ``"1"`` is not 1, ``true`` is not an int); unknown fields are ignored (v1 is additive)."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    v: Literal[1]
    device: DeviceName


class ResultMessage(_Message):
    kind: Literal["result"]
    epoch: Text64
    base: Seq
    result_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    seq: Seq
    input_id: Text256
    pipeline: DeviceName
    model: Text256
    model_version: Text256
    created_at: Timestamp
    sent_at: Timestamp | None = None
    body: dict[str, Any]


class StatusMessage(_Message):
    kind: Literal["status"]
    state: Literal["online", "offline"]
    ts: Timestamp


class HeartbeatOutbox(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    backlog: Count
    bytes: Count
    oldest_age_s: Timestamp
    dropped: Count


class HeartbeatMessage(_Message):
    kind: Literal["heartbeat"]
    ts: Timestamp
    state: Literal["starting", "connected", "degraded", "stopped"]
    uptime_s: Timestamp
    outbox: HeartbeatOutbox
    publisher: dict[str, Any]
    health: dict[str, Any]


class EventMessage(_Message):
    kind: Literal["event"]
    ts: Timestamp
    event: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,64}$")]
    severity: Literal["info", "warning", "alarm"]
    data: dict[str, Any]


class _Data(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class FeedbackTotals(_Data):
    false_reject: Count
    missed_defect: Count


FeedbackKind = Literal["false_reject", "missed_defect"]


class FeedbackData(_Data):
    """The data of an ``inspection_feedback`` event (schema ``feedback.json``); what the coordinator reads of it."""

    pipeline: DeviceName
    result_id: Text256
    input_id: Text256
    part_id: Text256 | None = None
    kind: FeedbackKind
    verdict: Literal["pass", "fail"] | None
    score: Annotated[float, Field(allow_inf_nan=False)] | None
    threshold: Annotated[float, Field(allow_inf_nan=False)] | None
    model: Text256
    model_version: Text256
    operator: Annotated[str, Field(pattern=_NO_CONTROL % 64)] | None = None
    note: Annotated[str, Field(max_length=500)] | None = None
    via: Literal["http", "mqtt"]
    at: Timestamp
    inspected_at: Timestamp | None = None
    replaces: FeedbackKind | None = None
    totals: FeedbackTotals


class LivestockEntry(_Data):
    """One entry of a livestock result's ``alerts`` / ``reports`` (``livestock.json``): what the coordinator reads."""

    type: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,54}$")]
    ts: Timestamp
    state: Literal["active", "cleared"] | None = None


class LivestockEventData(LivestockEntry):
    """The data of a ``livestock_<type>`` event (``livestock.json#/$defs/event_data``)."""

    pipeline: DeviceName
    source: Annotated[str, Field(pattern=r"^[^\x00-\x1f\x7f]{0,256}$")]
    input_id: Text256
    result_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")] | None


FEEDBACK_EVENT = "inspection_feedback"
LIVESTOCK_PREFIX = "livestock_"


def check_event_data(message: EventMessage) -> FeedbackData | LivestockEventData | None:
    """The typed data of the events the coordinator interprets (operator feedback, livestock alerts and reports);
    None for others (stored as they are, within the message's size and depth limits). Raises CodecError."""
    if message.event == FEEDBACK_EVENT:
        data: FeedbackData | LivestockEventData = _validate_data(FeedbackData, message.data)
        return data
    if message.event.startswith(LIVESTOCK_PREFIX):
        livestock: LivestockEventData = _validate_data(LivestockEventData, message.data)
        if message.event != LIVESTOCK_PREFIX + livestock.type:
            raise CodecError(f"event {message.event!r} does not match its data type {livestock.type!r}",
                             "field_invalid")
        return livestock
    return None


def _validate_data(model: type[_Data], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise CodecError(f"field 'data.{field}': {first['msg']}", "field_invalid") from exc


DeviceMessage = ResultMessage | StatusMessage | HeartbeatMessage | EventMessage
_MODELS: dict[str, type[ResultMessage] | type[StatusMessage] | type[HeartbeatMessage] | type[EventMessage]] = {
    "results": ResultMessage,
    "status": StatusMessage,
    "heartbeat": HeartbeatMessage,
    "events": EventMessage,
}
_KINDS = {"results": "result", "status": "status", "heartbeat": "heartbeat", "events": "event"}


def _refusal(exc: ValidationError) -> CodecError:
    first = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    reason = "field_invalid"
    if first["loc"] in (("seq",), ("base",)) and first["type"] in ("less_than_equal", "greater_than_equal"):
        reason = "int_out_of_range"
    elif first["loc"] in (("v",), ("kind",)):
        reason = "kind_invalid"
    return CodecError(f"field {field!r}: {first['msg']}", reason)


def _validate(model: type[BaseModel], value: dict[str, Any]) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise _refusal(exc) from exc


def parse_device_message(
    topic: str, data: bytes, *, max_bytes: int = 1 << 20
) -> tuple[DeviceMessage, dict[str, Any]] | None:
    """Everything the coordinator accepts from a device, checked before it reaches a store.

    Returns the typed message and the decoded JSON it came from (what a signature covers, the whole
    heartbeat), or None for messages that carry nothing to store (a cleared retained status). Raises
    :class:`CodecError` with a ``reason`` from ``REASONS`` for anything else that is not a v1 message of
    the topic's kind, from the topic's device, within size, depth and range limits.
    """
    parsed = parse_topic(topic)
    if parsed.kind not in _MODELS:
        raise CodecError(f"devices do not publish on {topic[:200]!r}", "topic_invalid")
    if parsed.kind == "status":
        if not data:
            return None
        max_bytes = min(max_bytes, MAX_STATUS_BYTES)
    elif parsed.kind == "events":
        max_bytes = min(max_bytes, MAX_EVENT_BYTES)
    value = loads(data, max_bytes=max_bytes, max_depth=MAX_DEPTH)
    if value.get("v") != PROTOCOL_VERSION or value.get("kind") != _KINDS[parsed.kind]:
        raise CodecError(f"not a v1 {_KINDS[parsed.kind]} payload", "kind_invalid")
    message: DeviceMessage = _validate(_MODELS[parsed.kind], value)
    if message.device != parsed.device:
        raise CodecError(f"payload device {message.device!r} does not match its topic", "device_mismatch")
    if isinstance(message, ResultMessage):
        if message.pipeline != parsed.name:
            raise CodecError("result pipeline does not match its topic", "field_invalid")
        if message.base > message.seq + 1:
            raise CodecError(f"result base {message.base} > seq {message.seq} + 1", "seq_invalid")
    if isinstance(message, EventMessage):
        check_event_data(message)
    return message, value


def parse_result(data: bytes, *, max_bytes: int = 1 << 20) -> dict[str, Any]:
    """Decode a result payload, check it as :func:`parse_device_message` does (the topic aside), return the JSON."""
    value = loads(data, max_bytes=max_bytes, max_depth=MAX_DEPTH)
    if value.get("v") != PROTOCOL_VERSION or value.get("kind") != "result":
        raise CodecError("not a v1 result payload", "kind_invalid")
    result: ResultMessage = _validate(ResultMessage, value)
    if result.base > result.seq + 1:
        raise CodecError(f"result base {result.base} > seq {result.seq} + 1", "seq_invalid")
    return value


# ---------------------------------------------------------------- the coordinator's availability
def coordinator_alert_topic(rule: str) -> str:
    """Where the coordinator publishes fleet alerts (schema ``alert.json``; QoS 1, not retained)."""
    return f"{ROOT}/{COORDINATOR}/alerts/{check_name(rule, 'alert rule')}"


def coordinator_status_topic() -> str:
    return f"{ROOT}/{COORDINATOR}/status"


def coordinator_status_payload(
    *, state: Literal["online", "offline"], coordinator: str, session: str | None, ts: float
) -> dict[str, Any]:
    """Retained availability of the coordinator. ``session`` (online only) changes whenever the coordinator
    may have missed results (a new process, or a broker session that was lost): agents then re-send their
    unacknowledged tail at once."""
    payload: dict[str, Any] = {
        "v": PROTOCOL_VERSION, "kind": "coordinator", "state": state, "coordinator": coordinator[:64], "ts": ts
    }
    if session is not None:
        payload["session"] = session
    return payload


@dataclass(frozen=True)
class CoordinatorStatus:
    state: Literal["online", "offline"]
    session: str | None


def parse_coordinator_status(data: bytes) -> CoordinatorStatus:
    return parse_coordinator_status_value(loads(data, max_bytes=MAX_STATUS_BYTES, max_depth=8))


def parse_coordinator_status_value(value: dict[str, Any]) -> CoordinatorStatus:
    """Check a decoded coordinator status (its signature, if any, is checked by the caller on the same ``value``)."""
    state, session = value.get("state"), value.get("session")
    if value.get("kind") != "coordinator" or state not in ("online", "offline"):
        raise CodecError("malformed coordinator status", "kind_invalid")
    if state == "online" and not (isinstance(session, str) and 1 <= len(session) <= 64):
        raise CodecError("coordinator status online without a session", "field_invalid")
    return CoordinatorStatus(state, session if state == "online" else None)
