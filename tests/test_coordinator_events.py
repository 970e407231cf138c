"""Device events at the coordinator: operator feedback and livestock alerts are checked, stored once (the live
livestock event and its durable copy in a result are one row), queried by the API with a keyset cursor, summed
into false-reject rates per line, pruned by retention, and bad ones are quarantined; on both stores, and through
a real Mosquitto."""

from __future__ import annotations

import json
import sqlite3
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

from edge_agent.auth.tokens import TokenSet
from edge_agent.coordinator.alerts import DeviceMeta
from edge_agent.coordinator.config import RetentionConfig
from edge_agent.coordinator.events import EventRow, event_row, result_events
from edge_agent.coordinator.http import HttpContext, create_app, dashboard_data
from edge_agent.coordinator.retention import Retention
from edge_agent.coordinator.service import Coordinator
from edge_agent.coordinator.store import EventQuery, ResultRow, SqliteStore, Store
from edge_agent.protocol import codec
from edge_agent.transport import FakeBroker, FakeTransport, InboundMessage
from edge_agent.transport.base import MqttSettings
from edge_agent.transport.mqtt import PahoTransport
from tests.fleet_fixtures import inspection, result_row
from tests.support.broker import Broker
from tests.support.wait import wait_for

T0 = 1_795_440_000.0


def _schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        resources.files("edge_agent.protocol").joinpath("schemas").joinpath(name).read_text())
    return loaded


FEEDBACK_SCHEMA = _schema("feedback.json")
LIVESTOCK_SCHEMA = _schema("livestock.json")
EVENT_DATA_SCHEMA = {"$defs": LIVESTOCK_SCHEMA["$defs"], "$ref": "#/$defs/event_data"}


def feedback(device: str, result_id: str, kind: str, at: float, *, inspected_at: float, pipeline: str = "line",
             replaces: str | None = None) -> dict[str, Any]:
    """An ``inspection_feedback`` event as the agent sends it (its data checked against feedback.json)."""
    data: dict[str, Any] = {
        "pipeline": pipeline, "result_id": result_id, "input_id": f"in-{result_id[:6]}", "part_id": None,
        "source": "cam", "kind": kind, "verdict": "fail" if kind == "false_reject" else "pass", "score": 5.2,
        "threshold": 4.6, "model": "m", "model_version": "1", "operator": "ann", "note": None, "via": "http",
        "at": at, "inspected_at": inspected_at, "totals": {"false_reject": 1, "missed_defect": 0},
    }
    if replaces:
        data["replaces"] = replaces
    jsonschema.validate(data, FEEDBACK_SCHEMA, cls=jsonschema.Draft202012Validator)
    return codec.event_payload(device=device, ts=at, event="inspection_feedback", severity="info", data=data)


STATIONARY = {"type": "animal_stationary", "ts": T0 + 12.1, "state": "active", "track_id": 1, "label": "cow",
              "since": T0 + 10.6, "duration_s": 1.5, "position": [0.4997, 0.2273], "box": [105.6, 12.8, 194.2, 214.5]}
DROP = {"type": "headcount_drop", "ts": T0 + 12.1, "state": "active", "zone": "crush", "count": 1, "baseline": 3,
        "baseline_from": "expected", "since": T0 - 120, "duration_s": 132.1}
HEADCOUNT = {"type": "headcount", "ts": T0 + 12.0, "start": T0 + 8, "end": T0 + 12, "frames": 40, "count": 1,
             "min": 1, "max": 2, "crossed_forward": 0, "crossed_backward": 0, "zones": []}


def herd_result(device: str, seq: int, alerts: list[Any], reports: list[Any]) -> dict[str, Any]:
    """A livestock result whose sector carries ``alerts`` and ``reports`` (the durable copies)."""
    sector = {"tracks": [], "in_frame": 1, "counts": {"unique": 1, "by_label": {"cow": 1}, "forward": 0,
              "backward": 0}, "zones": [], "alerts": alerts, "reports": reports, "captured_at": T0 + 12.1}
    return codec.result_payload(device=device, epoch="e1", base=1, result_id=f"{seq:032x}", seq=seq,
                                input_id=f"frame-{seq}", pipeline="herd", model="det", model_version="1",
                                created_at=T0 + seq, sent_at=T0 + seq,
                                body={"kind": "livestock", "source": "gate-cam", "predictions": [], "sector": sector})


def live(device: str, result: dict[str, Any], entry: dict[str, Any], severity: str = "warning") -> dict[str, Any]:
    """The live ``livestock_<type>`` event the agent publishes for one entry (``agent.service._events_sink``)."""
    data = {"pipeline": "herd", "source": "gate-cam", "input_id": result["input_id"],
            "result_id": result["result_id"], **entry}
    jsonschema.validate(data, EVENT_DATA_SCHEMA, cls=jsonschema.Draft202012Validator)
    return codec.event_payload(device=device, ts=T0 + 13, event=f"livestock_{entry['type']}",
                               severity=severity, data=data)  # type: ignore[arg-type]


def checked(topic: str, payload: dict[str, Any]) -> codec.DeviceMessage:
    found = codec.parse_device_message(topic, codec.dumps(payload))
    assert found is not None
    return found[0]


def rows_of_event(payload: dict[str, Any], received: float = T0 + 100) -> EventRow:
    message = checked(codec.events_topic(payload["device"]), payload)
    assert isinstance(message, codec.EventMessage)
    return event_row(message, received)


def rows_of_result(payload: dict[str, Any], received: float = T0 + 100) -> tuple[ResultRow, list[EventRow]]:
    message = checked(codec.results_topic(payload["device"], payload["pipeline"]), payload)
    assert isinstance(message, codec.ResultMessage)
    found, skipped = result_events(message, received)
    assert skipped == 0
    row = ResultRow(message.result_id, message.device, message.epoch, message.seq, message.base, message.input_id,
                    message.pipeline, message.model, message.model_version, message.created_at, received,
                    codec.dumps(payload))
    return row, found


# ------------------------------------------------------------------------------------------------ codec
@pytest.mark.parametrize(("change", "reason"), [
    (lambda p: p["data"].update(kind="maybe"), "field_invalid"),
    (lambda p: p["data"].pop("result_id"), "field_invalid"),
    (lambda p: p["data"].update(pipeline="a/b"), "field_invalid"),
    (lambda p: p["data"].update(at=-1), "field_invalid"),
    (lambda p: p["data"].update(totals={"false_reject": "1", "missed_defect": 0}), "field_invalid"),
    (lambda p: p.update(data=[]), "field_invalid"),
    (lambda p: p.update(event="Inspection feedback"), "field_invalid"),
    (lambda p: p.update(device="other"), "device_mismatch"),
    (lambda p: p["data"].update(note="x" * (codec.MAX_EVENT_BYTES + 1)), "too_large"),
])
def test_the_codec_refuses_bad_feedback_events_with_a_reason(change: Any, reason: str) -> None:
    payload = feedback("cam-1", "a" * 32, "false_reject", T0, inspected_at=T0 - 5)
    assert checked(codec.events_topic("cam-1"), payload)  # the agent's own is accepted
    change(payload)
    with pytest.raises(codec.CodecError) as err:
        codec.parse_device_message(codec.events_topic("cam-1"), codec.dumps(payload))
    assert err.value.reason == reason


def test_the_codec_checks_livestock_events_and_leaves_other_events_alone() -> None:
    result = herd_result("pen-1", 1, [STATIONARY], [])
    good = live("pen-1", result, STATIONARY)
    assert checked(codec.events_topic("pen-1"), good)
    for bad in ({**good, "event": "livestock_headcount_drop"}, {**good, "data": {**good["data"], "ts": "soon"}},
                {**good, "data": {**good["data"], "result_id": "not-hex"}}):
        with pytest.raises(codec.CodecError) as err:
            codec.parse_device_message(codec.events_topic("pen-1"), codec.dumps(bad))
        assert err.value.reason == "field_invalid"
    other = codec.event_payload(device="d", ts=T0, event="storage_full", severity="alarm", data={"free": [1, {}]})
    assert checked(codec.events_topic("d"), other)


# ------------------------------------------------------------------------------------------------ store
def test_events_are_stored_once_queried_by_cursor_and_summed_per_line(store: Store) -> None:
    result = herd_result("pen-1", 1, [STATIONARY, DROP], [HEADCOUNT])
    row, copies = rows_of_result(result)
    assert [e.event for e in copies] == ["livestock_animal_stationary", "livestock_headcount_drop",
                                          "livestock_headcount"]
    assert [e.severity for e in copies] == ["warning", "warning", "info"]
    first = store.commit_batch([], [], [], [rows_of_event(live("pen-1", result, STATIONARY))])  # live: first
    assert (first.events_inserted, first.events_duplicates) == (1, 0)
    later = store.commit_batch([row], [], [], copies)  # the durable copies: the stationary alert is known
    assert (later.inserted, later.events_inserted, later.events_duplicates) == (1, 2, 1)
    herd = store.query_events(EventQuery(device="pen-1"))
    assert sorted(e.event for e in herd) == ["livestock_animal_stationary", "livestock_headcount",
                                             "livestock_headcount_drop"]
    stationary = next(e for e in herd if e.event == "livestock_animal_stationary")
    assert (stationary.via, stationary.ts, stationary.subtype, stationary.result_id) == (
        "event", STATIONARY["ts"], "active", result["result_id"])

    # feedback on line "line" of cam-1: part a false_reject then corrected to missed_defect, b false_reject,
    # c inspected before the window; 10 parts inspected in the window
    store.commit_batch([result_row("cam-1", i + 1, T0 + i, inspection(i < 3), pipeline="line") for i in range(10)],
                       [])
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    sent = [feedback("cam-1", a, "false_reject", T0 + 20, inspected_at=T0 + 1),
            feedback("cam-1", a, "missed_defect", T0 + 30, inspected_at=T0 + 1, replaces="false_reject"),
            feedback("cam-1", b, "false_reject", T0 + 40, inspected_at=T0 + 2),
            feedback("cam-1", c, "false_reject", T0 + 50, inspected_at=T0 - 100)]
    out = store.commit_batch([], [], [], [rows_of_event(p) for p in sent])
    assert out.events_inserted == 4
    again = store.commit_batch([], [], [], [rows_of_event(sent[2], received=T0 + 999)])  # re-sent from the outbox
    assert (again.events_inserted, again.events_duplicates) == (0, 1)
    (line,) = store.feedback_summary(T0, T0 + 10)
    assert line == {"device": "cam-1", "pipeline": "line", "false_reject": 1, "missed_defect": 1, "inspected": 10,
                    "false_reject_rate": 0.1, "missed_defect_rate": 0.1}
    assert store.feedback_summary(T0, T0 + 10, device="pen-1") == []
    (wide,) = store.feedback_summary(T0 - 200, T0 + 10)
    assert (wide["false_reject"], wide["inspected"]) == (2, 10)

    # pages: every event once, in (ts, event_id) order, both ways; filters
    everything = store.query_events(EventQuery(limit=100))
    assert len(everything) == 7
    assert [(e.ts, e.event_id) for e in everything] == sorted((e.ts, e.event_id) for e in everything)
    pages, after = [], None
    while True:
        page = store.query_events(EventQuery(after=after, limit=2, descending=True))
        pages += page
        if len(page) < 2:
            break
        after = (page[-1].ts, page[-1].event_id)
    assert pages == everything[::-1]
    fb = store.query_events(EventQuery(events=("inspection_feedback",), since=T0 + 30, until=T0 + 50))
    assert [(e.subtype, e.result_id) for e in fb] == [("missed_defect", a), ("false_reject", b)]
    assert store.query_events(EventQuery(pipeline="herd", events=("livestock_headcount",)))[0].via == "result"

    # retention: by age (received_at) then by count
    assert store.prune_events(older_than=T0 + 99) == 0
    assert store.prune_events(keep=5) == 2
    assert store.prune_events(older_than=T0 + 101, limit=3) == 3
    assert len(store.query_events(EventQuery())) == 2


def test_retention_prunes_events_too(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    store.commit_batch([], [], [], [rows_of_event(feedback("d", f"{i:032x}", "false_reject", T0 + i,
                                                           inspected_at=T0), received=T0 + i) for i in range(30)])
    retention = Retention(store, RetentionConfig(max_age_days=1, max_events=20, batch=4))
    retention.run_once(now=T0 + 86_400 + 5)  # 5 are older than a day, then 5 beyond 20
    assert retention.events_deleted == 10
    assert [e.ts for e in store.query_events(EventQuery())] == [T0 + i for i in range(10, 30)]


def test_an_existing_database_gets_the_events_table(tmp_path: Path) -> None:
    """A coordinator.db made before events were stored opens, keeps its results and stores events."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE results (result_id TEXT PRIMARY KEY, device TEXT NOT NULL, epoch TEXT NOT NULL,"
        " seq INTEGER NOT NULL, input_id TEXT NOT NULL, pipeline TEXT NOT NULL, model TEXT NOT NULL,"
        " model_version TEXT NOT NULL, created_at REAL NOT NULL, received_at REAL NOT NULL, payload BLOB NOT NULL);"
        "INSERT INTO results VALUES ('r1', 'd', 'e', 1, 'i', 'p', 'm', '1', 1.0, 2.0, x'7b7d');")
    old.commit()
    old.close()
    store = SqliteStore(path)
    assert store.result_ids() == {"r1"}
    store.commit_batch([], [], [], [rows_of_event(feedback("d", "a" * 32, "false_reject", T0, inspected_at=T0))])
    assert len(store.query_events(EventQuery())) == 1


# ------------------------------------------------------------------------------------------------ service
def test_the_coordinator_stores_events_once_and_quarantines_bad_ones(tmp_path: Path) -> None:
    coordinator = Coordinator(SqliteStore(tmp_path / "c.db"), FakeTransport(FakeBroker()))
    result = herd_result("pen-1", 1, [STATIONARY, {"type": "Bad Type", "ts": 1}, "junk"], [HEADCOUNT])
    fb = feedback("cam-1", "a" * 32, "false_reject", T0, inspected_at=T0 - 5)
    bad_fb = feedback("cam-1", "b" * 32, "false_reject", T0, inspected_at=T0 - 5)
    bad_fb["data"]["kind"] = "wrong"
    messages = [
        (codec.events_topic("pen-1"), codec.dumps(live("pen-1", result, STATIONARY))),
        (codec.results_topic("pen-1", "herd"), codec.dumps(result)),
        (codec.results_topic("pen-1", "herd"), codec.dumps(result)),  # re-delivered
        (codec.events_topic("cam-1"), codec.dumps(fb)),
        (codec.events_topic("cam-1"), codec.dumps(fb)),  # re-sent from the agent's outbox
        (codec.events_topic("cam-1"), codec.dumps(bad_fb)),
        (codec.events_topic("cam-1"), b'{"v": 1, "kind": "event", "device": "cam-1"'),
        (codec.events_topic("cam-1"), codec.dumps(codec.event_payload(
            device="cam-1", ts=T0, event="part_rejected", severity="warning",
            data={"pipeline": "line", "result_id": "c" * 32, "heatmap": {"data": "A" * 60_000}}))),
    ]
    for i, (topic, payload) in enumerate(messages):
        coordinator.on_message(InboundMessage(topic, payload, 1, False, i + 1))
    coordinator.start()
    try:
        assert wait_for(lambda: coordinator.counters["settled"] >= len(messages), 5)
        c = coordinator.counters
        assert (c["events_inserted"], c["events_duplicates"], c["events_skipped"]) == (4, 4, 4)
        assert coordinator.dead_letter_reasons == {"field_invalid": 1, "not_json": 1}
        store = coordinator.store
        assert store.count_results() == 1
        events = {e.event: e for e in store.query_events(EventQuery())}
        assert set(events) == {"livestock_animal_stationary", "livestock_headcount", "inspection_feedback",
                               "part_rejected"}
        assert json.loads(events["part_rejected"].data) == {"pipeline": "line", "result_id": "c" * 32}
        letters = store.dead_letters()
        assert {d["reason"] for d in letters} == {"field_invalid", "not_json"}
        assert any("data.kind" in d["detail"] for d in letters)
    finally:
        coordinator.stop(2)


# ------------------------------------------------------------------------------------------------ HTTP
def test_events_api_pages_filters_and_the_false_reject_summary(store: Store, tmp_path: Path) -> None:
    store.commit_batch([result_row("cam-1", i + 1, T0 + i, inspection(False), pipeline="line") for i in range(8)], [])
    store.commit_batch([], [], [], [rows_of_event(feedback("cam-1", f"{i:032x}", "false_reject", T0 + 20 + i,
                                                           inspected_at=T0 + i)) for i in range(2)])
    result = herd_result("pen-1", 1, [STATIONARY, DROP], [HEADCOUNT])
    row, copies = rows_of_result(result)
    store.commit_batch([row], [], [], copies)
    (tmp_path / "tokens").write_text("events-token-0123456789abcdef\n")
    meta = {"cam-1": DeviceMeta(site="plant", line="line-3")}
    ctx = HttpContext(store, lambda: {"store_ok": True, "connected": True}, TokenSet.load(tmp_path / "tokens"),
                      devices_meta=meta, clock=lambda: T0 + 60)
    client = TestClient(create_app(ctx))
    assert client.get("/api/v1/events").status_code == 401
    assert client.get("/api/v1/feedback/summary").status_code == 401
    client.headers["Authorization"] = "Bearer events-token-0123456789abcdef"

    seen, cursor = [], None
    for _ in range(10):
        r = client.get("/api/v1/events", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        seen += r.json()["events"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 5 and len({e["event_id"] for e in seen}) == 5
    assert [e["ts"] for e in seen] == sorted(e["ts"] for e in seen)
    herd = client.get("/api/v1/events", params=[("event", "livestock_animal_stationary"),
                                                 ("event", "livestock_headcount_drop"), ("order", "desc")]).json()
    assert {e["event"] for e in herd["events"]} == {"livestock_animal_stationary", "livestock_headcount_drop"}
    assert all(e["via"] == "result" and e["data"]["state"] == "active" for e in herd["events"])
    only = client.get("/api/v1/events", params={"device": "cam-1", "since": T0 + 21}).json()["events"]
    assert [e["data"]["result_id"] for e in only] == [f"{1:032x}"]
    assert client.get("/api/v1/events?cursor=zz").json()["error"]["code"] == "invalid_cursor"
    assert client.get("/api/v1/events", params=[("event", f"e{i}") for i in range(21)]).status_code == 400

    summary = client.get("/api/v1/feedback/summary").json()  # default: the 24 h up to now (T0 + 60)
    assert summary["until"] == T0 + 60 and summary["lines"] == [
        {"device": "cam-1", "pipeline": "line", "false_reject": 2, "missed_defect": 0, "inspected": 8,
         "false_reject_rate": 0.25, "missed_defect_rate": 0.0, "site": "plant", "line": "line-3"}]
    narrow = client.get("/api/v1/feedback/summary", params={"since": T0 + 1, "until": T0 + 4}).json()["lines"]
    assert (narrow[0]["false_reject"], narrow[0]["inspected"]) == (1, 3)
    bad = client.get("/api/v1/feedback/summary", params={"since": T0 + 5, "until": T0})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_parameter"
    snapshot = dashboard_data(ctx)  # what the dashboard's stream sends
    names = [e["event"] for e in snapshot["events"]]  # newest first; reports (headcount) only in the API
    assert names[:2] == ["inspection_feedback"] * 2
    assert sorted(names[2:]) == ["livestock_animal_stationary", "livestock_headcount_drop"]
    assert snapshot["feedback"] == summary["lines"]


# ------------------------------------------------------------------------------------------------ Mosquitto
class Device:
    """A device client publishing raw payloads (QoS 1) on a real broker."""

    def __init__(self, port: int, device: str) -> None:
        self.ready = threading.Event()
        self.transport = PahoTransport(MqttSettings(port=port, client_id=device))
        self.transport.start(self)

    def on_connected(self, session_present: bool) -> None:
        self.ready.set()

    def on_disconnected(self, reason: str) -> None:
        self.ready.clear()

    def on_message(self, message: InboundMessage) -> None: ...

    def on_published(self, token: int, ok: bool, reason: str) -> None: ...

    def publish(self, topic: str, payload: dict[str, Any] | bytes) -> None:
        assert self.ready.wait(10)
        data = payload if isinstance(payload, bytes) else codec.dumps(payload)
        assert self.transport.publish(topic, data, qos=1) is not None


def test_events_through_a_real_mosquitto(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    settings = MqttSettings(port=broker.port, client_id="coord", clean_start=False, session_expiry_s=60,
                            manual_ack=True)
    coordinator = Coordinator(SqliteStore(tmp_path / "c.db"), PahoTransport(settings))
    coordinator.start()
    device = Device(broker.port, "pen-1")
    try:
        assert coordinator.connected.wait(10)
        result = herd_result("pen-1", 1, [STATIONARY], [])
        device.publish(codec.events_topic("pen-1"), live("pen-1", result, STATIONARY))
        device.publish(codec.results_topic("pen-1", "herd"), result)
        fb = feedback("pen-1", "a" * 32, "missed_defect", T0, inspected_at=T0)
        device.publish(codec.events_topic("pen-1"), fb)
        device.publish(codec.events_topic("pen-1"), fb)
        device.publish(codec.events_topic("pen-1"), {**fb, "event": "livestock_"})
        assert wait_for(lambda: coordinator.counters["settled"] >= 5, 10)
        assert wait_for(lambda: coordinator.counters["acks_sent"] >= 1, 5)
        stored = coordinator.store.query_events(EventQuery())
        assert sorted(e.event for e in stored) == ["inspection_feedback", "livestock_animal_stationary"]
        assert coordinator.counters["events_duplicates"] == 2
        assert [d["reason"] for d in coordinator.store.dead_letters()] == ["field_invalid"]
    finally:
        device.transport.stop()
        coordinator.stop(2)
        broker.close()
