"""Disk full is a state, not a freeze (issue 13, finding 3), on a REAL 3 MB tmpfs (root: CI runs as root).

Each test reproduces what was found: a log never checkpointed, deletes failing for good with "database or
disk is full", inbox files stuck after space was freed, partial and unjournalled spool files left by a
failed copy, a start below ``min_free_bytes`` that exited 2 (which systemd never restarts).
"""

from __future__ import annotations

import configparser
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from PIL import Image as PILImage

from edge_agent.config import FolderSourceConfig
from edge_agent.delivery.outbox import Outbox, OutboxLimits
from edge_agent.delivery.space import free_bytes
from edge_agent.errors import StorageFullError
from edge_agent.flow.pipeline import InputItem, PipelineOutput
from edge_agent.flow.sources.folder import FolderSource
from tests.support.broker import Broker
from tests.support.delivery import start_coordinator, wait_until
from tests.support.onnx_models import classifier_manifest, tiny_classifier, write_bundle
from tests.support.tinydisk import fill, tiny_disk, unfill

ROOT = Path(__file__).resolve().parent.parent
KIB = 1024
LIMITS = OutboxLimits(min_free_bytes=512 * KIB, reserve_bytes=256 * KIB, max_bytes=1 << 40)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with tiny_disk(tmp_path / "disk") as d:
        yield d


def add(ob: Outbox, i: int, pad: int = 1500) -> None:
    ob.accept_input(f"i{i}", source="s", pipeline="p", spool_path=None, meta={})
    ob.add_result(f"i{i}", pipeline="p", model="m", model_version="1", body={"pad": "x" * pad, "i": i})


def wal_size(db: Path) -> int:
    wal = Path(f"{db}-wal")
    return wal.stat().st_size if wal.exists() else 0



# ----------------------------------------------------------------------------------------------- the outbox


def test_the_log_is_bounded_and_truncated_after_deletes(disk: Path) -> None:
    """Found: after 30 results a 1 MB log beside a 4 KB database, never checkpointed, until it filled the disk."""
    db = disk / "outbox.db"
    ob = Outbox(db, "d", LIMITS)
    try:
        for i in range(120):
            add(ob, i)
            assert wal_size(db) <= 1100 * KIB  # bounded by wal_autocheckpoint / journal_size_limit
        assert db.stat().st_size > 100 * KIB  # checkpointed into the database as it went
        assert ob.ack_through(120) == 120
        wait_until(lambda: wal_size(db) == 0, 5, "the log truncated after the deletion")
        assert ob.stats().backlog == 0 and ob.disk_state == "ok"
    finally:
        ob.close()


def test_acknowledged_rows_are_deleted_on_a_disk_full_to_the_last_byte(
    disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found: every delete failed for good with "database or disk is full"; now the reserve pays for them."""
    db = disk / "outbox.db"
    ob = Outbox(db, "d", LIMITS)
    for i in range(150):
        add(ob, i)
    ob.close()  # checkpointed, log deleted: the next write needs new blocks
    ob = Outbox(db, "d", LIMITS)
    try:
        assert ob.stats().reserve_held and wal_size(db) == 0
        assert fill(disk) == 0  # the last byte is gone: not even a one-row delete fits in the log now
        with pytest.raises(StorageFullError):
            ob.accept_input("late", source="s", pipeline="p", spool_path=None, meta={})
        grown = db.stat().st_size
        assert ob.ack_through(150) == 150  # released the reserve, deleted in small transactions
        assert ob.stats().backlog == 0
        wait_until(lambda: db.stat().st_size < grown // 2, 5, "the freed pages given back to the disk")
        assert "released the 262144-byte reserve" in caplog.text
        assert ob.disk_state in ("low", "full")
        with pytest.raises(StorageFullError):  # new inputs still wait: the reserve is spent
            ob.accept_input("late", source="s", pipeline="p", spool_path=None, meta={})
        unfill(disk)
        t0 = time.monotonic()
        wait_until(lambda: ob.disk_state == "ok" and ob.stats().reserve_held, 5, "space back, reserve again")
        recovered = time.monotonic() - t0
        add(ob, 1000)  # takes inputs again, no restart
        assert ob.stats().backlog == 1
        assert recovered < 2.5, recovered
    finally:
        ob.close()


def test_an_outbox_opens_on_a_full_disk_and_refuses_inputs(disk: Path) -> None:
    """A restart on a full disk: the outbox opens (the reserve pays for its log and shared memory)."""
    db = disk / "outbox.db"
    ob = Outbox(db, "d", LIMITS)
    for i in range(20):
        add(ob, i)
    ob.accept_input("waiting", source="s", pipeline="p", spool_path=None, meta={})
    ob.close()
    fill(disk)
    ob = Outbox(db, "d", LIMITS)
    try:
        assert ob.stats().backlog == 20 and [p.input_id for p in ob.pending_inputs()] == ["waiting"]
        assert ob.disk_state != "ok"
        with pytest.raises(StorageFullError):
            ob.check_capacity()
        assert ob.ack_through(20) == 20
        ob.add_result("waiting", pipeline="p", model="m", model_version="1", body={})  # accepted: still stored
    finally:
        ob.close()


# ----------------------------------------------------------------------------------------------- the folder


def _folder(tmp_path: Path, spool: Path, journal: Outbox, **kw: Any) -> FolderSource:
    cfg = FolderSourceConfig(type="folder", name="inbox", pipeline="p", path=tmp_path / "inbox", settle_s=0,
                             poll_interval_s=0.05, **kw)
    held: list[Future[PipelineOutput]] = []

    def submit(item: InputItem) -> Future[PipelineOutput]:
        fut: Future[PipelineOutput] = Future()
        held.append(fut)  # never finishes: the test looks at what was accepted
        return fut

    return FolderSource(cfg, spool_dir=spool, journal=journal, submit=submit)


def test_a_copy_into_a_full_spool_leaves_no_partial_and_no_unjournalled_file(tmp_path: Path, disk: Path) -> None:
    """Found: ``_take`` left 2 partial ``.incoming`` files and 7 spool files with no journal row."""
    journal = Outbox(tmp_path / "outbox.db", "d", OutboxLimits(min_free_bytes=0))
    src = _folder(tmp_path, disk / "spool", journal)  # inbox on the normal disk, spool on the tmpfs: copies
    try:
        for d in (src.cfg.path, src.spool_dir):
            d.mkdir(parents=True, exist_ok=True)
        for i in range(8):
            (src.cfg.path / f"leaf-{i}.jpg").write_bytes(os.urandom(300 * KIB))
        fill(disk, leave=700 * KIB)  # room for two copies, not three
        taken = src.scan_once()
        spool = sorted(p.name for p in src.spool_dir.iterdir())
        assert [n for n in spool if n.endswith(".incoming")] == []
        assert len(spool) == taken == 2
        assert all(journal.input_state(n.partition("--")[0]) == "pending" for n in spool)  # every one journalled
        assert len(list(src.cfg.path.glob("leaf-*.jpg"))) == 6  # the rest wait, untouched
        assert src.health()["state"] == "full"
        unfill(disk)
        src.scan_once()
        assert len(list(src.spool_dir.iterdir())) == 8  # max_in_flight 8: all taken once there is room
    finally:
        src.stop(2)
        journal.close()


def test_start_cleans_partial_copies_and_puts_unjournalled_files_back_while_full(tmp_path: Path, disk: Path) -> None:
    journal = Outbox(disk / "outbox.db", "d", LIMITS)
    src = _folder(tmp_path, disk / "spool", journal)
    try:
        src.spool_dir.mkdir(parents=True)
        src.cfg.path.mkdir(parents=True)
        (src.spool_dir / ".f-1--a.jpg.incoming").write_bytes(b"half a copy")
        (src.spool_dir / "f-0123456789ab--orphan.jpg").write_bytes(b"moved, never journalled")
        fill(disk)
        src.start()
        assert not (src.spool_dir / ".f-1--a.jpg.incoming").exists()
        assert (src.cfg.path / "orphan.jpg").read_bytes() == b"moved, never journalled"  # back, not lost
        assert list(src.spool_dir.iterdir()) == []
        unfill(disk)
        wait_until(lambda: not (src.cfg.path / "orphan.jpg").exists(), 5, "the file taken once space returned")
        (taken,) = list(src.spool_dir.iterdir())
        assert journal.input_state(taken.name.partition("--")[0]) == "pending"
    finally:
        src.stop(2)
        journal.close()


# ----------------------------------------------------------------------------------------------- HTTP


def test_uploads_get_507_while_full_and_200_once_space_returns(tmp_path: Path, disk: Path) -> None:
    from fastapi.testclient import TestClient

    from edge_agent.api import ApiContext, create_app
    from edge_agent.config import HttpConfig
    from edge_agent.flow.pipeline import Pipeline
    from edge_agent.sectors.crop import crop_verdict
    from tests.support.api_harness import LOCAL, advice_book, fake_crop_model, leaf_jpeg

    outbox = Outbox(disk / "outbox.db", "d", LIMITS)
    spool = disk / "spool" / "http"
    spool.mkdir(parents=True)
    pipeline = Pipeline("crop", [fake_crop_model()], outbox, kind="crop",
                        sector=lambda result, item: crop_verdict(result, item.hints))
    pipeline.start()
    from prometheus_client import CollectorRegistry

    ctx = ApiContext(settings=HttpConfig(), spool_dir=spool, outbox=outbox, submit=pipeline.submit,
                     models=lambda: [], is_ready=lambda: True, registry=CollectorRegistry(), pipeline="crop",
                     advice=advice_book())
    try:
        with TestClient(create_app(ctx), base_url=LOCAL) as client:
            fill(disk, leave=256 * KIB)
            r = client.post("/v1/diagnose", content=leaf_jpeg(), headers={"content-type": "image/jpeg"})
            assert r.status_code == 507 and r.json()["error"]["code"] == "storage_full"
            assert int(r.headers["retry-after"]) > 0 and list(spool.iterdir()) == []
            unfill(disk)
            r = client.post("/v1/diagnose", content=leaf_jpeg(), headers={"content-type": "image/jpeg"})
            assert r.status_code == 200, r.text
    finally:
        pipeline.stop(5)
        outbox.close()


# ----------------------------------------------------------------------------------------------- the real agent


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _drop(inbox: Path, prefix: str, n: int, rng: np.random.Generator) -> None:
    for i in range(n):
        tmp = inbox / f".{prefix}-{i:03d}.png"
        tmp.write_bytes(_png(rng))
        tmp.rename(inbox / f"{prefix}-{i:03d}.png")


def _agent_config(tmp_path: Path, state: Path, port: int, **outbox: Any) -> Path:
    labels = ["Apple___healthy", "Apple___Apple_scab", "Corn___healthy"]
    bundle = tmp_path / "models" / "tiny_leaf"
    bundle.mkdir(parents=True, exist_ok=True)
    onnx_path = tiny_classifier(bundle / "model.onnx", n_classes=len(labels))
    write_bundle(bundle, classifier_manifest(onnx_path, labels, name="tiny_leaf", thresholds={"ood": 5.0}))
    (tmp_path / "inbox").mkdir(exist_ok=True)
    ob = {"min_free_bytes": "512KiB", "reserve_bytes": "256KiB", **outbox}
    config = tmp_path / "agent.yaml"
    config.write_text(f"""\
device_id: dev-disk
state_dir: {state}
models_dir: {tmp_path / 'models'}
shutdown_timeout_s: 5
models: [{{name: leaf, bundle: tiny_leaf}}]
pipelines: [{{name: crop, kind: crop, model: leaf, workers: 1, queue_size: 8}}]
sources:
  - {{type: folder, name: inbox, pipeline: crop, path: {tmp_path / 'inbox'}, poll_interval_s: 0.05, settle_s: 0}}
mqtt: {{host: 127.0.0.1, port: {port}, heartbeat_s: 1, reconnect_max_s: 1, republish_after_s: 2}}
outbox: {orjson.dumps(ob).decode()}
metrics: {{enabled: false}}
""")
    return config


def _run(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _last_heartbeat(coordinator: Any, device: str) -> dict[str, Any]:
    for d in coordinator.store.devices():
        if d.get("device") == device and isinstance(d.get("heartbeat"), dict):
            return dict(d["heartbeat"])
    return {}


def test_real_agent_waits_on_a_full_disk_and_recovers_by_itself_exactly_once(tmp_path: Path, disk: Path) -> None:
    """Found: the log took the disk, deletes failed for good, 58 files sat in the inbox for minutes after the
    space was freed. Now: files wait in the folder, the heartbeat says so, and everything arrives once, promptly."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    coordinator = start_coordinator(tmp_path / "c.db", broker.port)
    config = _agent_config(tmp_path, disk, broker.port)
    inbox = tmp_path / "inbox"
    rng = np.random.default_rng(7)
    proc = _run(config, tmp_path / "agent.log")

    def stored() -> int:
        return coordinator.store.count_results("dev-disk")

    try:
        _drop(inbox, "a", 20, rng)
        wait_until(lambda: stored() >= 20, 30, "the first 20 results")
        for _ in range(20):  # keep the disk full while the agent frees what it can (its log, its reserve)
            fill(disk)
            time.sleep(0.1)  # sampling the disk while the agent works; not synchronisation
            if free_bytes(disk) == 0 and not (disk / "outbox.db.reserve").exists():
                break
        _drop(inbox, "b", 40, rng)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # three seconds full: nothing may be taken
            fill(disk)
            time.sleep(0.1)
        assert len(list(inbox.glob("b-*.png"))) == 40  # waiting in the folder, untouched
        assert proc.poll() is None
        wait_until(lambda: _last_heartbeat(coordinator, "dev-disk").get("outbox", {}).get("disk_state")
                   in ("low", "full"), 10, "a heartbeat saying the disk is short of space")
        unfill(disk)
        t0 = time.monotonic()
        wait_until(lambda: stored() >= 60 and not list(inbox.glob("*.png")), 30, "all 60 stored")
        recovery_s = time.monotonic() - t0
        print(f"\nall 40 waiting files stored {recovery_s:.2f} s after the space was freed")
        assert recovery_s < 10
        ids = coordinator.store.result_ids("dev-disk")
        assert len(ids) == stored() == 60  # exactly once
        assert proc.poll() is None
        wait_until(lambda: _last_heartbeat(coordinator, "dev-disk").get("outbox", {}).get("disk_state") == "ok",
                   10, "a heartbeat saying the disk is fine again")
    finally:
        _stop(proc)
        coordinator.stop()
        broker.close()


def test_a_start_below_min_free_waits_instead_of_exiting(tmp_path: Path, disk: Path) -> None:
    """Found: a restart below ``min_free_bytes`` exited 2, which the unit's RestartPreventExitStatus=2 never
    restarts. Now the agent starts degraded and takes files once there is room; an outbox that cannot even be
    created exits 75, which the unit restarts."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    coordinator = start_coordinator(tmp_path / "c.db", broker.port)
    inbox = tmp_path / "inbox"
    config = _agent_config(tmp_path, disk / "state", broker.port)
    try:
        fill(disk)  # nothing at all: not even an outbox can be created
        proc = _run(config, tmp_path / "agent1.log")
        assert proc.wait(30) == 75, (tmp_path / "agent1.log").read_text()
        unfill(disk)
        proc = _run(config, tmp_path / "agent2.log")  # creates its outbox, then stops: a later start finds one
        wait_until((disk / "state" / "outbox.db.epoch").exists, 30, "the outbox")
        _stop(proc)
        fill(disk, leave=64 * KIB)
        _drop(inbox, "c", 10, np.random.default_rng(1))
        proc = _run(config, tmp_path / "agent3.log")
        try:
            wait_until(lambda: "not taking files" in (tmp_path / "agent3.log").read_text(), 30, "the refusal")
            assert proc.poll() is None and len(list(inbox.glob("c-*.png"))) == 10
            unfill(disk)
            wait_until(lambda: coordinator.store.count_results("dev-disk") >= 10, 30, "the 10 files stored")
            assert proc.poll() is None
        finally:
            _stop(proc)
    finally:
        coordinator.stop()
        broker.close()


def test_the_systemd_unit_restarts_everything_but_a_config_error() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy" / "edge-agent.service")
    service = unit["Service"]
    assert service["Restart"] in ("on-failure", "always")
    prevented = service.get("RestartPreventExitStatus", "").split()
    assert "75" not in prevented and prevented == ["2"]  # 2: config or model invalid; 75: disk full at start
    assert unit["Unit"].get("StartLimitIntervalSec") == "0"  # never give up restarting after a long outage
