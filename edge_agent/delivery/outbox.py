"""The durable outbox: accepted inputs and their results, in SQLite until the coordinator acknowledges them.

SQLite in WAL mode with ``synchronous=FULL``. Every write goes through one writer thread that
commits whatever callers queued meanwhile in a single transaction (group commit); a call returns
once its transaction is on disk (``ack_through_async`` returns a future instead, so that the
publisher never waits for an fsync). Reads use their own connection (WAL readers never block the
writer). Listeners hear about new results from the writer thread right after the commit.

Results get a deterministic ``result_id`` (device, input, model, model version) and a per-device
``seq`` that only goes up within an ``epoch`` (a random id minted when the database is created, so a
recreated database never reuses a sequence the coordinator already acknowledged).

Disk full is a state, not a freeze (``delivery/space.py``): new inputs are refused (``check_capacity``)
while the disk has less than ``min_free_bytes`` free or the reserve is spent; the log is checkpointed
and truncated after deletions (at most once a second, at once when space is short) and the database
gives freed pages back to the file system (``auto_vacuum=INCREMENTAL``); when a write fails for lack of
space the reserve file is released so that acknowledged rows can still be deleted, in small
transactions. The writer thread checks the disk every second until everything is back to normal, so
inputs resume by themselves once space returns; ``add_space_listener`` hears every change of state.

Damage always raises an alarm (``delivery/repair.py``): a database that fails its integrity check, a
write-ahead log SQLite would silently cut short, an empty (0-byte) or missing database where
``<name>.epoch`` says one existed, or a database whose epoch is not the one last used. The files are
moved aside (``<name>.corrupt-<time>``), a fresh database with a new epoch is created, every row SQLite
can still read is salvaged into it (unsent results re-numbered in the new epoch, inputs with their
state: pending ones are re-run by the service's recovery) and the alarm is stored in the same
transaction: in ``alarms`` (heartbeats, metrics) and as an ``outbox_corrupt`` event that the publisher
sends until the broker has it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson

from edge_agent.batching import take_batch
from edge_agent.delivery.interface import PendingInput, StoredResult
from edge_agent.delivery.repair import (
    damage_before_open,
    quarantine,
    read_epoch_marker,
    salvage_quarantines,
    write_epoch_marker,
)
from edge_agent.delivery.space import DiskSpace, Reserve, SpaceState
from edge_agent.errors import StorageError, StorageFullError

log = logging.getLogger(__name__)
T = TypeVar("T")
ROW_OVERHEAD = 256  # bytes counted per result row on top of its body
GROUP_MAX = 512  # operations per transaction at most
WAL_AUTOCHECKPOINT_PAGES = 256  # SQLite checkpoints the log by itself past this many pages (default 1000)
JOURNAL_SIZE_LIMIT = 1 << 20  # and truncates it to this size when it starts over
CHECKPOINT_EVERY_S = 1.0  # after deletions: checkpoint and truncate the log at most this often
TIGHT_CHECKPOINT_EVERY_S = 0.2  # ... and this often after any write while space is short
FREE_CHUNK = 32  # rows per transaction when deleting acknowledged rows on a full disk
VACUUM_MIN_PAGES = 16  # free pages in the file given back to the file system while space is short...
VACUUM_IDLE_PAGES = 4096  # ... and otherwise once this many (16 MiB) and half the file are free (a drained backlog)
VACUUM_STEP_PAGES = 1024
CONVERT_MAX_BYTES = 64 << 20  # an older database (no incremental vacuum) is converted at open up to this size
ALARM_REPORT_S = 7 * 86_400.0  # heartbeats list the alarms of the last week

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS inputs (
    input_id TEXT PRIMARY KEY, source TEXT NOT NULL, pipeline TEXT NOT NULL, spool_path TEXT,
    meta BLOB NOT NULL, state TEXT NOT NULL, code TEXT, message TEXT,
    accepted_at REAL NOT NULL, finished_at REAL);
CREATE INDEX IF NOT EXISTS inputs_state ON inputs(state, accepted_at);
CREATE TABLE IF NOT EXISTS results (
    seq INTEGER PRIMARY KEY, result_id TEXT NOT NULL UNIQUE, input_id TEXT NOT NULL,
    pipeline TEXT NOT NULL, model TEXT NOT NULL, model_version TEXT NOT NULL,
    created_at REAL NOT NULL, body BLOB NOT NULL, size INTEGER NOT NULL, acked_at REAL);
CREATE INDEX IF NOT EXISTS results_unacked ON results(seq) WHERE acked_at IS NULL;
CREATE TABLE IF NOT EXISTS commands (command_id TEXT PRIMARY KEY, name TEXT NOT NULL, ran_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS input_keys (key TEXT PRIMARY KEY, input_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL, severity TEXT NOT NULL, data BLOB NOT NULL,
    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS alarms (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, message TEXT NOT NULL, data BLOB NOT NULL, raised_at REAL NOT NULL);
"""
_COUNTERS = ("next_seq", "unacked_rows", "unacked_bytes", "dropped", "expired", "rejected_inputs", "acked_total")


@dataclass(frozen=True)
class OutboxLimits:
    """Caps and retention. ``full_policy``: refuse new inputs (``reject_new``) or drop the oldest
    unacknowledged results (``drop_oldest``, counted in ``dropped``) when ``max_bytes`` is reached.
    ``reserve_bytes``: the disk reserve kept for deleting acknowledged rows on a full disk (0: none)."""

    max_bytes: int = 256 * 1024 * 1024
    max_age_s: float = 30 * 24 * 3600.0
    full_policy: Literal["reject_new", "drop_oldest"] = "reject_new"
    min_free_bytes: int = 32 * 1024 * 1024
    retention_s: float = 0.0
    input_retention_s: float = 7 * 24 * 3600.0
    reserve_bytes: int = 0


@dataclass(frozen=True)
class OutboxStats:
    backlog: int
    bytes: int
    oldest_age_s: float
    dropped: int
    expired: int
    rejected_inputs: int
    refused_full: int
    pending_inputs: int
    acked_total: int
    next_seq: int
    epoch: str
    alarms: tuple[str, ...] = field(default_factory=tuple)
    disk_state: SpaceState = "ok"
    disk_free_bytes: int = -1
    reserve_held: bool = False
    events_pending: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "backlog": self.backlog,
            "bytes": self.bytes,
            "oldest_age_s": round(self.oldest_age_s, 3),
            "dropped": self.dropped,
            "expired": self.expired,
            "rejected_inputs": self.rejected_inputs,
            "refused_full": self.refused_full,
            "pending_inputs": self.pending_inputs,
            "epoch": self.epoch,
            "alarms": list(self.alarms),
            "disk_state": self.disk_state,
            "disk_free_bytes": self.disk_free_bytes,
        }


@dataclass(frozen=True)
class StoredEvent:
    """An event kept in the outbox until the broker has it (alarms such as ``outbox_corrupt``)."""

    id: int
    event: str
    severity: Literal["info", "warning", "alarm"]
    data: dict[str, Any]
    created_at: float


def make_result_id(device_id: str, input_id: str, model: str, model_version: str) -> str:
    """Deterministic result id: 32 hex chars of sha256 over the identifying fields."""
    key = "\x00".join((device_id, input_id, model, model_version)).encode()
    return hashlib.sha256(key).hexdigest()[:32]


def _translate(exc: sqlite3.Error, what: str) -> StorageError:
    text = str(exc)
    if "full" in text or getattr(exc, "sqlite_errorcode", 0) == 13:
        return StorageFullError(f"outbox {what}: {text}")
    return StorageError(f"outbox {what}: {text}")


def _is_corruption(exc: sqlite3.Error) -> bool:
    return type(exc) is sqlite3.DatabaseError or "malformed" in str(exc) or "not a database" in str(exc)


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, StorageFullError):
        return True
    if not isinstance(exc, sqlite3.Error):
        return False
    name = getattr(exc, "sqlite_errorname", "")
    return name in ("SQLITE_FULL", "SQLITE_IOERR_SHMSIZE") or "disk is full" in str(exc)


class _Damaged(Exception):
    """The database opened but is not the outbox it should be (reason in the message)."""


@dataclass
class _Op:
    """One queued write. ``frees``: it deletes rows (runs first, on its own, when the disk is full);
    ``chunk(conn, limit)``: the same work in parts of at most ``limit`` rows -> (value, finished)."""

    fn: Callable[[sqlite3.Connection], Any]
    fut: Future[Any]
    frees: bool = False
    chunk: Callable[[sqlite3.Connection, int], tuple[Any, bool]] | None = None


class Outbox:
    """Durable journal of inputs and results (see module docstring). Thread-safe."""

    def __init__(self, path: Path, device_id: str, limits: OutboxLimits | None = None) -> None:
        self.path = Path(path)
        self.device_id = device_id
        self.limits = limits or OutboxLimits()
        self.memory_alarms: list[str] = []  # alarms that could not be stored (the database itself failing)
        self._refused_full = 0
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._read_lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._wal_dirty = False
        self._last_checkpoint = 0.0
        self._checkpoint_failures = 0
        self._closed = False
        self.salvaged: list[dict[str, Any]] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._reserve = Reserve(self.path.with_name(f"{self.path.name}.reserve"), self.limits.reserve_bytes)
        self.space = DiskSpace(self.path.parent, self.limits.min_free_bytes, self._reserve)
        self._writer = self._open_checked()
        try:
            self.salvaged = salvage_quarantines(self._writer, self.path, self._valid_result, ROW_OVERHEAD)
            self._reader = self._connect()
        except sqlite3.Error as exc:
            self._writer.close()
            raise _translate(exc, "salvage") from exc
        except BaseException:
            self._writer.close()
            raise
        self.epoch = str(self._reader.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0])
        self._events_pending = int(self._reader.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        write_epoch_marker(self.path, self.epoch, self.device_id)
        self.space.refresh()
        self._thread = threading.Thread(target=self._write_loop, name="outbox-writer", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- opening
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA busy_timeout=30000")
        if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only possible before the first page is written
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        return conn

    def _open_checked(self) -> sqlite3.Connection:
        """Open the database; damaged files are set aside (and salvaged next by ``salvage_quarantines``)."""
        marker = read_epoch_marker(self.path)
        reason, wal_damaged = damage_before_open(self.path, marker)
        if reason is None:
            try:
                return self._with_room(lambda: self._init_db(marker))
            except _Damaged as exc:
                reason = str(exc)
            except sqlite3.Error as exc:
                if not _is_corruption(exc):
                    raise _translate(exc, f"cannot open {self.path}") from exc
                reason = f"is corrupt ({exc})"
        log.error("outbox database %s %s: setting it aside", self.path, reason)
        quarantine(self.path, reason, marker, repair_wal=wal_damaged)
        try:
            return self._with_room(lambda: self._init_db(None))
        except (sqlite3.Error, _Damaged) as exc:
            raise StorageError(f"outbox: cannot recreate {self.path}: {exc}") from exc

    def _with_room(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (opening); when the disk is too full for it, release the reserve and try once more."""
        try:
            return fn()
        except sqlite3.Error as exc:
            if not _is_full(exc) or not self.space.out_of_space():
                raise
            return fn()

    def _init_db(self, marker: str | None) -> sqlite3.Connection:
        conn = self._connect()
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if marker is not None and "meta" not in tables:
                raise _Damaged(f"holds no outbox although epoch {marker} was in use: its unsent results are lost")
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (secrets.token_hex(8),))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('device_id', ?)", (self.device_id,))
            for name in _COUNTERS:
                conn.execute("INSERT OR IGNORE INTO counters VALUES (?, ?)", (name, 1 if name == "next_seq" else 0))
            conn.execute("COMMIT")
            epoch = conn.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0]
            if marker is not None and epoch != marker:
                raise _Damaged(f"has epoch {epoch}, not {marker} that was last in use (an older copy put back?)")
            self._convert_to_incremental_vacuum(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _convert_to_incremental_vacuum(self, conn: sqlite3.Connection) -> None:
        """Databases made before auto_vacuum=INCREMENTAL: convert them once (VACUUM) while they are small."""
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
            return
        size = conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
        if size > CONVERT_MAX_BYTES:
            return
        try:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("outbox: cannot convert %s to incremental vacuum now: %s", self.path, exc)

    def _valid_result(self, row: tuple[Any, ...]) -> bool:
        """A salvaged result row is re-sent only if its id is the one its fields give and its body is JSON."""
        ids = row[0], row[2], row[3], row[4], row[5]
        if not all(isinstance(v, str) for v in ids) or not isinstance(row[7], bytes):
            return False
        if make_result_id(self.device_id, row[2], row[4], row[5]) != row[0]:
            return False
        try:
            return isinstance(orjson.loads(row[7]), dict) and isinstance(row[6], (int, float))
        except orjson.JSONDecodeError:
            return False

    # ---------------------------------------------------------------- group commit
    def _write_loop(self) -> None:
        conn = self._writer
        while True:
            wait = self._maintain_in()
            try:
                first = self._ops.get() if wait is None else self._ops.get(timeout=wait)
            except queue.Empty:
                self._maintain(conn)
                continue
            if first is None:
                return
            batch, stop = take_batch(self._ops, first, GROUP_MAX)
            self._run_batch(conn, batch)
            self._maintain(conn)
            if stop:
                return

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op], *, retry: bool = False) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, op.fn(conn)))
                    conn.execute("RELEASE op")
                except Exception as exc:  # one failing call must not fail its neighbours...
                    if not conn.in_transaction:
                        raise  # ...unless SQLite rolled the whole transaction back (e.g. disk full)
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((False, exc))
            if not retry and any(not ok and _is_full(v) for ok, v in outcomes):
                raise outcomes[next(i for i, (ok, v) in enumerate(outcomes) if not ok and _is_full(v))][1]
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if not retry and _is_full(exc):
                self._out_of_space(conn, batch)
                return
            error = _translate(exc, "write") if isinstance(exc, sqlite3.Error) else StorageError(f"outbox write: {exc}")
            if isinstance(exc, sqlite3.Error) and _is_corruption(exc):
                self._alarm_in_memory("outbox_corrupt", f"outbox database {self.path} failed at run time ({exc}); "
                                      "restart the agent to set it aside and salvage it")
            log.error("outbox transaction failed, nothing of it was written: %s", exc)
            for op in batch:
                op.fut.set_exception(error)
            return
        if any(op.frees for op in batch) or self.space.tight:
            self._wal_dirty = True
        if any(ok and isinstance(value, StoredResult) for ok, value in outcomes):
            self._notify()  # straight from here: no wait until each caller thread gets the GIL back
        for (ok, value), op in zip(outcomes, batch, strict=True):
            if ok:
                op.fut.set_result(value)
            elif isinstance(value, sqlite3.Error):
                op.fut.set_exception(_translate(value, "write"))
            else:
                op.fut.set_exception(value)

    def _out_of_space(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        """A write failed for lack of space: release the reserve, delete what can be deleted in small
        transactions (truncating the log after each), then try the rest once more."""
        self.space.out_of_space()
        self._checkpoint(conn)
        for op in batch:
            if op.frees:
                self._run_in_parts(conn, op)
        rest = [op for op in batch if not op.frees]
        if rest:
            self._run_batch(conn, rest, retry=True)

    def _run_in_parts(self, conn: sqlite3.Connection, op: _Op) -> None:
        total: Any = 0
        try:
            while True:
                conn.execute("BEGIN IMMEDIATE")
                if op.chunk is None:
                    value, finished = op.fn(conn), True
                else:
                    value, finished = op.chunk(conn, FREE_CHUNK)
                conn.execute("COMMIT")
                total = value if op.chunk is None else total + value
                self._checkpoint(conn)
                if finished:
                    break
        except Exception as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            log.error("outbox: deleting rows on a full disk failed (retried later): %s", exc)
            error = _translate(exc, "delete") if isinstance(exc, sqlite3.Error) else StorageError(str(exc))
            op.fut.set_exception(error)
            return
        op.fut.set_result(total)

    # ---------------------------------------------------------------- space and log upkeep (writer thread)
    def _checkpoint_every(self) -> float:
        every = TIGHT_CHECKPOINT_EVERY_S if self.space.tight else CHECKPOINT_EVERY_S
        return float(min(every * 2 ** min(self._checkpoint_failures, 8), 30.0))  # back off while checkpoints fail

    def _maintain_in(self) -> float | None:
        """Seconds until upkeep is due, or None when nothing is owed (the writer then just waits for work)."""
        if not self._wal_dirty and not self.space.owed:
            return None
        now = time.monotonic()
        due = self.space.next_check if self.space.owed else now + 3600.0
        if self._wal_dirty:
            due = min(due, self._last_checkpoint + self._checkpoint_every())
        return max(0.0, due - now)

    def _maintain(self, conn: sqlite3.Connection) -> None:
        now = time.monotonic()
        if self._wal_dirty and now - self._last_checkpoint >= self._checkpoint_every():
            self._checkpoint(conn)
        if self.space.owed and now >= self.space.next_check:
            self.space.refresh()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """Copy the log into the database and truncate it; give free pages back to the file system. On a full
        disk (the database file cannot grow to take the log's pages) the reserve is released for it."""
        self._last_checkpoint = time.monotonic()
        try:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            if free_pages >= (VACUUM_MIN_PAGES if self.space.tight else max(VACUUM_IDLE_PAGES, pages // 2)):
                conn.execute("BEGIN IMMEDIATE")
                for _ in range(min(free_pages, VACUUM_STEP_PAGES)):  # Python's execute steps once: one page each
                    conn.execute("PRAGMA incremental_vacuum(1)")
                conn.execute("COMMIT")
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if _is_full(exc) and self.space.out_of_space():
                self._checkpoint(conn)  # once more, with the reserve's room
                return
            self._checkpoint_failures += 1
            if self._checkpoint_failures in (1, 10) or self._checkpoint_failures % 100 == 0:
                log.warning("outbox: checkpoint failed %d time(s), retried with back-off: %s",
                            self._checkpoint_failures, exc)
            return
        if self._checkpoint_failures:
            log.info("outbox: checkpoint succeeded after %d failures", self._checkpoint_failures)
        self._checkpoint_failures = 0
        self._wal_dirty = bool(busy)

    def add_space_listener(self, listener: Callable[[SpaceState, int], None]) -> None:
        """Call ``listener(state, free_bytes)`` whenever the disk state changes (ok, low, full)."""
        self.space.add_listener(listener)

    @property
    def disk_state(self) -> SpaceState:
        return self.space.state

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # a listener must never stop the writer
                log.exception("outbox: result listener failed")

    def _submit(
        self, fn: Callable[[sqlite3.Connection], T], *, frees: bool = False,
        chunk: Callable[[sqlite3.Connection, int], tuple[Any, bool]] | None = None,
    ) -> Future[T]:
        """Queue ``fn`` for the next group commit; the future resolves once its transaction is on disk."""
        if self._closed:
            raise StorageError("outbox is closed")
        fut: Future[T] = Future()
        self._ops.put(_Op(fn, fut, frees, chunk))
        return fut

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self._submit(fn).result()

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._read_lock:
            try:
                return self._reader.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise _translate(exc, "read") from exc

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str, delta: int) -> None:
        conn.execute("UPDATE counters SET value = value + ? WHERE name = ?", (delta, name))

    @staticmethod
    def _counter(conn: sqlite3.Connection, name: str) -> int:
        return int(conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0])

    # ---------------------------------------------------------------- alarms and durable events
    def _alarm_in_memory(self, name: str, message: str) -> None:
        text = f"{name}: {message}"
        if text not in self.memory_alarms:
            log.error("%s", text)
            self.memory_alarms.append(text)

    @property
    def alarms(self) -> list[str]:
        """``name: message`` of the alarms raised in the last week, oldest first."""
        try:
            rows = self._read("SELECT name, message FROM alarms WHERE raised_at > ? ORDER BY id",
                              (time.time() - ALARM_REPORT_S,))
        except StorageError:
            rows = []
        return [f"{n}: {m}" for n, m in rows] + self.memory_alarms

    def alarm_counts(self) -> dict[str, int]:
        """Alarms ever stored in this database, by name (the Prometheus counter)."""
        counts = {str(n): int(c) for n, c in self._read("SELECT name, COUNT(*) FROM alarms GROUP BY name")}
        for text in self.memory_alarms:
            name = text.partition(": ")[0]
            counts[name] = counts.get(name, 0) + 1
        return counts

    @property
    def events_pending(self) -> int:
        return self._events_pending

    def pending_events(self, limit: int = 32) -> list[StoredEvent]:
        rows = self._read("SELECT id, event, severity, data, created_at FROM events ORDER BY id LIMIT ?", (limit,))
        out = []
        for r in rows:
            severity: Literal["info", "warning", "alarm"] = (
                "info" if r[2] == "info" else "warning" if r[2] == "warning" else "alarm")
            try:
                data = orjson.loads(r[3])
            except orjson.JSONDecodeError:
                data = {}
            out.append(StoredEvent(int(r[0]), str(r[1]), severity, data if isinstance(data, dict) else {}, float(r[4])))
        return out

    def add_event(self, event: str, severity: Literal["info", "warning", "alarm"], data: dict[str, Any]) -> None:
        """Store an event that the publisher sends (QoS 1) until the broker has it, across restarts (operator
        feedback, for one). Raises StorageError (StorageFullError when the disk is full)."""
        blob = orjson.dumps(data)

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO events (event, severity, data, created_at) VALUES (?, ?, ?, ?)",
                         (event, severity, blob, time.time()))
            self._events_pending += 1  # only the writer thread changes it

        self._write(op)
        self._notify()  # wake the publisher

    def event_sent_async(self, event_id: int) -> Future[None]:
        """Forget a stored event once the broker has it."""

        def op(conn: sqlite3.Connection) -> None:
            if conn.execute("DELETE FROM events WHERE id = ?", (event_id,)).rowcount:
                self._events_pending = max(0, self._events_pending - 1)  # only the writer thread changes it

        return self._submit(op, frees=True)

    # ---------------------------------------------------------------- inputs
    def check_capacity(self) -> None:
        """Raise StorageFullError while the disk is short of space (under ``min_free_bytes`` free, or the reserve
        spent) or (policy ``reject_new``) the byte cap is hit. Cheap: one statvfs and one counter read."""
        try:
            state = self.space.check()
        except OSError as exc:
            raise StorageError(f"cannot stat {self.path.parent}: {exc.strerror}") from exc
        if state != "ok":
            self._refused_full += 1
            why = "the disk reserve is spent" if state == "full" else f"min_free_bytes is {self.limits.min_free_bytes}"
            raise StorageFullError(f"disk under {self.path.parent} has {self.space.free} bytes free ({why}); "
                                   "inputs wait")
        if self.limits.full_policy == "reject_new":
            used = int(self._read("SELECT value FROM counters WHERE name='unacked_bytes'")[0][0])
            if used >= self.limits.max_bytes:
                self._refused_full += 1
                raise StorageFullError(f"outbox holds {used} bytes (cap {self.limits.max_bytes})")

    def accept_input(
        self,
        input_id: str,
        *,
        source: str,
        pipeline: str,
        spool_path: str | None,
        meta: dict[str, Any],
        idempotency_key: str | None = None,
    ) -> bool:
        """Journal an accepted input; False when it was already known, or when ``idempotency_key`` already
        names another input (see :meth:`input_for_key`). Raises StorageFullError when full."""
        self.check_capacity()
        blob = orjson.dumps(meta)

        def op(conn: sqlite3.Connection) -> bool:
            if idempotency_key is not None:
                taken = conn.execute("INSERT OR IGNORE INTO input_keys VALUES (?, ?)", (idempotency_key, input_id))
                if taken.rowcount == 0:
                    return False
            cur = conn.execute(
                "INSERT OR IGNORE INTO inputs (input_id, source, pipeline, spool_path, meta, state, accepted_at)"
                " VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                (input_id, source, pipeline, spool_path, blob, time.time()),
            )
            return cur.rowcount == 1

        return self._write(op)

    def input_for_key(self, idempotency_key: str) -> str | None:
        """The input journalled with ``idempotency_key`` (kept as long as the input is), or None."""
        rows = self._read("SELECT input_id FROM input_keys WHERE key = ?", (idempotency_key,))
        return str(rows[0][0]) if rows else None

    def pending_inputs(self) -> list[PendingInput]:
        rows = self._read(
            "SELECT input_id, source, pipeline, spool_path, meta, accepted_at FROM inputs"
            " WHERE state = 'pending' ORDER BY accepted_at"
        )
        return [PendingInput(r[0], r[1], r[2], r[3], orjson.loads(r[4]), r[5]) for r in rows]

    def reject_input(self, input_id: str, code: str, message: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE inputs SET state='rejected', code=?, message=?, finished_at=?"
                " WHERE input_id=? AND state='pending'",
                (code, message[:1000], time.time(), input_id),
            )
            if cur.rowcount:
                self._bump(conn, "rejected_inputs", 1)

        self._write(op)

    def input_state(self, input_id: str) -> str | None:
        """'pending', 'done', 'rejected' or None when unknown."""
        rows = self._read("SELECT state FROM inputs WHERE input_id = ?", (input_id,))
        return str(rows[0][0]) if rows else None

    # ---------------------------------------------------------------- results
    def add_result(
        self, input_id: str, *, pipeline: str, model: str, model_version: str, body: dict[str, Any]
    ) -> StoredResult:
        """Store a result and mark its input done, in one transaction; idempotent per result id."""
        result_id = make_result_id(self.device_id, input_id, model, model_version)
        blob = orjson.dumps(body)
        size = len(blob) + ROW_OVERHEAD

        def op(conn: sqlite3.Connection) -> StoredResult:
            now = time.time()
            existing = conn.execute(_SELECT + " WHERE result_id = ?", (result_id,)).fetchone()
            conn.execute(
                "UPDATE inputs SET state='done', finished_at=? WHERE input_id=? AND state!='done'", (now, input_id)
            )
            if existing is not None:
                return _row(existing)
            if self.limits.full_policy == "drop_oldest":
                self._drop_to_fit(conn, size)
            seq = self._counter(conn, "next_seq")
            conn.execute(
                "INSERT INTO results (seq, result_id, input_id, pipeline, model, model_version, created_at, body, size)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, result_id, input_id, pipeline, model, model_version, now, blob, size),
            )
            self._bump(conn, "next_seq", 1)
            self._bump(conn, "unacked_rows", 1)
            self._bump(conn, "unacked_bytes", size)
            return StoredResult(result_id, seq, input_id, pipeline, model, model_version, now, body, size)

        return self._write(op)

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (cheap, non-blocking; on the writer thread) after each commit that stored
        results, before their ``add_result`` calls return: the publisher's wake-up."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _drop_to_fit(self, conn: sqlite3.Connection, size: int) -> None:
        used = self._counter(conn, "unacked_bytes")
        while used + size > self.limits.max_bytes:
            row = conn.execute("SELECT seq, size FROM results WHERE acked_at IS NULL ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return
            conn.execute("DELETE FROM results WHERE seq = ?", (row[0],))
            self._bump(conn, "dropped", 1)
            self._bump(conn, "unacked_rows", -1)
            self._bump(conn, "unacked_bytes", -row[1])
            used -= row[1]
            log.warning("outbox full: dropped result seq %d (policy drop_oldest)", row[0])

    def get_result(self, result_id: str) -> StoredResult | None:
        rows = self._read(_SELECT + " WHERE result_id = ?", (result_id,))
        return _row(rows[0]) if rows else None

    def get_result_by_input(self, input_id: str) -> StoredResult | None:
        rows = self._read(_SELECT + " WHERE input_id = ? ORDER BY seq LIMIT 1", (input_id,))
        return _row(rows[0]) if rows else None

    def unacked(self, after_seq: int = 0, limit: int = 100) -> list[StoredResult]:
        """Unacknowledged results with seq > ``after_seq``, oldest first."""
        rows = self._read(_SELECT + " WHERE acked_at IS NULL AND seq > ? ORDER BY seq LIMIT ?", (after_seq, limit))
        return [_row(r) for r in rows]

    def first_unacked_seq(self) -> int:
        """Smallest unacknowledged seq, or the next seq to be assigned when nothing is pending."""
        rows = self._read("SELECT MIN(seq) FROM results WHERE acked_at IS NULL")
        if rows and rows[0][0] is not None:
            return int(rows[0][0])
        return self.next_seq()

    def next_seq(self) -> int:
        """The seq the next result will get (every assigned seq is below it)."""
        return int(self._read("SELECT value FROM counters WHERE name='next_seq'")[0][0])

    def ack_through(self, seq: int) -> int:
        """Cumulative end-to-end ack: every result with seq <= ``seq`` is delivered. Returns rows newly acked."""
        return self.ack_through_async(seq).result()

    def ack_through_async(self, seq: int) -> Future[int]:
        """``ack_through`` without waiting: the future resolves (rows newly acked, or the StorageError) once the
        deletion is on disk. Until then the rows are still unacked here, which is safe: at worst re-sent.
        While space is short acknowledged rows are deleted at once, whatever ``retention_s`` says."""

        def chunk(conn: sqlite3.Connection, limit: int) -> tuple[int, bool]:
            count, size, top = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MAX(seq) FROM (SELECT seq, size FROM results"
                " WHERE acked_at IS NULL AND seq <= ? ORDER BY seq LIMIT ?)", (seq, limit),
            ).fetchone()
            if not count:
                if self.space.tight:
                    conn.execute("DELETE FROM results WHERE acked_at IS NOT NULL")
                return 0, True
            if self.limits.retention_s <= 0 or self.space.tight:
                conn.execute("DELETE FROM results WHERE seq <= ?", (top,))
            else:
                conn.execute("UPDATE results SET acked_at=? WHERE acked_at IS NULL AND seq <= ?", (time.time(), top))
            self._bump(conn, "unacked_rows", -count)
            self._bump(conn, "unacked_bytes", -size)
            self._bump(conn, "acked_total", count)
            return int(count), count < limit

        return self._submit(lambda conn: chunk(conn, 1 << 62)[0], frees=True, chunk=chunk)

    def prune(self) -> dict[str, int]:
        """Delete acked rows past retention, expire unacked rows past ``max_age_s`` (counted), forget old inputs."""
        return self.prune_async().result()

    def prune_async(self) -> Future[dict[str, int]]:
        """``prune`` without waiting for its commit."""
        now = time.time()

        def op(conn: sqlite3.Connection) -> dict[str, int]:
            too_old = now - self.limits.max_age_s
            keep = 0.0 if self.space.tight else self.limits.retention_s  # short of space: keep nothing acked
            pruned = conn.execute(
                "DELETE FROM results WHERE acked_at IS NOT NULL AND acked_at <= ?", (now - keep,)
            ).rowcount
            count, size = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM results WHERE acked_at IS NULL AND created_at < ?",
                (too_old,),
            ).fetchone()
            if count:
                conn.execute("DELETE FROM results WHERE acked_at IS NULL AND created_at < ?", (too_old,))
                self._bump(conn, "expired", count)
                self._bump(conn, "unacked_rows", -count)
                self._bump(conn, "unacked_bytes", -size)
                log.warning("outbox: %d results older than %.0f s expired unsent", count, self.limits.max_age_s)
            forgotten = conn.execute(
                "DELETE FROM inputs WHERE state != 'pending' AND finished_at < ?",
                (now - self.limits.input_retention_s,),
            ).rowcount
            if forgotten:
                conn.execute("DELETE FROM input_keys WHERE input_id NOT IN (SELECT input_id FROM inputs)")
            return {"pruned": pruned, "expired": int(count), "inputs_forgotten": forgotten}

        return self._submit(op, frees=True)

    # ---------------------------------------------------------------- commands
    def record_command(self, command_id: str, name: str) -> bool:
        """Journal a command id; False when it already ran (replay)."""

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("INSERT OR IGNORE INTO commands VALUES (?, ?, ?)", (command_id, name, time.time()))
            return cur.rowcount == 1

        return self._write(op)

    # ---------------------------------------------------------------- status
    def stats(self) -> OutboxStats:
        counters = dict(self._read("SELECT name, value FROM counters"))
        first = self._read("SELECT created_at FROM results WHERE acked_at IS NULL ORDER BY seq LIMIT 1")
        oldest = first[0][0] if first else None
        pending = self._read("SELECT COUNT(*) FROM inputs WHERE state = 'pending'")[0][0]
        return OutboxStats(
            backlog=int(counters["unacked_rows"]),
            bytes=int(counters["unacked_bytes"]),
            oldest_age_s=max(0.0, time.time() - oldest) if oldest is not None else 0.0,
            dropped=int(counters["dropped"]),
            expired=int(counters["expired"]),
            rejected_inputs=int(counters["rejected_inputs"]),
            refused_full=self._refused_full,
            pending_inputs=int(pending),
            acked_total=int(counters["acked_total"]),
            next_seq=int(counters["next_seq"]),
            epoch=self.epoch,
            alarms=tuple(self.alarms),
            disk_state=self.space.state,
            disk_free_bytes=self.space.free,
            reserve_held=self._reserve.held,
            events_pending=self._events_pending,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ops.put(None)
        self._thread.join(timeout=30)
        with self._read_lock:
            self._reader.close()
        self._writer.close()


_SELECT = (
    "SELECT result_id, seq, input_id, pipeline, model, model_version, created_at, body, size, acked_at FROM results"
)


def _row(r: Any) -> StoredResult:
    body = orjson.loads(r[7])
    return StoredResult(r[0], int(r[1]), r[2], r[3], r[4], r[5], float(r[6]), body, int(r[8]), r[9] is not None)
