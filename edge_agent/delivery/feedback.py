"""Operator feedback on inspected parts, and the recent images it needs.

An inspection pipeline's results go out and are deleted once the coordinator has them, and the photo of a part
goes with its input (an upload's spool file is deleted, a folder's is filed, a camera frame lives in memory). So
that an operator can still say "this reject was a good part" (``false_reject``) or "this pass had a defect"
(``missed_defect``) a while later, the agent keeps the images of the last ``inspection.keep_images`` parts of each
pipeline (and at most ``inspection.keep_max_bytes`` of them)::

    <state_dir>/inspected/<pipeline>/<result_id>.<jpg|png|webp>     recent images, oldest deleted first
    <state_dir>/feedback/<pipeline>/<kind>/<result_id>.<ext>         the part's image, kept until you delete it
    <state_dir>/feedback/<pipeline>/<kind>/<result_id>.json          what the agent knew (score, threshold, model...)
    <state_dir>/feedback/index.db                                    SQLite: recent parts and feedback rows

Keeping an image costs the pipeline little: the sink (after the reject signal) only takes a hard link of the spool
file (or a reference to the bytes or frame) and hands it to one background thread, which encodes frames (JPEG;
20-40 ms for a 1080p frame on a busy x86 core, so it runs at a lower priority), files the image, updates the index
and deletes the oldest (a full queue drops the image, counted). Feedback copies the image by a second
hard link (a copy across file systems) and writes the JSON sidecar, both fsynced, then the index row. The same
feedback twice is stored once; a different kind for the same part replaces the first (the operator corrected
themselves). A disk short of space (``delivery/space.py``) stops the keeping of new images, and a full one deletes
the recent ones (feedback stays); feedback itself is refused on a full disk (``storage_full``).

``edge-agent inspect fit --add <state_dir>/feedback/<pipeline>/false_reject`` refits the pipeline's anomaly model
with the confirmed good parts (``toolchain/anomaly_refit.py``).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import queue
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from edge_agent.errors import (
    FeedbackConflictError,
    FeedbackError,
    FeedbackGoneError,
    FeedbackUnknownError,
    StorageError,
    StorageFullError,
)
from edge_agent.fsutil import fsync_dir
from edge_agent.types import Image

log = logging.getLogger(__name__)

FeedbackKind = Literal["false_reject", "missed_defect"]
FEEDBACK_KINDS: tuple[FeedbackKind, ...] = ("false_reject", "missed_defect")
EXPECTED_VERDICT = {"false_reject": "fail", "missed_defect": "pass"}
"""The verdict a part must have had for each kind of feedback."""
FEEDBACK_EVENT = "inspection_feedback"
MAX_OPERATOR = 64
MAX_NOTE = 500
ROWS_PER_IMAGE = 10
"""Per pipeline, the index remembers this many parts per kept image (so that late feedback is answered
``feedback_image_gone``, not ``feedback_unknown_result``)."""

KEEPER_NICE = 10
"""The keeper thread runs this much nicer than the agent (Linux), so encoding camera frames never slows inference."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kept (
    result_id TEXT PRIMARY KEY, input_id TEXT NOT NULL, part_id TEXT, pipeline TEXT NOT NULL, file TEXT,
    bytes INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, meta BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS kept_input ON kept(input_id);
CREATE INDEX IF NOT EXISTS kept_part ON kept(part_id) WHERE part_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS kept_age ON kept(pipeline, created_at);
CREATE TABLE IF NOT EXISTS feedback (
    result_id TEXT PRIMARY KEY, kind TEXT NOT NULL, pipeline TEXT NOT NULL, file TEXT NOT NULL,
    created_at REAL NOT NULL, data BLOB NOT NULL, event_sent INTEGER NOT NULL DEFAULT 0);
"""


@dataclass(frozen=True)
class KeepLimits:
    """Per pipeline: images of the last ``images`` parts, at most ``max_bytes`` of them (0 images: keep none)."""

    images: int = 200
    max_bytes: int = 64 << 20


@dataclass(frozen=True)
class InspectedPart:
    """What the agent knew about one inspected part when it decided (stored with its image)."""

    result_id: str
    input_id: str
    pipeline: str
    source: str
    model: str
    model_version: str
    verdict: str | None
    score: float | None
    threshold: float | None
    part_id: str | None = None
    created_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"result_id": self.result_id, "input_id": self.input_id, "part_id": self.part_id,
                "pipeline": self.pipeline, "source": self.source, "model": self.model,
                "model_version": self.model_version, "verdict": self.verdict, "score": self.score,
                "threshold": self.threshold, "inspected_at": round(self.created_at, 3)}


@dataclass
class _Keep:
    part: InspectedPart
    staged: Path | None = None
    data: bytes | None = None
    image: Image | None = None


def sniff_suffix(head: bytes) -> str:
    """``.jpg``, ``.png`` or ``.webp`` from an image's first bytes (the agent only accepts those), else ``.img``."""
    if head[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    return ".img"


def _is_full(exc: BaseException) -> bool:
    return (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(exc, sqlite3.Error) and "full" in str(exc))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(src, dst)


def _clean_text(value: Any, what: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise FeedbackError(f"{what} must be printable text of at most {limit} characters")
    return value.strip() or None


class InspectionStore:
    """Recent images of inspected parts and the operator feedback on them (see the module docstring).

    ``space``: the disk state (``ok``, ``low``, ``full``: the outbox's); ``record_event(event, severity, data)``:
    stores an event durably (the outbox's events, sent until the broker has them); ``known(id)``: whether a result
    or input id exists elsewhere (the outbox), to tell a part whose image is gone from an unknown one.
    Thread-safe; ``start()`` the background thread, ``close()`` at the end.
    """

    def __init__(
        self,
        state_dir: Path,
        limits: Mapping[str, KeepLimits],
        *,
        space: Callable[[], str] = lambda: "ok",
        record_event: Callable[[str, str, dict[str, Any]], None] | None = None,
        known: Callable[[str], bool] | None = None,
        queue_size: int = 64,
    ) -> None:
        self.recent_dir = state_dir / "inspected"
        self.feedback_dir = state_dir / "feedback"
        self.limits = dict(limits)
        self._space = space
        self._record_event = record_event
        self._known = known
        self._queue: queue.Queue[_Keep | str | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._feedback_lock = threading.Lock()  # one feedback at a time: the same part twice at once is stored once
        self._idle = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None
        self.counters = {"kept": 0, "dropped_busy": 0, "skipped_space": 0, "errors": 0, "evicted": 0,
                         "feedback": 0, "feedback_duplicate": 0}
        self.recent_dir.mkdir(parents=True, exist_ok=True)
        self.feedback_dir.mkdir(parents=True, exist_ok=True)
        path = self.feedback_dir / "index.db"
        try:
            self._db = self._open(path)
        except sqlite3.DatabaseError as exc:
            if _is_full(exc) or (type(exc) is not sqlite3.DatabaseError and "malformed" not in str(exc)):
                raise StorageError(f"feedback index {path}: {exc}") from exc
            # a damaged index is set aside: the images and sidecars on disk hold everything it said
            aside = path.with_name(f"index.db.corrupt-{int(time.time())}")
            log.error("inspection store: %s is damaged (%s): set aside as %s, rebuilt from the sidecars", path, exc,
                      aside.name)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{path}{suffix}", f"{aside}{suffix}")
            try:
                self._db = self._open(path)
                self._rebuild_feedback()
            except sqlite3.Error as exc2:
                raise StorageError(f"feedback index {path}: {exc2}") from exc2
        except sqlite3.Error as exc:
            raise StorageError(f"feedback index {path}: {exc}") from exc
        self._reconcile()

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def _rebuild_feedback(self) -> None:
        """Feedback rows from the sidecars (events counted as sent: the coordinator may already have them)."""
        rows = []
        for side in sorted(self.feedback_dir.glob("*/*/*.json")):
            try:
                data = orjson.loads(side.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue
            if isinstance(data, dict) and data.get("kind") in FEEDBACK_KINDS and "result_id" in data:
                rows.append((str(data["result_id"]), data["kind"], side.parent.parent.name,
                             str(data.get("image", "")), float(data.get("at", 0.0)), orjson.dumps(data)))
        self._db.executemany("INSERT OR REPLACE INTO feedback (result_id, kind, pipeline, file, created_at, data,"
                             " event_sent) VALUES (?, ?, ?, ?, ?, ?, 1)", rows)
        log.info("inspection store: %d feedback records rebuilt from their sidecars", len(rows))

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inspection-keeper", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=timeout)
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            self._db.close()

    def _reconcile(self) -> None:
        """After a crash: staged links never filed are deleted, index rows whose image is gone forgotten."""
        for staged in self.recent_dir.glob("*/.staged-*"):
            staged.unlink(missing_ok=True)
        with self._lock:
            rows = self._db.execute("SELECT result_id, file FROM kept WHERE file IS NOT NULL").fetchall()
            gone = [r[0] for r in rows if not (self.recent_dir / r[1]).is_file()]
            self._db.executemany("UPDATE kept SET file = NULL, bytes = 0 WHERE result_id = ?", [(g,) for g in gone])
            listed = {r[1] for r in rows}
        for path in self.recent_dir.glob("*/*"):
            if path.is_file() and f"{path.parent.name}/{path.name}" not in listed:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------- keeping images
    def keeps(self, pipeline: str) -> bool:
        limits = self.limits.get(pipeline)
        return limits is not None and limits.images > 0

    def keep(self, part: InspectedPart, *, spool_path: str | None = None, data: bytes | None = None,
             image: Image | None = None) -> bool:
        """Hand one part's image to the background thread (cheap; never blocks). False when not kept: the pipeline
        keeps none, the disk is short of space, or the queue is full (each counted)."""
        if not self.keeps(part.pipeline):
            return False
        if self._space() != "ok":
            self.counters["skipped_space"] += 1
            return False
        job = _Keep(part, data=data, image=image)
        if data is None and image is None and spool_path is not None:
            staged = self.recent_dir / part.pipeline / f".staged-{part.result_id}"
            try:
                staged.parent.mkdir(exist_ok=True)
                staged.unlink(missing_ok=True)
                _link_or_copy(Path(spool_path), staged)  # the spool file is filed or deleted once the result is out
            except OSError as exc:
                self.counters["errors"] += 1
                log.warning("inspection store: cannot take the image of %s: %s", part.result_id, exc)
                return False
            job.staged = staged
        elif data is None and image is None:
            return False
        with self._idle:
            self._pending += 1
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._done()
            self.counters["dropped_busy"] += 1
            if job.staged is not None:
                job.staged.unlink(missing_ok=True)
            return False
        return True

    def on_space(self, state: str, _free: int = 0) -> None:
        """The disk state changed: on a full disk the recent images go (feedback stays)."""
        if state == "full":
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait("purge")

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every image handed over so far is filed; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def _run(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # Linux: a thread is a task with its own nice value
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + KEEPER_NICE))
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if job == "purge":
                    self._purge()
                elif isinstance(job, _Keep):
                    self._file(job)
            except Exception as exc:  # one bad image never stops the keeper
                self.counters["errors"] += 1
                level = logging.WARNING if _is_full(exc) else logging.ERROR
                log.log(level, "inspection store: cannot keep an image: %s", exc)
                if isinstance(job, _Keep) and job.staged is not None:
                    job.staged.unlink(missing_ok=True)
            finally:
                if isinstance(job, _Keep):
                    self._done()

    def _file(self, job: _Keep) -> None:
        part = job.part
        folder = self.recent_dir / part.pipeline
        folder.mkdir(exist_ok=True)
        if job.staged is not None:
            with job.staged.open("rb") as f:
                suffix = sniff_suffix(f.read(12))
            target = folder / f"{part.result_id}{suffix}"
            os.replace(job.staged, target)
        else:
            payload = job.data if job.data is not None else _encode_jpeg(job.image)
            target = folder / f"{part.result_id}{sniff_suffix(payload[:12])}"
            tmp = folder / f".staged-{part.result_id}"
            tmp.write_bytes(payload)
            os.replace(tmp, target)
        size = target.stat().st_size
        rel = f"{part.pipeline}/{target.name}"
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO kept (result_id, input_id, part_id, pipeline, file, bytes, created_at, meta)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (part.result_id, part.input_id, part.part_id, part.pipeline, rel, size, part.created_at,
                 orjson.dumps(part.to_dict())))
        self.counters["kept"] += 1
        self._evict(part.pipeline)

    def _evict(self, pipeline: str) -> None:
        limits = self.limits.get(pipeline, KeepLimits())
        with self._lock:
            rows = self._db.execute(
                "SELECT result_id, file, bytes FROM kept WHERE pipeline = ? AND file IS NOT NULL"
                " ORDER BY created_at DESC, rowid DESC", (pipeline,)).fetchall()
            total, drop = 0, []
            for i, (rid, rel, size) in enumerate(rows):
                total += int(size)
                if i >= limits.images or total > limits.max_bytes:
                    drop.append((rid, rel))
            self._forget_images(drop)
            self._db.execute(
                "DELETE FROM kept WHERE pipeline = ? AND result_id NOT IN"
                " (SELECT result_id FROM kept WHERE pipeline = ? ORDER BY created_at DESC LIMIT ?)",
                (pipeline, pipeline, max(100, limits.images * ROWS_PER_IMAGE)))

    def _forget_images(self, drop: list[tuple[str, str]]) -> None:
        """Delete recent images (the lock held); their rows stay, without a file."""
        for rid, rel in drop:
            (self.recent_dir / rel).unlink(missing_ok=True)
            self._db.execute("UPDATE kept SET file = NULL, bytes = 0 WHERE result_id = ?", (rid,))
        self.counters["evicted"] += len(drop)

    def _purge(self) -> None:
        with self._lock:
            rows = self._db.execute("SELECT result_id, file FROM kept WHERE file IS NOT NULL").fetchall()
            self._forget_images([(r[0], r[1]) for r in rows])
        if rows:
            log.warning("inspection store: disk full: deleted %d recent images (feedback kept)", len(rows))

    # ------------------------------------------------------------------------------------------- feedback
    def lookup(self, ident: str) -> tuple[dict[str, Any], Path | None] | None:
        """(what the agent knew, the kept image or None) of the part with this result, input or part id."""
        self.flush()
        with self._lock:
            row = self._db.execute(
                "SELECT meta, file FROM kept WHERE result_id = ? OR input_id = ? OR part_id = ?"
                " ORDER BY result_id = ? DESC, created_at DESC LIMIT 1", (ident, ident, ident, ident)).fetchone()
        if row is None:
            return None
        return orjson.loads(row[0]), (self.recent_dir / row[1] if row[1] is not None else None)

    def add_feedback(self, ident: str, kind: str, *, operator: Any = None, note: Any = None,
                     via: str = "http") -> dict[str, Any]:
        """Store feedback on one inspected part (its result, input or part id). Returns ``{"stored", "duplicate",
        "replaced"?, "feedback": {...}}``; raises FeedbackError (codes: ``feedback_invalid``, ``feedback_unknown_
        result``, ``feedback_image_gone``, ``feedback_kind_mismatch``) or StorageFullError."""
        with self._feedback_lock:
            return self._add_feedback(ident, kind, operator, note, via)

    def _add_feedback(self, ident: str, kind: str, operator: Any, note: Any, via: str) -> dict[str, Any]:
        if kind not in FEEDBACK_KINDS:
            raise FeedbackError(f"kind must be one of {', '.join(FEEDBACK_KINDS)}")
        who = _clean_text(operator, "operator", MAX_OPERATOR)
        text = _clean_text(note, "note", MAX_NOTE)
        found = self.lookup(ident)
        if found is None:  # its recent image may be gone while its feedback is still here
            with self._lock:
                row = self._db.execute("SELECT data FROM feedback WHERE result_id = ?", (ident,)).fetchone()
            if row is not None:
                found = (orjson.loads(row[0]), None)
        if found is None:
            if self._known is not None and self._known(ident):
                raise FeedbackGoneError(f"{ident}: this result's image was not kept (only inspection pipelines with "
                                        "inspection.keep_images > 0 keep them)")
            raise FeedbackUnknownError(f"{ident}: no inspected part with this result, input or part id")
        part, image = found
        result_id = str(part["result_id"])
        with self._lock:
            prior = self._db.execute("SELECT kind, file, data, event_sent FROM feedback WHERE result_id = ?",
                                     (result_id,)).fetchone()
        if prior is not None and prior[0] == kind:
            self.counters["feedback_duplicate"] += 1
            data = orjson.loads(prior[2])
            if not prior[3]:
                self._send_event(result_id, data)  # stored before a crash took the event: send it now
            return {"stored": False, "duplicate": True, "feedback": data}
        expected = EXPECTED_VERDICT[kind]
        if part.get("verdict") not in (None, expected):
            said = "rejected" if expected == "fail" else "passed"
            raise FeedbackConflictError(f"{kind} is feedback on a part that was {said}; this part's verdict was "
                                        f"{part.get('verdict')}")
        if image is None or not image.is_file():
            if prior is None:
                raise FeedbackGoneError(f"{ident}: the image of this part is no longer kept (inspection.keep_images)")
            image = self.feedback_dir / prior[1]  # a change of kind: the image is in the feedback store already
        if self._space() == "full":
            raise StorageFullError("the disk is full: feedback waits (retry once space returns)")
        folder = self.feedback_dir / str(part["pipeline"]) / kind
        target = folder / f"{result_id}{image.suffix}"
        data = {**part, "kind": kind, "operator": who, "note": text, "via": via, "at": round(time.time(), 3),
                "image": f"{part['pipeline']}/{kind}/{target.name}"}
        if prior is not None:
            data["replaces"] = prior[0]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{target.name}.tmp"
            tmp.unlink(missing_ok=True)
            _link_or_copy(image, tmp)
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
            side = target.with_suffix(".json")
            side_tmp = folder / f".{side.name}.tmp"
            with side_tmp.open("wb") as f:
                f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
                f.flush()
                os.fsync(f.fileno())
            os.replace(side_tmp, side)
            fsync_dir(folder, best_effort=True)
            with self._lock:
                self._db.execute(
                    "INSERT OR REPLACE INTO feedback (result_id, kind, pipeline, file, created_at, data, event_sent)"
                    " VALUES (?, ?, ?, ?, ?, ?, 0)",
                    (result_id, kind, part["pipeline"], data["image"], data["at"], orjson.dumps(data)))
        except (OSError, sqlite3.Error) as exc:
            if _is_full(exc):
                raise StorageFullError(f"no room to store the feedback: {exc}") from exc
            raise StorageError(f"cannot store the feedback: {exc}") from exc
        if prior is not None:  # the operator changed their mind: the part lives under its new kind only
            old = self.feedback_dir / prior[1]
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
        self.counters["feedback"] += 1
        log.info("feedback %s on part %s of pipeline %s (score %s, threshold %s)", kind, result_id,
                 part["pipeline"], part.get("score"), part.get("threshold"))
        self._send_event(result_id, data)
        out: dict[str, Any] = {"stored": True, "duplicate": False, "feedback": data}
        if prior is not None:
            out["replaced"] = prior[0]
        return out

    def totals(self, pipeline: str) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT kind, COUNT(*) FROM feedback WHERE pipeline = ? GROUP BY kind",
                                    (pipeline,)).fetchall()
        counts: dict[str, int] = dict.fromkeys(FEEDBACK_KINDS, 0)
        counts.update({str(k): int(n) for k, n in rows})
        return counts

    def _send_event(self, result_id: str, data: dict[str, Any]) -> None:
        if self._record_event is None:
            return
        event = {k: data.get(k) for k in ("pipeline", "result_id", "input_id", "part_id", "source", "kind", "verdict",
                                           "score", "threshold", "model", "model_version", "operator", "note", "via",
                                           "at", "inspected_at")}
        if "replaces" in data:
            event["replaces"] = data["replaces"]
        event["totals"] = self.totals(str(data["pipeline"]))
        self._record_event(FEEDBACK_EVENT, "info", event)
        with self._lock:
            self._db.execute("UPDATE feedback SET event_sent = 1 WHERE result_id = ?", (result_id,))

    def stats(self) -> dict[str, Any]:
        """Kept images and bytes, feedback stored (``totals``: pipeline -> kind -> count) and the counters."""
        with self._lock:
            images, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM kept WHERE file IS NOT NULL").fetchone()
            rows = self._db.execute("SELECT pipeline, kind, COUNT(*) FROM feedback GROUP BY pipeline, kind").fetchall()
        totals: dict[str, dict[str, int]] = {p: dict.fromkeys(FEEDBACK_KINDS, 0) for p in self.limits}
        for pipeline, kind, count in rows:
            totals.setdefault(str(pipeline), dict.fromkeys(FEEDBACK_KINDS, 0))[str(kind)] = int(count)
        return {"images": int(images), "bytes": int(size), "feedback": sum(int(r[2]) for r in rows),
                "totals": totals, **self.counters}


def _encode_jpeg(image: Image | None, quality: int = 92) -> bytes:
    """A decoded frame (camera) as JPEG."""
    from PIL import Image as PILImage

    assert image is not None
    pixels = image.pixels[:, :, ::-1] if image.color == "BGR" else image.pixels
    buf = io.BytesIO()
    PILImage.fromarray(pixels.copy(), "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()
