"""Operator feedback on inspected parts (delivery/feedback.py): recent images kept within bounds, feedback stored
with the image, idempotent, refused with stable codes; and end to end through the agent: HTTP, the signed-style
MQTT command and the durable ``inspection_feedback`` event."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import orjson
import pytest
from PIL import Image as PILImage

from edge_agent.delivery.feedback import FEEDBACK_EVENT, InspectedPart, InspectionStore, KeepLimits, sniff_suffix
from edge_agent.errors import (
    FeedbackConflictError,
    FeedbackError,
    FeedbackGoneError,
    FeedbackUnknownError,
    StorageFullError,
)
from edge_agent.types import Image

from .support.wait import wait_for


def png(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def part(i: int, verdict: str = "fail", pipeline: str = "line1", part_id: str | None = None) -> InspectedPart:
    return InspectedPart(result_id=f"r{i:04d}", input_id=f"in-{i}", pipeline=pipeline, source="cam",
                         model="tile_anomaly", model_version="2.0.0", verdict=verdict, score=7.5 if verdict == "fail"
                         else 1.0, threshold=4.64, part_id=part_id, created_at=1000.0 + i)


class Events:
    def __init__(self) -> None:
        self.got: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, event: str, severity: str, data: dict[str, Any]) -> None:
        self.got.append((event, severity, data))


@pytest.fixture
def store(tmp_path: Path) -> Any:
    events = Events()
    state = {"space": "ok"}
    s = InspectionStore(tmp_path / "state", {"line1": KeepLimits(images=3, max_bytes=1 << 20)},
                        space=lambda: state["space"], record_event=events, known=lambda i: i == "crop-result")
    s.start()
    s.events, s.state = events, state  # type: ignore[attr-defined]
    yield s
    s.close()


def test_images_are_kept_from_spool_bytes_and_frames_and_the_oldest_go(store: Any, tmp_path: Path) -> None:
    spool = tmp_path / "spool.png"
    spool.write_bytes(png(1))
    assert store.keep(part(1), spool_path=str(spool))
    spool.unlink()  # the upload's spool file is deleted once its result is out: the kept link survives
    assert store.keep(part(2), data=png(2))
    frame = np.zeros((20, 30, 3), np.uint8)
    frame[:, :, 0] = 255  # BGR: blue
    assert store.keep(part(3, part_id="P-3"), image=Image.from_array(frame))
    assert store.flush()
    root = store.recent_dir / "line1"
    assert sorted(p.name for p in root.iterdir()) == ["r0001.png", "r0002.png", "r0003.jpg"]
    assert (root / "r0001.png").read_bytes() == png(1)
    blue = np.asarray(PILImage.open(root / "r0003.jpg"))
    assert blue[..., 2].mean() > 200 and blue[..., 0].mean() < 50  # BGR frame stored as an RGB JPEG
    meta, image = store.lookup("P-3")  # by part id; by input id too
    assert meta["result_id"] == "r0003" and image == root / "r0003.jpg"
    assert store.lookup("in-2")[0]["result_id"] == "r0002"
    assert not store.keep(part(4, pipeline="other"), data=png(4))  # a pipeline that keeps nothing
    assert store.keep(part(4), data=png(4))
    assert store.flush()
    assert sorted(p.name for p in root.iterdir()) == ["r0002.png", "r0003.jpg", "r0004.png"]  # at most 3
    with pytest.raises(FeedbackGoneError):  # known, image evicted: 410, not 404
        store.add_feedback("r0001", "false_reject")


def test_byte_cap_keeps_the_newest_that_fit(tmp_path: Path) -> None:
    big = png(9, size=64)
    s = InspectionStore(tmp_path, {"line1": KeepLimits(images=100, max_bytes=len(big) * 2 + 10)})
    s.start()
    try:
        for i in range(5):
            assert s.keep(part(i), data=big)
        assert s.flush()
        assert sorted(p.name for p in (s.recent_dir / "line1").iterdir()) == ["r0003.png", "r0004.png"]
        assert s.stats()["bytes"] == 2 * len(big) and s.stats()["evicted"] == 3
    finally:
        s.close()


def test_feedback_is_stored_with_its_image_once_and_sent_as_an_event(store: Any) -> None:
    store.keep(part(1), data=png(1))
    first = store.add_feedback("r0001", "false_reject", operator="Ana", note="glare on the edge")
    assert first["stored"] and not first["duplicate"]
    folder = store.feedback_dir / "line1" / "false_reject"
    assert (folder / "r0001.png").read_bytes() == png(1)
    side = json.loads((folder / "r0001.json").read_text())
    assert side["score"] == 7.5 and side["threshold"] == 4.64 and side["model_version"] == "2.0.0"
    assert side["operator"] == "Ana" and side["kind"] == "false_reject" and side["verdict"] == "fail"
    again = store.add_feedback("in-1", "false_reject", operator="Ana")  # same part by input id: stored once
    assert not again["stored"] and again["duplicate"] and again["feedback"]["at"] == first["feedback"]["at"]
    assert [e[0] for e in store.events.got] == [FEEDBACK_EVENT]  # one event, not two
    event = store.events.got[0][2]
    assert event["kind"] == "false_reject" and event["result_id"] == "r0001" and event["score"] == 7.5
    assert event["totals"] == {"false_reject": 1, "missed_defect": 0}
    # the operator corrects themselves: the part lives under its new kind only... if the verdict allows it
    with pytest.raises(FeedbackConflictError):
        store.add_feedback("r0001", "missed_defect")  # a rejected part cannot be a missed defect


def test_the_same_feedback_at_once_from_two_sides_is_stored_once(store: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store.keep(part(7), data=png(7))
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda via: store.add_feedback("r0007", "false_reject", via=via),
                                 ["http", "mqtt", "http", "mqtt"]))
    assert sum(o["stored"] for o in outcomes) == 1 and len(store.events.got) == 1


def test_change_of_kind_replaces_the_first(store: Any) -> None:
    store.keep(part(5, verdict=None), data=png(5))  # type: ignore[arg-type]
    store.add_feedback("r0005", "false_reject")
    changed = store.add_feedback("r0005", "missed_defect", note="crack under the label")
    assert changed["stored"] and changed["replaced"] == "false_reject"
    assert not (store.feedback_dir / "line1" / "false_reject" / "r0005.png").exists()
    assert (store.feedback_dir / "line1" / "missed_defect" / "r0005.png").read_bytes() == png(5)
    assert store.totals("line1") == {"false_reject": 0, "missed_defect": 1}
    assert store.events.got[-1][2]["replaces"] == "false_reject"


def test_refusals_have_stable_codes(store: Any) -> None:
    store.keep(part(1, verdict="pass"), data=png(1))
    with pytest.raises(FeedbackUnknownError) as unknown:
        store.add_feedback("nope", "false_reject")
    assert unknown.value.code == "feedback_unknown_result"
    with pytest.raises(FeedbackGoneError) as gone:  # the outbox knows it, no image was kept (a crop pipeline)
        store.add_feedback("crop-result", "false_reject")
    assert gone.value.code == "feedback_image_gone"
    with pytest.raises(FeedbackError) as bad:
        store.add_feedback("r0001", "looks_fine")
    assert bad.value.code == "feedback_invalid"
    with pytest.raises(FeedbackError, match="operator"):
        store.add_feedback("r0001", "missed_defect", operator="x" * 65)
    with pytest.raises(FeedbackConflictError) as mismatch:
        store.add_feedback("r0001", "false_reject")  # it passed: not a false reject
    assert mismatch.value.code == "feedback_kind_mismatch"
    assert store.events.got == []


def test_a_disk_short_of_space_keeps_nothing_new_and_a_full_one_drops_recent_images(store: Any) -> None:
    store.keep(part(1), data=png(1))
    assert store.flush()
    store.state["space"] = "low"
    assert not store.keep(part(2), data=png(2)) and store.counters["skipped_space"] == 1
    assert store.add_feedback("r0001", "false_reject")["stored"]  # a hard link and a sidecar: still taken
    store.keep(part(3), data=png(3))
    store.state["space"] = "full"
    store.on_space("full")
    assert wait_for(lambda: not any((store.recent_dir / "line1").iterdir()))
    assert (store.feedback_dir / "line1" / "false_reject" / "r0001.png").is_file()  # feedback stays
    store.state["space"] = "ok"
    store.keep(part(4), data=png(4))
    store.state["space"] = "full"
    with pytest.raises(StorageFullError):
        store.add_feedback("r0004", "false_reject")


def test_reopen_cleans_leftovers_and_sends_an_event_a_crash_took(tmp_path: Path) -> None:
    limits = {"line1": KeepLimits(images=5)}
    s = InspectionStore(tmp_path, limits)  # no event sink: as if the process died before the event
    s.start()
    s.keep(part(1), data=png(1))
    s.add_feedback("r0001", "false_reject")
    s.close()
    (s.recent_dir / "line1" / ".staged-r0009").write_bytes(b"x")
    (s.recent_dir / "line1" / "stray.png").write_bytes(png(3))
    events = Events()
    s2 = InspectionStore(tmp_path, limits, record_event=events)
    s2.start()
    try:
        assert sorted(p.name for p in (s2.recent_dir / "line1").iterdir()) == ["r0001.png"]
        again = s2.add_feedback("r0001", "false_reject")
        assert again["duplicate"] and [e[0] for e in events.got] == [FEEDBACK_EVENT]
        s2.add_feedback("r0001", "false_reject")
        assert len(events.got) == 1  # sent once
    finally:
        s2.close()


def test_a_damaged_index_is_set_aside_and_feedback_rebuilt_from_the_sidecars(tmp_path: Path) -> None:
    limits = {"line1": KeepLimits(images=5)}
    s = InspectionStore(tmp_path, limits)
    s.start()
    s.keep(part(1), data=png(1))
    s.add_feedback("r0001", "false_reject", operator="Ana")
    s.close()
    index = tmp_path / "feedback" / "index.db"
    index.write_bytes(b"this is not a database" * 100)
    events = Events()
    s2 = InspectionStore(tmp_path, limits, record_event=events)  # starts: the agent does not stop for its index
    s2.start()
    try:
        assert list((tmp_path / "feedback").glob("index.db.corrupt-*"))
        assert s2.totals("line1") == {"false_reject": 1, "missed_defect": 0}
        assert not any((s2.recent_dir / "line1").iterdir())  # recent images it no longer knows are gone
        assert s2.add_feedback("r0001", "false_reject")["duplicate"]  # the feedback itself is still known
        with pytest.raises(FeedbackConflictError):  # the record still knows the verdict
            s2.add_feedback("r0001", "missed_defect")
        assert (s2.feedback_dir / "line1" / "false_reject" / "r0001.png").read_bytes() == png(1)
        assert events.got == []
    finally:
        s2.close()


def test_sniff_suffix() -> None:
    assert sniff_suffix(b"\xff\xd8\xff\xe0") == ".jpg" and sniff_suffix(png(1)[:12]) == ".png"
    assert sniff_suffix(b"RIFF\0\0\0\0WEBP") == ".webp" and sniff_suffix(b"GIF89a") == ".img"


def _schema(name: str) -> dict[str, Any]:
    from importlib import resources

    text = resources.files("edge_agent.protocol").joinpath("schemas").joinpath(name).read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def test_feedback_event_matches_its_schema(store: Any) -> None:
    store.keep(part(1, part_id="P-1"), data=png(1))
    store.add_feedback("P-1", "false_reject", operator="Ana")
    store.keep(part(2, verdict=None), data=png(2))  # type: ignore[arg-type]
    store.add_feedback("r0002", "false_reject")
    store.add_feedback("r0002", "missed_defect")
    assert len(store.events.got) == 3
    for _, _, data in store.events.got:
        jsonschema.validate(json.loads(orjson.dumps(data)), _schema("feedback.json"),
                            cls=jsonschema.Draft202012Validator)
    bad = {**store.events.got[0][2], "kind": "meh"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _schema("feedback.json"), cls=jsonschema.Draft202012Validator)


def test_feedback_command_validation() -> None:
    from edge_agent.protocol.commands import CommandError, parse_command

    ok = parse_command("feedback", orjson.dumps({"id": "f1", "args": {"result": "r1", "kind": "false_reject",
                                                                      "operator": "Ana"}}))
    assert ok.args == {"result": "r1", "kind": "false_reject", "operator": "Ana"}
    for args in ({"result": "r1", "kind": "nah"}, {"result": "../x", "kind": "false_reject"}, {"kind": "false_reject"},
                 {"result": "r1", "kind": "false_reject", "note": "a\nb"}):
        with pytest.raises(CommandError) as exc:
            parse_command("feedback", orjson.dumps({"id": "f2", "args": args}))
        assert exc.value.code == "command_invalid"


# ----------------------------------------------------------------------------------------------- the agent


def test_agent_takes_feedback_over_http_and_mqtt_and_publishes_it(tmp_path: Path) -> None:
    import httpx

    from edge_agent.agent.service import Service
    from edge_agent.config import load_config
    from edge_agent.transport.fake import FakeBroker, FakeTransport
    from tests.support.broker import free_port
    from tests.support.onnx_models import classifier_manifest, tiny_classifier, write_bundle

    models = tmp_path / "models"
    (models / "tiny").mkdir(parents=True)
    onnx_path = tiny_classifier(models / "tiny" / "model.onnx", n_classes=2)
    write_bundle(models / "tiny", classifier_manifest(onnx_path, ["good", "scratch"], name="tiny"))
    port = free_port()
    config = tmp_path / "agent.yaml"
    config.write_text(f"""\
device_id: line-1
state_dir: {tmp_path / "state"}
models_dir: {models}
models:
  - name: parts
    bundle: tiny
pipelines:
  - name: parts
    kind: inspection
    model: parts
    inspection:
      min_score: 0.0
      keep_images: 2
sources:
  - type: folder
    name: inbox
    pipeline: parts
    path: {tmp_path / "inbox"}
    poll_interval_s: 0.05
    settle_s: 0.0
http:
  enabled: true
  port: {port}
metrics:
  enabled: false
""")
    broker = FakeBroker()
    service = Service(load_config(config), transport_factory=lambda s, w: FakeTransport(broker, w))
    service.start()
    try:
        inbox = tmp_path / "inbox"
        for i in range(3):
            (inbox / f"part{i}.png").write_bytes(png(i))
        ob = service.outbox
        assert ob is not None
        assert wait_for(lambda: ob.stats().next_seq > 3)
        assert service.inspections is not None and service.inspections.flush()
        rows = {r.input_id: r for r in ob.unacked(limit=10)}
        assert len(rows) == 3
        results = sorted(rows.values(), key=lambda r: r.seq)
        oldest, newest = results[0], results[-1]
        base = f"http://127.0.0.1:{port}"

        def kind_for(r: Any) -> str:
            return "false_reject" if r.body["sector"]["verdict"] == "fail" else "missed_defect"

        res = httpx.post(f"{base}/v1/feedback", json={"result_id": newest.result_id, "kind": kind_for(newest),
                                                      "operator": "Ana"}, timeout=10)
        assert res.status_code == 201, res.text
        body = res.json()
        assert body["stored"] and body["feedback"]["pipeline"] == "parts"
        stored = tmp_path / "state" / "feedback" / body["feedback"]["image"]
        assert stored.read_bytes() in {png(i) for i in range(3)}  # the photo as it came in
        assert httpx.post(f"{base}/v1/feedback", json={"result_id": newest.result_id, "kind": kind_for(newest)},
                          timeout=10).status_code == 200  # the same again: stored once
        gone = httpx.post(f"{base}/v1/feedback", json={"result_id": oldest.result_id, "kind": kind_for(oldest)},
                          timeout=10)
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "feedback_image_gone"  # keep_images: 2
        unknown = httpx.post(f"{base}/v1/feedback", json={"result_id": "nope", "kind": "false_reject"}, timeout=10)
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "feedback_unknown_result"
        bad = httpx.post(f"{base}/v1/feedback", json={"result_id": newest.result_id, "kind": "meh"}, timeout=10)
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "request_invalid"

        middle = results[1]
        command = {"id": "fb-1", "args": {"result": middle.input_id, "kind": kind_for(middle), "note": "ok part"}}
        broker.route("edge/v1/line-1/cmd/feedback", orjson.dumps(command), retain=False)

        def events(name: str) -> list[dict[str, Any]]:
            out = [orjson.loads(p) for t, p in broker.published if t == "edge/v1/line-1/events"]
            return [e for e in out if e["event"] == name]

        assert wait_for(lambda: len(events("command_result")) == 1)
        answer = events("command_result")[0]
        assert answer["data"]["ok"] and answer["data"]["result"]["result_id"] == middle.result_id
        assert wait_for(lambda: len(events(FEEDBACK_EVENT)) == 2)  # durable events, once each
        sent = {e["data"]["result_id"]: e["data"] for e in events(FEEDBACK_EVENT)}
        for data in sent.values():
            jsonschema.validate(data, _schema("feedback.json"), cls=jsonschema.Draft202012Validator)
        assert sent[newest.result_id]["via"] == "http" and sent[middle.result_id]["via"] == "mqtt"
        assert sent[middle.result_id]["model"] == "tiny" and sent[middle.result_id]["note"] == "ok part"
        assert wait_for(lambda: ob.events_pending == 0)  # deleted once the broker had them
        from prometheus_client import generate_latest

        scraped = generate_latest(service.registry).decode()
        counted = [line for line in scraped.splitlines() if line.startswith('edge_agent_feedback_total{')]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in counted) == 2.0 and len(counted) == 2
        assert "edge_agent_kept_images 2.0" in scraped  # keep_images: 2

        # what a coordinator makes of what the agent published (tests/test_coordinator_events.py has the rest)
        from edge_agent.coordinator.service import Coordinator
        from edge_agent.coordinator.store import SqliteStore
        from edge_agent.transport import InboundMessage

        coordinator = Coordinator(SqliteStore(tmp_path / "coordinator.db"), FakeTransport(FakeBroker()))
        published = [(t, p) for t, p in broker.published if t == "edge/v1/line-1/events" or "/results/" in t]
        for i, (topic, payload) in enumerate(published):
            coordinator.on_message(InboundMessage(topic, payload, 1, False, i + 1))
        coordinator.start()
        try:
            assert wait_for(lambda: coordinator.counters["settled"] >= len(published))
            assert coordinator.counters["dead_letters"] == 0
            (line,) = coordinator.store.feedback_summary(0, time.time() + 1)
            kinds = [kind_for(newest), kind_for(middle)]
            assert (line["device"], line["pipeline"], line["inspected"]) == ("line-1", "parts", 3)
            assert (line["false_reject"], line["missed_defect"]) == (kinds.count("false_reject"),
                                                                   kinds.count("missed_defect"))
        finally:
            coordinator.stop(2)
    finally:
        assert service.stop(5)
