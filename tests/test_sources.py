"""Sources: the watched folder (spool, done/, rejected/ with reasons, recovery) and the camera
(reconnect state machine, latest-frame-wins drops, redaction), with fakes and a real OpenCV file."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from edge_agent.config import Backoff, CameraSourceConfig, FolderSourceConfig
from edge_agent.delivery.interface import PendingInput
from edge_agent.errors import ImageEmptyError, OverloadedError, StorageFullError
from edge_agent.flow.pipeline import InputItem, PipelineOutput
from edge_agent.flow.sources.camera import (
    CameraSource,
    SyntheticCapture,
    backoff_delay,
    redact_url,
    with_credentials,
)
from edge_agent.flow.sources.folder import FolderSource, durable_move
from edge_agent.flow.sources.opencv import OpenCvCapture
from edge_agent.metrics import Metrics
from edge_agent.types import Image

from .support.wait import wait_for

T = 10.0


class Journal:
    """In-memory stand-in for the outbox's input journal."""

    def __init__(self) -> None:
        self.inputs: dict[str, dict[str, Any]] = {}
        self.full = False

    def check_capacity(self) -> None:
        if self.full:
            raise StorageFullError("outbox full")

    def accept_input(
        self, input_id: str, *, source: str, pipeline: str, spool_path: str | None, meta: dict[str, Any],
        idempotency_key: str | None = None,
    ) -> bool:
        self.check_capacity()
        if input_id in self.inputs:
            return False
        self.inputs[input_id] = {"state": "pending", "spool_path": spool_path, "meta": meta, "source": source}
        return True

    def input_state(self, input_id: str) -> str | None:
        return self.inputs[input_id]["state"] if input_id in self.inputs else None

    def reject_input(self, input_id: str, code: str, message: str) -> None:
        self.inputs[input_id]["state"] = "rejected"

    def pending_inputs(self) -> list[PendingInput]:
        return [
            PendingInput(i, v.get("source", "inbox"), "p", v["spool_path"], v["meta"], 0.0)
            for i, v in self.inputs.items() if v["state"] == "pending"
        ]


class FakePipeline:
    """Resolves futures from the spool file's bytes: b'' is an empty image; b'hold' waits for release."""

    def __init__(self, journal: Journal, capacity: int = 100) -> None:
        self.journal = journal
        self.capacity = capacity
        self.items: list[InputItem] = []
        self.held: list[tuple[InputItem, Future[PipelineOutput]]] = []
        self.lock = threading.Lock()

    def submit(self, item: InputItem) -> Future[PipelineOutput]:
        with self.lock:
            if len(self.held) >= self.capacity:
                raise OverloadedError("full")
            self.items.append(item)
        fut: Future[PipelineOutput] = Future()
        data = Path(item.spool_path).read_bytes() if item.spool_path else b"frame"
        if data == b"hold" or item.image is not None:
            with self.lock:
                self.held.append((item, fut))
            return fut
        self._resolve(item, fut, data)
        return fut

    def _resolve(self, item: InputItem, fut: Future[PipelineOutput], data: bytes) -> None:
        if not data:
            self.journal.reject_input(item.input_id, "image_empty", "empty")
            fut.set_exception(ImageEmptyError("empty file"))
            return
        if item.input_id in self.journal.inputs:
            self.journal.inputs[item.input_id]["state"] = "done"
        fut.set_result(PipelineOutput(stored=None, result=None, sector={}))  # type: ignore[arg-type]

    def release_all(self) -> None:
        with self.lock:
            held, self.held = self.held, []
        for item, fut in held:
            self._resolve(item, fut, b"ok")


def folder_cfg(tmp_path: Path, **kw: Any) -> FolderSourceConfig:
    inbox = tmp_path / "inbox"
    base: dict[str, Any] = {
        "type": "folder",
        "name": "inbox",
        "pipeline": "p",
        "path": inbox,
        "settle_s": 0.0,
        "poll_interval_s": 0.02,
        "done_dir": inbox / "done",
        "rejected_dir": inbox / "rejected",
        "max_file_bytes": 1000,
    }
    base.update(kw)
    return FolderSourceConfig.model_validate(base)


def make_folder(tmp_path: Path, **kw: Any) -> tuple[FolderSource, Journal, FakePipeline]:
    journal = Journal()
    pipe = FakePipeline(journal)
    src = FolderSource(folder_cfg(tmp_path, **kw), spool_dir=tmp_path / "spool", journal=journal, submit=pipe.submit)
    for d in (src.cfg.path, src.done_dir, src.rejected_dir, src.spool_dir):
        d.mkdir(parents=True, exist_ok=True)
    return src, journal, pipe


def reason(src: FolderSource, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads((src.rejected_dir / f"{name}.reason.json").read_bytes())
    return doc


# --- folder --------------------------------------------------------------------------------------------------------


def test_good_file_goes_through_spool_to_done(tmp_path: Path) -> None:
    src, journal, pipe = make_folder(tmp_path)
    (src.cfg.path / "leaf.jpg").write_bytes(b"image")
    assert src.scan_once() == 1
    assert (src.done_dir / "leaf.jpg").read_bytes() == b"image"
    assert not (src.cfg.path / "leaf.jpg").exists()
    assert list(src.spool_dir.iterdir()) == []
    (input_id,) = journal.inputs
    assert journal.inputs[input_id]["state"] == "done"
    assert journal.inputs[input_id]["meta"]["original_name"] == "leaf.jpg"
    assert pipe.items[0].spool_path is not None and pipe.items[0].source == "inbox"


def test_files_are_taken_in_name_order_with_their_modification_time_as_capture_time(tmp_path: Path) -> None:
    src, _journal, pipe = make_folder(tmp_path, max_in_flight=2)
    for n in (3, 1, 2):  # written out of order; named by time
        f = src.cfg.path / f"frame_{n:03d}.jpg"
        f.write_bytes(b"image")
        os.utime(f, (1_700_000_000.0 + n / 10, 1_700_000_000.0 + n / 10))
    while src.scan_once():
        pass
    assert [Path(i.spool_path or "").name.split("--")[1] for i in pipe.items] == [
        "frame_001.jpg", "frame_002.jpg", "frame_003.jpg"]
    assert [float(i.hints["captured_at"]) for i in pipe.items] == pytest.approx([1_700_000_000.1, 1_700_000_000.2,
                                                                                 1_700_000_000.3])


def test_a_move_across_file_systems_keeps_the_capture_time(tmp_path: Path) -> None:
    src = tmp_path / "a.jpg"
    src.write_bytes(b"image")
    os.utime(src, ns=(1_800_000_000_123_456_789, 1_800_000_000_123_456_789))
    real_rename = os.rename

    def rename(a: Any, b: Any) -> None:
        if Path(a) == src:
            raise OSError(18, "Invalid cross-device link")  # as if the spool were on another disk
        real_rename(a, b)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "rename", rename)
        durable_move(src, tmp_path / "b.jpg")
    assert not src.exists() and (tmp_path / "b.jpg").stat().st_mtime_ns == 1_800_000_000_123_456_789


@pytest.mark.parametrize(
    ("case", "name", "content", "code"),
    [
        ("empty image (pipeline rejects)", "empty.jpg", b"", "image_empty"),
        ("wrong extension", "notes.txt", b"hello", "image_unsupported_format"),
        ("pdf named .pdf", "doc.pdf", b"%PDF-1.4", "image_unsupported_format"),
        ("too large", "huge.png", b"x" * 1001, "image_too_large"),
    ],
)
def test_bad_files_go_to_rejected_with_reason(tmp_path: Path, case: str, name: str, content: bytes, code: str) -> None:
    src, _, _ = make_folder(tmp_path)
    (src.cfg.path / name).write_bytes(content)
    src.scan_once()
    assert (src.rejected_dir / name).read_bytes() == content, case
    doc = reason(src, name)
    assert doc["code"] == code and doc["file"] == name and doc["message"]
    assert not (src.cfg.path / name).exists()
    assert list(src.done_dir.iterdir()) == []


def test_symlink_is_rejected_without_following_it(tmp_path: Path) -> None:
    src, _, pipe = make_folder(tmp_path)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"do not read")
    os.symlink(secret, src.cfg.path / "link.jpg")
    src.scan_once()
    assert pipe.items == []
    assert reason(src, "link.jpg")["code"] == "input_invalid"
    assert secret.read_bytes() == b"do not read"


def test_hidden_temp_and_unsettled_files_are_left_alone(tmp_path: Path) -> None:
    src, _, pipe = make_folder(tmp_path, settle_s=3600.0)
    for name in (".partial.jpg", "upload.jpg.part", "x.tmp", "fresh.jpg"):
        (src.cfg.path / name).write_bytes(b"data")
    (src.cfg.path / "subdir").mkdir()
    assert src.scan_once() == 0
    assert pipe.items == []
    assert sorted(p.name for p in src.cfg.path.iterdir()) == sorted(
        [".partial.jpg", "upload.jpg.part", "x.tmp", "fresh.jpg", "subdir", "done", "rejected"]
    )


def test_same_name_twice_keeps_both_in_done(tmp_path: Path) -> None:
    src, _, _ = make_folder(tmp_path)
    for content in (b"one", b"two"):
        (src.cfg.path / "leaf.jpg").write_bytes(content)
        src.scan_once()
    assert sorted(p.read_bytes() for p in src.done_dir.iterdir()) == [b"one", b"two"]


def test_full_outbox_leaves_files_in_the_folder(tmp_path: Path) -> None:
    src, journal, pipe = make_folder(tmp_path)
    journal.full = True
    (src.cfg.path / "leaf.jpg").write_bytes(b"image")
    assert src.scan_once() == 0
    assert (src.cfg.path / "leaf.jpg").exists() and pipe.items == []
    assert src.health()["state"] == "full" and src.refused_full == 1
    journal.full = False
    assert src.scan_once() == 1
    assert (src.done_dir / "leaf.jpg").exists()


def test_max_in_flight_bounds_what_is_taken(tmp_path: Path) -> None:
    src, _, pipe = make_folder(tmp_path, max_in_flight=2)
    for i in range(5):
        (src.cfg.path / f"{i}.jpg").write_bytes(b"hold")
    assert src.scan_once() == 2
    assert src.scan_once() == 0
    assert len(list(src.cfg.path.glob("*.jpg"))) == 3
    pipe.release_all()
    assert src.scan_once() == 2


def test_overloaded_pipeline_keeps_input_waiting_in_spool(tmp_path: Path) -> None:
    src, _, pipe = make_folder(tmp_path)
    pipe.capacity = 0
    (src.cfg.path / "a.jpg").write_bytes(b"hold")
    assert src.scan_once() == 1
    assert pipe.items == [] and len(list(src.spool_dir.iterdir())) == 1
    assert src.health()["waiting"] == 1
    pipe.capacity = 10
    src.scan_once()
    assert len(pipe.items) == 1


def test_recovery_after_crash_reconciles_spool_with_journal(tmp_path: Path) -> None:
    src, journal, pipe = make_folder(tmp_path)
    spool = src.spool_dir
    (spool / "f-orphan--a.jpg").write_bytes(b"image")  # moved, crash before the journal row
    (spool / "f-pending--b.jpg").write_bytes(b"image")  # journalled, crash before the result
    (spool / "f-done--c.jpg").write_bytes(b"image")  # result stored, crash before filing
    for input_id, state in (("f-pending", "pending"), ("f-done", "done")):
        journal.inputs[input_id] = {"state": state, "spool_path": None, "meta": {}}
    src.recover()
    src.scan_once()
    assert sorted(p.name for p in src.done_dir.iterdir()) == ["a.jpg", "b.jpg", "c.jpg"]
    assert {i.input_id for i in pipe.items} == {"f-orphan", "f-pending"}
    assert journal.inputs["f-orphan"]["meta"]["recovered"] is True
    assert list(spool.iterdir()) == []


def test_watcher_thread_picks_up_files_and_stops(tmp_path: Path) -> None:
    journal = Journal()
    pipe = FakePipeline(journal)
    registry = CollectorRegistry()
    src = FolderSource(folder_cfg(tmp_path), spool_dir=tmp_path / "spool", journal=journal, submit=pipe.submit,
                       metrics=Metrics(registry))
    src.start()
    try:
        assert registry.get_sample_value("edge_agent_source_up", {"source": "inbox"}) == 1
        (src.cfg.path / "leaf.jpg").write_bytes(b"image")
        assert wait_for((src.done_dir / "leaf.jpg").exists)
    finally:
        assert src.stop(T)
    assert registry.get_sample_value("edge_agent_source_up", {"source": "inbox"}) == 0


# --- camera --------------------------------------------------------------------------------------------------------


def cam_cfg(**kw: Any) -> CameraSourceConfig:
    base: dict[str, Any] = {
        "type": "camera",
        "name": "cam",
        "pipeline": "p",
        "url": "rtsp://cam.local:554/live",
        "max_fps": 240.0,
        "read_failures": 2,
        "reconnect": Backoff(initial_s=0.01, max_s=0.04, multiplier=2.0),
    }
    base.update(kw)
    return CameraSourceConfig.model_validate(base)


def test_backoff_grows_exponentially_and_is_capped() -> None:
    assert [backoff_delay(n, 1.0, 30.0, 2.0) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_credentials_are_inserted_and_redacted() -> None:
    url = with_credentials("rtsp://cam.local:554/live?channel=1", "viewer", "p@ss:w/rd")
    assert url.startswith("rtsp://viewer:p%40ss%3Aw%2Frd@cam.local:554/")
    assert redact_url(url) == "rtsp://viewer:***@cam.local:554/live?channel=1"
    assert redact_url("http://cam/x.mjpg?user=a&password=hunter2") == "http://cam/x.mjpg?user=a&password=***"
    assert redact_url("0") == "0"


def test_camera_reconnects_with_backoff_and_reports_health(caplog: pytest.LogCaptureFixture) -> None:
    journal = Journal()
    pipe = FakePipeline(journal, capacity=1000)
    cap = SyntheticCapture(opens=[False, False, True], fail_reads_after=3)
    cfg = cam_cfg(username="viewer", max_in_flight=64)
    cfg = cfg.model_copy(update={"password": __import__("pydantic").SecretStr("hunter2")})
    registry = CollectorRegistry()
    factory_urls: list[str] = []

    def factory(url: str) -> SyntheticCapture:
        factory_urls.append(url)
        return cap

    src = CameraSource(cfg, submit=pipe.submit, capture_factory=factory, metrics=Metrics(registry))
    caplog.set_level(logging.DEBUG)
    src.start()
    try:
        # two failed opens, then 3 frames per connection before the stream dies, again and again
        assert wait_for(lambda: cap.total_frames >= 9 and src.reconnects >= 4)
    finally:
        assert src.stop(T)
    health = src.health()
    assert health["state"] == "stopped" and health["frames"] >= 9
    assert health["url"] == "rtsp://viewer:***@cam.local:554/live"
    assert "hunter2" in factory_urls[0]  # the capture gets the real URL ...
    assert "hunter2" not in caplog.text  # ... the logs never do
    assert cap.open_calls >= 5
    assert registry.get_sample_value("edge_agent_source_reconnects_total", {"source": "cam"}) == src.reconnects
    assert all(i.image is not None and i.image.color == "BGR" for i in pipe.items)
    assert len({i.input_id for i in pipe.items}) == len(pipe.items)


def test_latest_frame_wins_and_drops_are_counted() -> None:
    journal = Journal()
    pipe = FakePipeline(journal, capacity=1000)
    cap = SyntheticCapture(width=64, height=48)
    registry = CollectorRegistry()
    src = CameraSource(cam_cfg(max_in_flight=1), submit=pipe.submit, capture_factory=lambda _u: cap,
                       metrics=Metrics(registry))
    src.start()
    try:
        assert wait_for(lambda: src.frames >= 20)
        assert len(pipe.items) == 1  # the first frame is still "in inference": every later one dropped
        n = src.frames
        pipe.release_all()
        assert wait_for(lambda: len(pipe.items) == 2)
        second = int(pipe.items[1].hints["frame"])
        assert second >= n >= 20  # the frame submitted next is a fresh one, not a queued stale one
    finally:
        src.stop(T)
        pipe.release_all()
    assert src.dropped == src.frames - src.submitted > 0
    dropped = registry.get_sample_value("edge_agent_frames_dropped_total", {"source": "cam", "reason": "superseded"})
    assert dropped is not None and dropped >= src.dropped - 1


def test_overloaded_pipeline_drops_frames_and_counts_them() -> None:
    journal = Journal()
    pipe = FakePipeline(journal, capacity=0)
    cap = SyntheticCapture(width=32, height=32)
    src = CameraSource(cam_cfg(max_in_flight=5), submit=pipe.submit, capture_factory=lambda _u: cap)
    src.start()
    try:
        assert wait_for(lambda: src.dropped >= 10)
    finally:
        src.stop(T)
    assert src.submitted == 0 and pipe.items == []


def test_max_fps_limits_submissions() -> None:
    journal = Journal()
    pipe = FakePipeline(journal, capacity=10_000)
    cap = SyntheticCapture(width=32, height=32, fps=200)
    src = CameraSource(cam_cfg(max_fps=20.0, max_in_flight=64), submit=pipe.submit, capture_factory=lambda _u: cap)
    src.start()
    try:
        assert wait_for(lambda: src.frames >= 60)
    finally:
        src.stop(T)
        pipe.release_all()
    assert 0 < src.submitted < src.frames / 3


def test_opencv_capture_reads_a_real_video_file(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (64, 48))
    for i in range(5):
        frame = np.full((48, 64, 3), i * 40, np.uint8)
        writer.write(frame)
    writer.release()
    cap = OpenCvCapture(str(path))
    assert cap.open()
    frames = []
    while True:
        ok, got = cap.read()
        if not ok or got is None:
            break
        frames.append(got)
    cap.release()
    assert len(frames) == 5 and frames[0].shape == (48, 64, 3)
    assert not OpenCvCapture(str(tmp_path / "missing.avi")).open()


def test_opencv_capture_keeps_stream_credentials_off_stderr(tmp_path: Path) -> None:
    script = (
        "from edge_agent.flow.sources.opencv import OpenCvCapture\n"
        "c = OpenCvCapture('rtsp://user:s3cret@127.0.0.1:9/x', open_timeout_ms=2000)\n"
        "print(c.open())\n"
    )
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENCV_FFMPEG_LOGLEVEL"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, env=env, check=True)
    assert out.stdout.strip() == b"False"
    assert b"s3cret" not in out.stderr and b"127.0.0.1:9" not in out.stderr


# --- the Capture contract, run against the real OpenCV adapter and the synthetic fake ----------------------------


def _clip(tmp_path: Path, frames: int = 4) -> str:
    path = tmp_path / "contract.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (64, 48))
    for i in range(frames):
        writer.write(np.full((48, 64, 3), 30 * i, np.uint8))
    writer.release()
    return str(path)


@pytest.mark.parametrize("kind", ["opencv", "synthetic"])
def test_capture_contract(tmp_path: Path, kind: str) -> None:
    cap: OpenCvCapture | SyntheticCapture
    cap = OpenCvCapture(_clip(tmp_path)) if kind == "opencv" else SyntheticCapture(64, 48, fail_reads_after=4)
    assert cap.open()
    for _ in range(4):
        ok, frame = cap.read()
        assert ok and frame is not None
        assert frame.dtype == np.uint8 and frame.shape == (48, 64, 3)
    ok, frame = cap.read()  # the end of the clip / a dead stream
    assert not ok and frame is None
    cap.release()
    assert cap.read() == (False, None)


def test_fake_source_pushes_into_a_pipeline() -> None:
    from edge_agent.flow.sources.fake import FakeSource

    journal = Journal()
    pipe = FakePipeline(journal)
    src = FakeSource("fake", "p", pipe.submit)
    src.start()
    fut = src.push(image=Image.from_array(np.zeros((4, 4, 3), np.uint8)))
    assert not fut.done() and src.health() == {"type": "fake", "state": "watching", "pushed": 1}
    pipe.release_all()
    assert fut.result(T) is not None
    assert [i.input_id for i in pipe.items] == ["fake-1"]


def test_keep_done_false_deletes_processed_files(tmp_path: Path) -> None:
    src, _, _ = make_folder(tmp_path, keep_done=False)
    (src.cfg.path / "leaf.jpg").write_bytes(b"image")
    assert src.scan_once() == 1
    assert list(src.done_dir.iterdir()) == [] and list(src.spool_dir.iterdir()) == []
    assert src.health()["done"] == 1


# --- a real network camera: MJPEG over HTTP through OpenCV's FFmpeg backend ----------------------------------------


class _StreamCamera:
    """A camera server in its own process on ``port`` (MJPEG over HTTP, or RTSP through GStreamer's RTSP server);
    ``stop`` kills it (only it) by PID."""

    def __init__(self, kind: str, port: int, level: int) -> None:
        import subprocess
        import sys

        root = Path(__file__).resolve().parent.parent
        if kind == "mjpeg":
            cmd = [sys.executable, "-m", "tests.support.mjpeg_camera", str(port), str(level)]
            self.url = f"http://127.0.0.1:{port}/stream.mjpg"
        else:  # the GObject bindings are a Debian package: the system Python has them, the venv does not
            cmd = ["/usr/bin/python3", str(root / "tests" / "support" / "rtsp_camera.py"), str(port), str(level)]
            self.url = f"rtsp://127.0.0.1:{port}/cam"
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.port = port
        if not wait_for(self._listening, timeout=T):
            self.stop()
            raise AssertionError(f"the {kind} camera did not start: {self.proc.stderr.read()[-2000:]!r}")  # type: ignore[union-attr]

    def _listening(self) -> bool:
        import socket

        if self.proc.poll() is not None:
            return False  # exited: wait_for runs out and the caller says so
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(T)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.mark.parametrize("kind", ["mjpeg", "rtsp"])
def test_camera_source_reconnects_to_a_real_network_stream_that_goes_away(kind: str) -> None:
    """The camera (an MJPEG-over-HTTP or an RTSP server in its own process) is killed mid-stream and comes back: the
    source notices through OpenCV's real FFmpeg backend, reconnects with backoff and streams the new camera's
    frames."""
    from tests.support.broker import free_port

    port = free_port()
    levels: list[float] = []
    lock = threading.Lock()

    def submit(item: InputItem) -> Future[PipelineOutput]:
        assert item.image is not None
        with lock:
            levels.append(float(item.image.pixels[:, 100:, :].mean()))  # right of the moving bar
        fut: Future[PipelineOutput] = Future()
        fut.set_result(PipelineOutput(stored=None, result=None, sector={}))  # type: ignore[arg-type]
        return fut

    def seen(lo: float, hi: float) -> int:
        with lock:
            return sum(lo <= v <= hi for v in levels)

    first = _StreamCamera(kind, port, 60)
    second: _StreamCamera | None = None
    cfg = cam_cfg(url=first.url, max_fps=100.0, read_failures=1,
                  reconnect=Backoff(initial_s=0.05, max_s=0.2, multiplier=2.0))
    src = CameraSource(cfg, submit=submit,
                       capture_factory=lambda url: OpenCvCapture(url, open_timeout_ms=2000, read_timeout_ms=2000))
    try:
        src.start()
        assert wait_for(lambda: seen(40, 80) >= 10, timeout=30), src.health()
        assert src.health()["state"] == "streaming" and src.reconnects == 0
        first.stop()  # the camera goes away mid-stream
        assert wait_for(lambda: src.reconnects >= 1 and src.health()["state"] in ("backoff", "connecting"),
                        timeout=30), src.health()
        second = _StreamCamera(kind, port, 180)  # ... and comes back (another picture, to tell its frames apart)
        assert wait_for(lambda: seen(160, 200) >= 10, timeout=30), src.health()
        assert src.health()["state"] == "streaming"
    finally:
        src.stop(T)
        first.stop()
        if second is not None:
            second.stop()
    frames = src.health()["frames"]
    assert frames >= 20 and seen(40, 80) + seen(160, 200) == len(levels), levels  # whole frames, from one camera
