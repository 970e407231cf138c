"""Device events as the coordinator stores them (pure: no I/O). The store writes :class:`EventRow`\\ s.

Where they come from:

* ``edge/v1/<device>/events`` messages, checked by ``codec.parse_device_message`` (operator feedback and
  livestock events against their schema) before any transaction;
* the ``alerts[]`` / ``reports[]`` of a livestock result's ``body.sector`` (the durable copies): each becomes
  the ``livestock_<type>`` event the agent also publishes live, with the same data.

De-duplication (``event_id``, the store's unique key):

* a livestock entry with a ``result_id`` is keyed by (device, result_id, the entry itself), so the live event
  and its durable copy in the result are one row, whichever arrives first (the other counts as a duplicate);
* any other event is keyed by its whole content (device, event, severity, ts, data). Events carry no id of
  their own, but an event the agent keeps in its outbox (``inspection_feedback``) is re-sent byte for byte
  (same ``ts``: when it was stored), and a QoS 1 re-delivery of a live one is identical too; two different
  live events differ at least in ``ts`` (when each was sent).

Bounds: the message itself is bounded by the codec (size, depth); a result gives at most
``MAX_RESULT_EVENTS`` entries of at most ``MAX_ENTRY_BYTES`` each (others are skipped and counted, the result
is stored all the same); a ``part_rejected`` event is stored without its heat map (the result has it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from edge_agent.protocol import codec

MAX_RESULT_EVENTS = 64
"""Livestock entries taken from one result at most (a frame decides a handful)."""
MAX_ENTRY_BYTES = 16 * 1024
"""A livestock entry larger than this (as JSON) is skipped (real ones are < 1 KB)."""
_REF_KEYS = ("pipeline", "source", "input_id", "result_id")


@dataclass(frozen=True)
class EventRow:
    """One device event to store. ``ts``: when it happened on the device (a livestock entry: the frame's capture
    time); ``subtype``: feedback ``kind`` or a livestock alert's ``state``; ``subject_ts``: when the part a feedback
    is about was inspected; ``via``: ``event`` (the events topic) or ``result`` (a result's durable copy)."""

    event_id: str
    device: str
    event: str
    severity: str
    ts: float
    received_at: float
    pipeline: str | None
    result_id: str | None
    subtype: str | None
    subject_ts: float | None
    via: Literal["event", "result"]
    data: bytes


def _digest(*parts: bytes) -> str:
    return hashlib.sha256(b"\x1f".join(parts)).hexdigest()[:32]


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def livestock_id(device: str, result_id: str, entry: dict[str, Any]) -> str:
    return _digest(b"livestock", device.encode(), result_id.encode(), _canonical(entry))


def livestock_severity(entry: dict[str, Any], report: bool) -> str:
    """The agent's rule (``agent.service._events_sink``): reports, crossings and clears are ``info``."""
    quiet = report or entry.get("type") == "line_crossed" or entry.get("state") == "cleared"
    return "info" if quiet else "warning"


def event_row(message: codec.EventMessage, received_at: float) -> EventRow:
    """The row of a checked event message (``codec.parse_device_message`` passed it)."""
    typed = codec.check_event_data(message)
    data = dict(message.data)
    if message.event == "part_rejected":
        data.pop("heatmap", None)  # up to ~90 KB a part; the result (durable) carries it
    pipeline = data.get("pipeline") if isinstance(data.get("pipeline"), str) else None
    if pipeline is not None and not codec.NAME_RE.match(pipeline):
        pipeline = None
    rid = data.get("result_id")
    result_id = rid if isinstance(rid, str) and len(rid) == 32 and all(c in "0123456789abcdef" for c in rid) else None
    subtype: str | None = None
    subject_ts: float | None = None
    ts = message.ts
    if isinstance(typed, codec.FeedbackData):
        subtype, subject_ts, result_id = typed.kind, typed.inspected_at, typed.result_id
    elif isinstance(typed, codec.LivestockEventData):
        subtype, ts = typed.state, typed.ts
        if typed.result_id is not None:
            entry = {k: v for k, v in data.items() if k not in _REF_KEYS}
            return EventRow(livestock_id(message.device, typed.result_id, entry), message.device, message.event,
                            message.severity, ts, received_at, typed.pipeline, typed.result_id, subtype, None, "event",
                            codec.dumps(data))
    event_id = _digest(b"event", message.device.encode(), message.event.encode(), message.severity.encode(),
                       repr(message.ts).encode(), _canonical(data))
    return EventRow(event_id, message.device, message.event, message.severity, ts, received_at, pipeline, result_id,
                    subtype, subject_ts, "event", codec.dumps(data))


def result_events(result: codec.ResultMessage, received_at: float) -> tuple[list[EventRow], int]:
    """The livestock alerts and reports of a checked result, as the rows of their live events; and how many
    entries were skipped (malformed, too large, beyond ``MAX_RESULT_EVENTS``). Never raises."""
    body = result.body
    sector = body.get("sector")
    if body.get("kind") != "livestock" or not isinstance(sector, dict):
        return [], 0
    entries: list[tuple[Any, bool]] = []
    for key, report in (("alerts", False), ("reports", True)):
        items = sector.get(key)
        if isinstance(items, list):
            entries += [(item, report) for item in items]
    source = body.get("source") if isinstance(body.get("source"), str) else ""
    ref = {"pipeline": result.pipeline, "source": source, "input_id": result.input_id, "result_id": result.result_id}
    rows: list[EventRow] = []
    skipped = max(0, len(entries) - MAX_RESULT_EVENTS)
    for item, report in entries[:MAX_RESULT_EVENTS]:
        try:
            if not isinstance(item, dict) or any(k in item for k in _REF_KEYS):
                raise codec.CodecError("not a livestock entry")
            entry = codec.LivestockEntry.model_validate(item)
            blob = codec.dumps({**ref, **item})
            if len(blob) > MAX_ENTRY_BYTES:
                raise codec.CodecError("livestock entry too large")
        except Exception:  # a malformed entry never costs the result
            skipped += 1
            continue
        rows.append(EventRow(
            livestock_id(result.device, result.result_id, item), result.device, codec.LIVESTOCK_PREFIX + entry.type,
            livestock_severity(item, report), entry.ts, received_at, result.pipeline, result.result_id, entry.state,
            None, "result", blob,
        ))
    return rows, skipped


def event_json(row: EventRow) -> dict[str, Any]:
    """An event as the API returns it."""
    try:
        data = orjson.loads(row.data)
    except orjson.JSONDecodeError:
        data = None
    return {"event_id": row.event_id, "device": row.device, "event": row.event, "severity": row.severity,
            "ts": row.ts, "received_at": row.received_at, "pipeline": row.pipeline, "result_id": row.result_id,
            "via": row.via, "data": data}

