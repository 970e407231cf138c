"""Corruption always raises an alarm, and rows are salvaged where SQLite can still read them (issue 13, finding 4).

Found: a 0-byte outbox was silently recreated (30 results lost); a damaged write-ahead log silently rolled
back (17 of 30 lost, 3 inputs "pending" for ever); nothing salvaged rows from a quarantined database.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from prometheus_client import CollectorRegistry

from edge_agent.delivery.outbox import Outbox, OutboxLimits
from edge_agent.delivery.publisher import Publisher, PublisherSettings
from edge_agent.delivery.repair import check_wal
from edge_agent.metrics import Metrics
from edge_agent.transport import FakeBroker, FakeTransport
from tests.support.broker import Broker
from tests.support.delivery import start_coordinator, wait_until
from tests.test_publisher import spy

ROOT = Path(__file__).resolve().parent.parent
LIMITS = OutboxLimits(min_free_bytes=0)
FRAME = 24 + 4096


def add(ob: Outbox, i: int, pad: int = 300) -> None:
    ob.accept_input(f"i{i}", source="s", pipeline="p", spool_path=None, meta={})
    ob.add_result(f"i{i}", pipeline="p", model="m", model_version="1", body={"i": i, "pad": "x" * pad})


def alarm_texts(ob: Outbox) -> list[str]:
    return [a for a in ob.stats().alarms if a.startswith("outbox_corrupt")]


def scrape_alarms(ob: Outbox) -> float | None:
    registry = CollectorRegistry()
    Metrics(registry).bind_storage(lambda: {"disk_state": ob.disk_state, "alarms": ob.alarm_counts()})
    return registry.get_sample_value("edge_agent_alarms_total", {"alarm": "outbox_corrupt"})


def crash_copy(ob: Outbox, dst: Path) -> Path:
    """What a power cut leaves: the database and its log as they are on disk now (every commit fsynced)."""
    dst.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", ".epoch"):
        src = Path(f"{ob.path}{suffix}")
        if src.exists():
            shutil.copyfile(src, dst / f"{ob.path.name}{suffix}")
    return dst / ob.path.name


def damage_wal_frame(db: Path, at: float = 0.4) -> int:
    """Flip bytes in the page of a frame ``at`` of the way through the log (committed frames follow it)."""
    wal = Path(f"{db}-wal")
    frames = check_wal(wal).in_use  # the current generation: later frames are stale leftovers of earlier ones
    index = int(frames * at)
    with wal.open("r+b") as f:
        f.seek(32 + index * FRAME + 24 + 2000)
        f.write(b"\xde\xad\xbe\xef" * 8)
    return index


def sqlite_count(db: Path) -> int:
    """What plain SQLite sees (it applies the log up to its first bad frame, without a word)."""
    work = db.with_name("plain") / db.name
    work.parent.mkdir()
    for suffix in ("", "-wal"):
        shutil.copyfile(f"{db}{suffix}", f"{work}{suffix}")
    conn = sqlite3.connect(work)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------------- 0 bytes, missing


def test_a_first_start_raises_no_alarm(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", "d", LIMITS)
    try:
        assert alarm_texts(ob) == [] and ob.pending_events() == [] and scrape_alarms(ob) == 0
    finally:
        ob.close()


@pytest.mark.parametrize("damage", ["zero_bytes", "deleted"])
def test_an_empty_or_missing_outbox_raises_a_lasting_alarm(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "o.db"
    ob = Outbox(path, "d", LIMITS)
    for i in range(30):
        add(ob, i)
    old_epoch = ob.epoch
    ob.close()
    if damage == "zero_bytes":
        path.write_bytes(b"")
    else:
        path.unlink()
    ob = Outbox(path, "d", LIMITS)
    try:
        (alarm,) = alarm_texts(ob)
        assert ("is empty (0 bytes)" if damage == "zero_bytes" else "is missing") in alarm
        assert old_epoch in alarm and ob.epoch != old_epoch  # a new epoch: seqs never collide with old acks
        (event,) = ob.pending_events()  # sent through the outbox until the broker has it
        assert event.event == "outbox_corrupt" and event.severity == "alarm"
        assert scrape_alarms(ob) == 1
        assert list(tmp_path.glob("o.db.corrupt-*"))
    finally:
        ob.close()
    ob = Outbox(path, "d", LIMITS)  # a restart: the alarm is still reported, not raised twice
    try:
        assert len(alarm_texts(ob)) == 1 and scrape_alarms(ob) == 1
    finally:
        ob.close()


# ----------------------------------------------------------------------------------------------- damaged log


def test_a_damaged_log_raises_an_alarm_and_its_committed_rows_are_salvaged(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "live" / "o.db", "d", LIMITS)
    try:
        for i in range(30):
            add(ob, i)
        ob.accept_input("waiting", source="s", pipeline="p", spool_path=None, meta={})
        db = crash_copy(ob, tmp_path / "crash")
    finally:
        ob.close()
    damage_wal_frame(db)
    report = check_wal(Path(f"{db}-wal"))
    assert report.damaged and report.lost_commits > 0
    silently = sqlite_count(db)
    assert silently < 30  # the finding: plain SQLite drops the committed tail without a word
    ob = Outbox(db, "d", LIMITS)
    try:
        (alarm,) = alarm_texts(ob)
        assert "damaged write-ahead log" in alarm
        (salvaged,) = ob.salvaged
        print(f"\nplain SQLite kept {silently} of 30 results; the salvage kept {salvaged['results']}")
        assert salvaged["results"] >= max(silently + 1, 28)
        assert ob.stats().backlog == salvaged["results"]
        assert [r.seq for r in ob.unacked(limit=100)] == list(range(1, salvaged["results"] + 1))
        assert "waiting" in {p.input_id for p in ob.pending_inputs()}  # still pending: the recovery re-runs it
        assert list(db.parent.glob("o.db.corrupt-*-wal.damaged"))  # the original log is kept as evidence
    finally:
        ob.close()


def test_a_torn_last_frame_is_normal_and_raises_no_alarm(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "live" / "o.db", "d", LIMITS)
    try:
        for i in range(10):
            add(ob, i)
        db = crash_copy(ob, tmp_path / "crash")
    finally:
        ob.close()
    with Path(f"{db}-wal").open("ab") as f:  # a crash in the middle of writing an uncommitted frame
        f.write(struct.pack(">6I", 7, 0, 1, 2, 3, 4) + os.urandom(1000))
    assert not check_wal(Path(f"{db}-wal")).damaged
    ob = Outbox(db, "d", LIMITS)
    try:
        assert alarm_texts(ob) == [] and ob.stats().backlog == 10
    finally:
        ob.close()


# ----------------------------------------------------------------------------------------------- corrupt page


def test_a_corrupt_page_raises_an_alarm_and_the_readable_rows_are_salvaged(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    ob = Outbox(path, "d", LIMITS)
    for i in range(200):
        add(ob, i, pad=1500)
    for i in range(5):
        ob.accept_input(f"pending{i}", source="s", pipeline="p", spool_path=None, meta={}, idempotency_key=f"k{i}")
    assert ob.record_command("cmd-1", "ping")
    ob.close()
    pages = path.stat().st_size // 4096
    with path.open("r+b") as f:
        f.seek(4096 * (pages // 2))
        f.write(os.urandom(4096))
    ob = Outbox(path, "d", LIMITS)
    try:
        (alarm,) = alarm_texts(ob)
        assert "corrupt" in alarm
        (salvaged,) = ob.salvaged
        print(f"\ncorrupt page: salvaged {salvaged['results']} of 200 results, "
              f"{salvaged['unreadable']} unreadable ranges, {salvaged['invalid']} invalid rows")
        assert salvaged["results"] >= 190 and salvaged["unreadable"] >= 1
        assert {p.input_id for p in ob.pending_inputs()} >= {f"pending{i}" for i in range(5)}
        assert not ob.record_command("cmd-1", "ping")  # replay protection survived
        assert ob.input_for_key("k0") == "pending0"  # a retried upload still finds its first one
        bodies = [r.body["i"] for r in ob.unacked(limit=500)]
        assert bodies == sorted(bodies) and len(set(bodies)) == len(bodies)  # order kept, nothing twice
    finally:
        ob.close()


# ----------------------------------------------------------------------------------------------- the alarm goes out


def test_the_stored_alarm_event_is_published_once_the_broker_is_there_and_then_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    ob = Outbox(path, "dev1", LIMITS)
    add(ob, 1)
    ob.close()
    path.write_bytes(b"")
    ob = Outbox(path, "dev1", LIMITS)  # alarm raised while no broker is around
    broker = FakeBroker()
    recorder = spy(broker)
    publisher = Publisher(ob, FakeTransport(broker), "dev1", lambda: {}, PublisherSettings(heartbeat_s=0.1))
    try:
        publisher.start()
        wait_until(lambda: bool(recorder.payloads("/events")), 5, "the alarm event")
        (event,) = [e for e in recorder.payloads("/events") if e["event"] == "outbox_corrupt"]
        assert event["severity"] == "alarm" and "is empty (0 bytes)" in event["data"]["message"]
        wait_until(lambda: ob.pending_events() == [], 5, "the stored event forgotten after its PUBACK")
        wait_until(lambda: bool(recorder.payloads("/heartbeat")), 5, "a heartbeat")
        assert any("outbox_corrupt" in a for a in recorder.payloads("/heartbeat")[-1]["outbox"]["alarms"])
    finally:
        publisher.stop(2)
        ob.close()


# ----------------------------------------------------------------------------------------------- the real agent


def test_real_agent_with_a_damaged_log_alarms_and_still_delivers_every_result_once(tmp_path: Path) -> None:
    """SIGKILL with 30 results unsent, a frame of the log damaged, restart: the alarm goes out, the readable rows
    are salvaged and inputs whose results were lost are re-run from ``done/``; 30 results, each once."""
    broker = Broker(tmp_path / "broker")  # not started yet: results stay in the outbox
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rng = np.random.default_rng(5)
    for i in range(30):
        buf = io.BytesIO()
        PILImage.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
        (inbox / f"leaf-{i:02d}.png").write_bytes(buf.getvalue())
    config = _agent_config(tmp_path, broker.port)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)]
    log = (tmp_path / "agent.log").open("ab")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    coordinator = None
    try:
        wait_until(lambda: len(list((inbox / "done").glob("*.png"))) == 30, 30, "30 files done")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        db = tmp_path / "state" / "outbox.db"
        damage_wal_frame(db, at=0.3)
        assert check_wal(Path(f"{db}-wal")).damaged
        broker.start()
        events: list[dict[str, Any]] = []
        from tests.test_reliability import Spy

        watcher = Spy(broker.port, "edge/v1/dev-damage/events")
        coordinator = start_coordinator(tmp_path / "c.db", broker.port)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_until(lambda: coordinator is not None and coordinator.store.count_results("dev-damage") >= 30, 40,
                   "30 results at the coordinator")
        wait_until(lambda: watcher.seen(b"outbox_corrupt"), 10, "the outbox_corrupt alarm on the broker")
        events = [json.loads(m.payload) for m in watcher.messages if b"outbox_corrupt" in m.payload]
        salvaged = events[0]["data"]["salvaged"]
        print(f"\nreal agent, damaged log: salvaged {salvaged['results']} results, "
              f"{salvaged['pending_inputs']} inputs re-run; coordinator holds "
              f"{coordinator.store.count_results('dev-damage')}")
        assert coordinator.store.count_results("dev-damage") == 30  # every one, once
        assert proc.poll() is None
        watcher.transport.stop()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
        log.close()
        if coordinator is not None:
            coordinator.stop()
        broker.close()


def _agent_config(tmp_path: Path, port: int) -> Path:
    from tests.support.onnx_models import classifier_manifest, tiny_classifier, write_bundle

    labels = ["Apple___healthy", "Apple___Apple_scab", "Corn___healthy"]
    bundle = tmp_path / "models" / "tiny_leaf"
    bundle.mkdir(parents=True)
    onnx_path = tiny_classifier(bundle / "model.onnx", n_classes=len(labels))
    write_bundle(bundle, classifier_manifest(onnx_path, labels, name="tiny_leaf", thresholds={"ood": 5.0}))
    config = tmp_path / "agent.yaml"
    config.write_text(f"""\
device_id: dev-damage
state_dir: {tmp_path / 'state'}
models_dir: {tmp_path / 'models'}
shutdown_timeout_s: 5
models: [{{name: leaf, bundle: tiny_leaf}}]
pipelines: [{{name: crop, kind: crop, model: leaf, workers: 1, queue_size: 8}}]
sources:
  - {{type: folder, name: inbox, pipeline: crop, path: {tmp_path / 'inbox'}, poll_interval_s: 0.05, settle_s: 0}}
mqtt: {{host: 127.0.0.1, port: {port}, heartbeat_s: 1, reconnect_max_s: 1}}
outbox: {{min_free_bytes: 1MiB, reserve_bytes: 256KiB}}
metrics: {{enabled: false}}
""")
    return config


# ------------------------------------------------------------------------------------------- nothing pending for ever


def test_no_input_stays_pending_for_ever_after_a_rollback(tmp_path: Path) -> None:
    """Inputs an outbox rollback left pending: a folder file already filed to ``done/`` runs again, one that is
    gone is rejected (``input_lost``), an upload runs again; interrupted uploads are cleaned up; and a pending
    upload nobody is working on is re-run by the sweep (as when disk space returns)."""
    from edge_agent.agent.service import Service
    from edge_agent.config import load_config
    from tests.support.onnx_models import classifier_manifest, tiny_classifier, write_bundle

    labels = ["Apple___healthy", "Apple___Apple_scab", "Corn___healthy"]
    bundle = tmp_path / "models" / "tiny_leaf"
    bundle.mkdir(parents=True)
    write_bundle(bundle, classifier_manifest(tiny_classifier(bundle / "model.onnx", n_classes=3), labels,
                                             name="tiny_leaf", thresholds={"ood": 5.0}))
    config = tmp_path / "agent.yaml"
    config.write_text(f"""\
device_id: dev-1
state_dir: {tmp_path / 'state'}
models_dir: {tmp_path / 'models'}
models: [{{name: leaf, bundle: tiny_leaf}}]
pipelines: [{{name: crop, kind: crop, model: leaf, workers: 1, queue_size: 8}}]
sources: [{{type: folder, name: inbox, pipeline: crop, path: {tmp_path / 'inbox'}, poll_interval_s: 0.05}}]
mqtt: {{enabled: false}}
metrics: {{enabled: false}}
outbox: {{min_free_bytes: 1MiB}}
""")
    cfg = load_config(config)
    state, done = tmp_path / "state", tmp_path / "inbox" / "done"
    done.mkdir(parents=True)
    http = state / "spool" / "http"
    http.mkdir(parents=True)
    png = _png(1)
    (done / "filed.png").write_bytes(png)  # filed after its result, then the result was rolled back
    (http / "http-1.png").write_bytes(png)
    (http / "http-2.part").write_bytes(png[:10])  # an upload cut off by the crash
    (http / "http-3.png").write_bytes(png)  # stored, never journalled: its client got no answer
    ob = Outbox(state / "outbox.db", "dev-1")
    spool = state / "spool" / "inbox"
    ob.accept_input("f-filed", source="inbox", pipeline="crop", spool_path=str(spool / "f-filed--filed.png"),
                    meta={"original_name": "filed.png"})
    ob.accept_input("f-gone", source="inbox", pipeline="crop", spool_path=str(spool / "f-gone--gone.png"),
                    meta={"original_name": "gone.png"})
    ob.accept_input("http-1", source="http", pipeline="crop", spool_path=str(http / "http-1.png"), meta={})
    ob.close()
    service = Service(cfg)
    service.start()
    try:
        assert service.outbox is not None
        out = service.outbox
        wait_until(lambda: out.input_state("f-filed") == "done" and out.input_state("http-1") == "done", 20,
                   "the pending inputs re-run")
        assert out.input_state("f-gone") == "rejected"
        assert (done / "filed.png").exists() and sorted(p.name for p in http.iterdir()) == []
        late = http / "http-4.png"  # as if its first attempt failed for lack of space: pending, nobody on it
        late.write_bytes(png)
        out.accept_input("http-4", source="http", pipeline="crop", spool_path=str(late), meta={})
        assert service._sweep() == 0  # too young: an upload may still be waiting for room in the queue
        assert service._sweep(min_age_s=0) == 1
        wait_until(lambda: out.input_state("http-4") == "done", 20, "the swept input done")
        assert out.pending_inputs() == []
    finally:
        service.stop(5)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()
