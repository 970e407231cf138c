"""The durable outbox: accepted inputs and their results, in SQLite until the coordinator acknowledges them.

SQLite in WAL mode with ``synchronous=FULL``. Every write goes through one writer thread that
commits whatever callers queued meanwhile in a single transaction (group commit); a call returns
once its transaction is on disk (``ack_through_async`` returns a future instead, so that the
publisher never waits for an fsync). Reads use their own connection (WAL readers never block the
writer). Listeners hear about new results from the writer thread right after the commit.

Results get a deterministic ``result_id`` (device, input, model, model version) and a per-device
``seq`` that only goes up within an ``epoch`` (a random id minted when the database is created, so a
recreated database never reuses a sequence the coordinator already acknowledged).

A corrupt database file is moved aside (``<name>.corrupt-<time>``), a fresh one is created and an
alarm is recorded in ``alarms`` (the publisher reports it as an ``outbox_corrupt`` event).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson

from edge_agent.errors import StorageError, StorageFullError

log = logging.getLogger(__name__)
T = TypeVar("T")
ROW_OVERHEAD = 256  # bytes counted per result row on top of its body
GROUP_MAX = 512  # operations per transaction at most

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
"""
_COUNTERS = ("next_seq", "unacked_rows", "unacked_bytes", "dropped", "expired", "rejected_inputs", "acked_total")


@dataclass(frozen=True)
class OutboxLimits:
    """Caps and retention. ``full_policy``: refuse new inputs (``reject_new``) or drop the oldest
    unacknowledged results (``drop_oldest``, counted in ``dropped``) when ``max_bytes`` is reached."""

    max_bytes: int = 256 * 1024 * 1024
    max_age_s: float = 30 * 24 * 3600.0
    full_policy: Literal["reject_new", "drop_oldest"] = "reject_new"
    min_free_bytes: int = 32 * 1024 * 1024
    retention_s: float = 0.0
    input_retention_s: float = 7 * 24 * 3600.0


@dataclass(frozen=True)
class PendingInput:
    input_id: str
    source: str
    pipeline: str
    spool_path: str | None
    meta: dict[str, Any]
    accepted_at: float


@dataclass(frozen=True)
class StoredResult:
    result_id: str
    seq: int
    input_id: str
    pipeline: str
    model: str
    model_version: str
    created_at: float
    body: dict[str, Any]
    size: int = 0
    acked: bool = False


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
        }


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


class Outbox:
    """Durable journal of inputs and results (see module docstring). Thread-safe."""

    def __init__(self, path: Path, device_id: str, limits: OutboxLimits | None = None) -> None:
        self.path = Path(path)
        self.device_id = device_id
        self.limits = limits or OutboxLimits()
        self.alarms: list[str] = []
        self._refused_full = 0
        self._ops: queue.SimpleQueue[tuple[Callable[[sqlite3.Connection], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._read_lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = self._open_checked()
        self._reader = self._connect()
        self.epoch = str(self._reader.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0])
        self._thread = threading.Thread(target=self._write_loop, name="outbox-writer", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- opening
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _open_checked(self) -> sqlite3.Connection:
        try:
            return self._init_db()
        except sqlite3.Error as exc:
            if not _is_corruption(exc):
                raise _translate(exc, f"cannot open {self.path}") from exc
            quarantined = self._quarantine()
            message = f"outbox database {self.path} was corrupt ({exc}); moved to {quarantined}, started empty"
            log.error("%s", message)
            self.alarms.append(f"outbox_corrupt: {message}")
        try:
            return self._init_db()
        except sqlite3.Error as exc:
            raise _translate(exc, f"cannot recreate {self.path}") from exc

    def _init_db(self) -> sqlite3.Connection:
        conn = self._connect()
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (secrets.token_hex(8),))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('device_id', ?)", (self.device_id,))
            for name in _COUNTERS:
                conn.execute("INSERT OR IGNORE INTO counters VALUES (?, ?)", (name, 1 if name == "next_seq" else 0))
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return conn

    def _quarantine(self) -> Path:
        target = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                src.replace(Path(f"{target}{suffix}"))
        return target

    # ---------------------------------------------------------------- group commit
    def _write_loop(self) -> None:
        conn = self._writer
        while True:
            first = self._ops.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < GROUP_MAX:
                try:
                    item = self._ops.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._run_batch(conn, batch)
            if stop:
                return

    def _run_batch(
        self, conn: sqlite3.Connection, batch: list[tuple[Callable[[sqlite3.Connection], Any], Future[Any]]]
    ) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, _ in batch:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, fn(conn)))
                    conn.execute("RELEASE op")
                except Exception as exc:  # one failing call must not fail its neighbours...
                    if not conn.in_transaction:
                        raise  # ...unless SQLite rolled the whole transaction back (e.g. disk full)
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            error = _translate(exc, "write") if isinstance(exc, sqlite3.Error) else StorageError(f"outbox write: {exc}")
            log.error("outbox transaction failed, nothing of it was written: %s", exc)
            for _, fut in batch:
                fut.set_exception(error)
            return
        if any(ok and isinstance(value, StoredResult) for ok, value in outcomes):
            self._notify()  # straight from here: no wait until each caller thread gets the GIL back
        for (ok, value), (_, fut) in zip(outcomes, batch, strict=True):
            if ok:
                fut.set_result(value)
            elif isinstance(value, sqlite3.Error):
                fut.set_exception(_translate(value, "write"))
            else:
                fut.set_exception(value)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # a listener must never stop the writer
                log.exception("outbox: result listener failed")

    def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        """Queue ``fn`` for the next group commit; the future resolves once its transaction is on disk."""
        if self._closed:
            raise StorageError("outbox is closed")
        fut: Future[T] = Future()
        self._ops.put((fn, fut))
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

    # ---------------------------------------------------------------- inputs
    def check_capacity(self) -> None:
        """Raise StorageFullError when the disk is nearly full or (policy ``reject_new``) the byte cap is hit."""
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError as exc:
            raise StorageError(f"cannot stat {self.path.parent}: {exc}") from exc
        if free < self.limits.min_free_bytes:
            self._refused_full += 1
            raise StorageFullError(f"disk under {self.path.parent} has {free} bytes free")
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
        deletion is on disk. Until then the rows are still unacked here, which is safe: at worst re-sent."""

        def op(conn: sqlite3.Connection) -> int:
            count, size = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM results WHERE acked_at IS NULL AND seq <= ?", (seq,)
            ).fetchone()
            if not count:
                return 0
            if self.limits.retention_s <= 0:
                conn.execute("DELETE FROM results WHERE seq <= ?", (seq,))
            else:
                conn.execute("UPDATE results SET acked_at=? WHERE acked_at IS NULL AND seq <= ?", (time.time(), seq))
            self._bump(conn, "unacked_rows", -count)
            self._bump(conn, "unacked_bytes", -size)
            self._bump(conn, "acked_total", count)
            return int(count)

        return self._submit(op)

    def prune(self) -> dict[str, int]:
        """Delete acked rows past retention, expire unacked rows past ``max_age_s`` (counted), forget old inputs."""
        return self.prune_async().result()

    def prune_async(self) -> Future[dict[str, int]]:
        """``prune`` without waiting for its commit."""
        now = time.time()

        def op(conn: sqlite3.Connection) -> dict[str, int]:
            too_old = now - self.limits.max_age_s
            pruned = conn.execute(
                "DELETE FROM results WHERE acked_at IS NOT NULL AND acked_at < ?", (now - self.limits.retention_s,)
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

        return self._submit(op)

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
