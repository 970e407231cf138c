"""Coordinator storage behind a small interface; SQLite (default) here, PostgreSQL in ``store_pg``.

Results are keyed by ``result_id`` (unique): inserting a duplicate is a no-op. Per device and
epoch the store keeps a watermark: the highest seq such that every seq up to it is stored (or was
settled on the agent, which each result's ``base`` tells). That watermark is the cumulative ack.
The watermark is computed inside the same transaction as the inserts, so several coordinators
sharing one store (through an MQTT shared subscription) never acknowledge what is not committed.

Messages the coordinator refuses go to a bounded ``dead_letters`` table (topic, reason code, the
payload cut to ``DEAD_LETTER_PAYLOAD_BYTES``, its full size, time), in the same transaction as the
batch they came with. Any exception inside a transaction rolls it back. Failures are told apart:
:class:`StoreUnavailableError` (locked, unreachable, I/O: retry the same batch after ``reconnect()``)
and :class:`StoreRejectedError` (something in the batch itself: the coordinator isolates it).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from edge_agent.coordinator.events import EventRow
from edge_agent.errors import StorageError, StoreRejectedError, StoreUnavailableError

DEAD_LETTER_PAYLOAD_BYTES = 4096
"""A quarantined payload is kept up to this many bytes (its full size is recorded beside it)."""
DEAD_LETTER_KEEP = 10_000
"""The dead-letter table keeps the newest this many rows: a hostile device cannot fill the disk with it."""


@dataclass(frozen=True)
class ResultRow:
    result_id: str
    device: str
    epoch: str
    seq: int
    base: int
    input_id: str
    pipeline: str
    model: str
    model_version: str
    created_at: float
    received_at: float
    payload: bytes


@dataclass(frozen=True)
class DeviceUpdate:
    """What one status/heartbeat message says about a device (None = unchanged)."""

    device: str
    ts: float
    state: str | None = None
    heartbeat: dict[str, Any] | None = None


@dataclass(frozen=True)
class DeadLetter:
    """A message refused by the coordinator, kept for the operator (see ``DeadLetter.of``)."""

    topic: str
    reason: str
    detail: str
    payload: bytes
    payload_bytes: int
    received_at: float

    @classmethod
    def of(cls, topic: str, payload: bytes, reason: str, detail: str, received_at: float) -> DeadLetter:
        """Bound every field: topic and detail to printable text, the payload to ``DEAD_LETTER_PAYLOAD_BYTES``."""
        return cls(
            topic=_printable(topic, 256),
            reason=_printable(reason, 64),
            detail=_printable(detail, 500),
            payload=bytes(payload[:DEAD_LETTER_PAYLOAD_BYTES]),
            payload_bytes=len(payload),
            received_at=received_at,
        )


def _printable(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, control characters and lone surrogates replaced (storable anywhere)."""
    cut = text[:limit].encode("utf-8", "replace").decode("utf-8")
    return "".join(c if c.isprintable() else "?" for c in cut)


@dataclass(frozen=True)
class BatchOutcome:
    inserted: int
    duplicates: int
    watermarks: dict[tuple[str, str], int]
    """(device, epoch) -> cumulative ack for every pair touched by the batch."""
    events_inserted: int = 0
    events_duplicates: int = 0


@dataclass(frozen=True)
class ResultQuery:
    """Which stored results to read (every filter optional), in (created_at, result_id) order from ``after``."""

    device: str | None = None
    pipeline: str | None = None
    since: float | None = None
    """created_at >= since"""
    until: float | None = None
    """created_at < until"""
    after: tuple[float, str] | None = None
    """Keyset cursor: the (created_at, result_id) of the last row already read."""
    descending: bool = False
    limit: int = 100


@dataclass(frozen=True)
class StoredResult:
    result_id: str
    device: str
    epoch: str
    seq: int
    pipeline: str
    model: str
    model_version: str
    created_at: float
    received_at: float
    payload: bytes


def _keyset_where(
    mark: str,
    equal: Sequence[tuple[str, str | None]],
    since: float | None,
    until: float | None,
    after: tuple[float, str] | None,
    descending: bool,
    time_column: str,
    id_column: str,
    any_of: tuple[str, Sequence[str]] | None = None,
) -> tuple[str, list[Any]]:
    """`` WHERE ...`` (or ``""``) and its parameters for a keyset-paged read: equality filters, one IN filter,
    ``time_column`` in [since, until), and rows after ``after`` in (time, id) order. Column names are the caller's
    fixed names; every value is a placeholder ``mark``."""
    where: list[str] = []
    params: list[Any] = []
    for column, value in equal:
        if value is not None:
            where.append(f"{column} = {mark}")
            params.append(value)
    if any_of is not None and any_of[1]:
        where.append(f"{any_of[0]} IN ({', '.join([mark] * len(any_of[1]))})")
        params += list(any_of[1])
    if since is not None:
        where.append(f"{time_column} >= {mark}")
        params.append(since)
    if until is not None:
        where.append(f"{time_column} < {mark}")
        params.append(until)
    if after is not None:
        op = "<" if descending else ">"
        where.append(f"({time_column} {op} {mark} OR ({time_column} = {mark} AND {id_column} {op} {mark}))")
        params += [after[0], after[0], after[1]]
    return (" WHERE " + " AND ".join(where) if where else ""), params


def result_sql(query: ResultQuery, mark: str) -> tuple[str, list[Any]]:
    """The SELECT for ``query`` with ``mark`` as the placeholder (``?`` SQLite, ``%s`` psycopg)."""
    where, params = _keyset_where(mark, (("device", query.device), ("pipeline", query.pipeline)), query.since,
                                  query.until, query.after, query.descending, "created_at", "result_id")
    order = "DESC" if query.descending else "ASC"
    sql = (
        "SELECT result_id, device, epoch, seq, pipeline, model, model_version, created_at, received_at, payload"  # noqa: S608 (fixed names and placeholders only)
        f" FROM results{where}"
        f" ORDER BY created_at {order}, result_id {order} LIMIT {mark}"
    )
    params.append(int(query.limit))
    return sql, params


def stored_results(rows: Sequence[tuple[Any, ...]]) -> list[StoredResult]:
    return [
        StoredResult(str(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4]), str(r[5]), str(r[6]), float(r[7]),
                     float(r[8]), bytes(r[9]))
        for r in rows
    ]


ALERTS_KEEP = 10_000
"""The alerts table keeps the newest this many alerts."""
EVENTS_KEEP = 1_000_000
"""The events table keeps the newest this many events whatever the retention says (a device flooding events
cannot fill the disk); ``store.retention`` bounds it further by age and ``max_events``."""


@dataclass(frozen=True)
class EventQuery:
    """Which stored events to read (every filter optional), in (ts, event_id) order from ``after``."""

    device: str | None = None
    events: tuple[str, ...] = ()
    """event names (any of them); empty: all"""
    pipeline: str | None = None
    since: float | None = None
    """ts >= since"""
    until: float | None = None
    """ts < until"""
    after: tuple[float, str] | None = None
    descending: bool = False
    limit: int = 100


EVENT_COLUMNS = ("event_id, device, event, severity, ts, received_at, pipeline, result_id, subtype, subject_ts, via,"
                 " data")


def event_sql(query: EventQuery, mark: str) -> tuple[str, list[Any]]:
    """The SELECT for ``query`` with ``mark`` as the placeholder."""
    where, params = _keyset_where(mark, (("device", query.device), ("pipeline", query.pipeline)), query.since,
                                  query.until, query.after, query.descending, "ts", "event_id",
                                  any_of=("event", query.events))
    order = "DESC" if query.descending else "ASC"
    sql = (
        f"SELECT {EVENT_COLUMNS} FROM events{where}"  # noqa: S608 (fixed names and placeholders only)
        f" ORDER BY ts {order}, event_id {order} LIMIT {mark}"
    )
    params.append(int(query.limit))
    return sql, params


def event_rows(rows: Sequence[tuple[Any, ...]]) -> list[EventRow]:
    return [
        EventRow(str(r[0]), str(r[1]), str(r[2]), str(r[3]), float(r[4]), float(r[5]), r[6], r[7], r[8],
                 None if r[9] is None else float(r[9]), "result" if r[10] == "result" else "event", bytes(r[11]))
        for r in rows
    ]


def event_params(e: EventRow) -> tuple[Any, ...]:
    return (e.event_id, e.device, e.event, e.severity, e.ts, e.received_at, e.pipeline, e.result_id, e.subtype,
            e.subject_ts, e.via, e.data)


FEEDBACK_SQL = (
    "SELECT device, pipeline, subtype, COUNT(*) FROM (SELECT device, pipeline, subtype, ROW_NUMBER() OVER"
    " (PARTITION BY device, pipeline, result_id ORDER BY ts DESC, event_id DESC) AS k FROM events"
    " WHERE event = 'inspection_feedback' AND COALESCE(subject_ts, ts) >= %s AND COALESCE(subject_ts, ts) < %s{device})"
    " latest WHERE k = 1 GROUP BY device, pipeline, subtype ORDER BY device, pipeline"
)
"""Operator feedback per (device, pipeline) and kind, the latest word on each part (a ``replaces`` counts once),
on parts inspected in [since, until). Placeholders are PostgreSQL's (SQLite: ``?``)."""
INSPECTED_SQL = ("SELECT COUNT(*) FROM results WHERE device = %s AND pipeline = %s AND created_at >= %s"
                 " AND created_at < %s")


def feedback_lines(counts: Sequence[tuple[Any, ...]], inspected: Callable[[str, str], int]) -> list[dict[str, Any]]:
    """(device, pipeline, kind, n) rows and a count of the parts inspected -> one summary per line."""
    lines: dict[tuple[str, str], dict[str, Any]] = {}
    for device, pipeline, kind, n in counts:
        line = lines.setdefault((str(device), str(pipeline)), {
            "device": str(device), "pipeline": str(pipeline), "false_reject": 0, "missed_defect": 0})
        if kind in ("false_reject", "missed_defect"):
            line[str(kind)] += int(n)
    out = []
    for (device, pipeline), line in lines.items():
        parts = inspected(device, pipeline)
        line["inspected"] = parts
        line["false_reject_rate"] = line["false_reject"] / parts if parts else None
        line["missed_defect_rate"] = line["missed_defect"] / parts if parts else None
        out.append(line)
    return out


PRUNE_EVENTS_BY_AGE = ("DELETE FROM events WHERE n IN (SELECT n FROM events WHERE received_at < %s ORDER BY n"
                       " LIMIT %s)")
PRUNE_EVENTS_OLDEST = "DELETE FROM events WHERE n IN (SELECT n FROM events ORDER BY n LIMIT %s)"
CAP_EVENTS = "DELETE FROM events WHERE n <= (SELECT MAX(n) FROM events) - %s"


class Store(Protocol):
    def commit_batch(
        self, results: Sequence[ResultRow], devices: Sequence[DeviceUpdate], dead: Sequence[DeadLetter] = (),
        events: Sequence[EventRow] = (),
    ) -> BatchOutcome:
        """Insert results and events (duplicates ignored), device updates and dead letters, advance watermarks,
        commit.

        Any failure rolls the whole transaction back and raises StoreUnavailableError (retry after
        ``reconnect``) or StoreRejectedError (the batch's content).
        """

    def reconnect(self) -> None:
        """Drop the connection and open a new one; StoreUnavailableError while the database is unreachable."""

    def devices(self) -> list[dict[str, Any]]: ...

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest quarantined messages (payload as text, cut), newest first."""

    def count_results(self, device: str | None = None) -> int: ...

    def prune(self, *, older_than: float | None = None, keep: int | None = None, limit: int = 5000) -> int:
        """Retention: delete at most ``limit`` acknowledged results (received before ``older_than``, then the
        oldest beyond the newest ``keep``); returns how many. Never one above its device's watermark."""

    def result_ids(self, device: str | None = None) -> set[str]: ...

    def query_results(self, query: ResultQuery) -> list[StoredResult]:
        """One page of stored results matching ``query`` (filters, keyset cursor, order, limit)."""

    def query_events(self, query: EventQuery) -> list[EventRow]:
        """One page of stored device events matching ``query``."""

    def feedback_summary(self, since: float, until: float, device: str | None = None) -> list[dict[str, Any]]:
        """Per (device, pipeline) with feedback on parts inspected in [since, until): false_reject, missed_defect,
        the parts inspected (stored results created in the window) and the rates (``feedback_lines``)."""

    def prune_events(self, *, older_than: float | None = None, keep: int | None = None, limit: int = 5000) -> int:
        """Retention of events: at most ``limit`` received before ``older_than``, then the oldest beyond ``keep``."""

    def save_alerts(self, alerts: Sequence[dict[str, Any]]) -> None:
        """Insert or update alerts (JSON objects of schema ``alert.json``), keyed by their ``id``."""

    def alerts(self, *, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest alerts (by ``started_at``), optionally only ``firing`` or ``resolved`` ones."""

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    result_id TEXT PRIMARY KEY, device TEXT NOT NULL, epoch TEXT NOT NULL, seq INTEGER NOT NULL,
    input_id TEXT NOT NULL, pipeline TEXT NOT NULL, model TEXT NOT NULL, model_version TEXT NOT NULL,
    created_at REAL NOT NULL, received_at REAL NOT NULL, payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS results_dev_seq ON results(device, epoch, seq);
CREATE INDEX IF NOT EXISTS results_received ON results(received_at);
CREATE TABLE IF NOT EXISTS watermarks (
    device TEXT NOT NULL, epoch TEXT NOT NULL, acked_seq INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (device, epoch));
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, state TEXT, state_ts REAL, last_heartbeat REAL, heartbeat BLOB,
    last_result REAL, results INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, payload BLOB NOT NULL, payload_bytes INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS results_created ON results(created_at, result_id);
CREATE TABLE IF NOT EXISTS alerts (
    alert_id TEXT PRIMARY KEY, rule TEXT NOT NULL, state TEXT NOT NULL, started_at REAL NOT NULL,
    updated_at REAL NOT NULL, payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS alerts_started ON alerts(started_at);
CREATE TABLE IF NOT EXISTS events (
    n INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, device TEXT NOT NULL, event TEXT NOT NULL,
    severity TEXT NOT NULL, ts REAL NOT NULL, received_at REAL NOT NULL, pipeline TEXT, result_id TEXT, subtype TEXT,
    subject_ts REAL, via TEXT NOT NULL, data BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts, event_id);
CREATE INDEX IF NOT EXISTS events_kind ON events(event, ts);
CREATE INDEX IF NOT EXISTS events_received ON events(received_at);
"""


PRUNE_BY_AGE = (
    "DELETE FROM results WHERE result_id IN (SELECT r.result_id FROM results r WHERE r.received_at < %s AND EXISTS"
    " (SELECT 1 FROM watermarks w WHERE w.device = r.device AND w.epoch = r.epoch AND w.acked_seq >= r.seq)"
    " ORDER BY r.received_at LIMIT %s)"
)
PRUNE_OLDEST = (
    "DELETE FROM results WHERE result_id IN (SELECT r.result_id FROM results r WHERE EXISTS"
    " (SELECT 1 FROM watermarks w WHERE w.device = r.device AND w.epoch = r.epoch AND w.acked_seq >= r.seq)"
    " ORDER BY r.received_at LIMIT %s)"
)
"""Retention only removes results at or below their (device, epoch) watermark: the acknowledged prefix, which the
watermark never needs again (it only ever grows from its stored value). Placeholders are PostgreSQL's ``%s``
(SQLite uses them with ``%s`` replaced by ``?``)."""


def _sqlite_failure(exc: BaseException) -> StorageError:
    """Translate an exception raised inside a transaction: the store's state, or the batch's content."""
    if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError | sqlite3.ProgrammingError):
        return StoreRejectedError(f"coordinator store refused the batch: {exc}")
    if isinstance(exc, sqlite3.Error):  # locked, busy, I/O, full, read-only, corrupt: not the batch's fault
        return StoreUnavailableError(f"coordinator store: {exc}")
    return StoreRejectedError(f"coordinator store refused the batch: {type(exc).__name__}: {exc}")


def heartbeat_dict(stored: bytes | None) -> dict[str, Any]:
    """A stored heartbeat as a dict ({} when none, or when an older coordinator stored something odd)."""
    try:
        value = orjson.loads(stored) if stored else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def backlog(heartbeat: dict[str, Any]) -> Any:
    outbox = heartbeat.get("outbox")
    return outbox.get("backlog") if isinstance(outbox, dict) else None


def dead_letter_rows(rows: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """(id, received_at, topic, reason, detail, payload, payload_bytes) rows as JSON-ready dicts."""
    return [
        {
            "id": int(row_id), "received_at": received_at, "topic": topic, "reason": reason, "detail": detail,
            "payload": bytes(payload).decode("utf-8", "replace"), "payload_bytes": int(size),
        }
        for row_id, received_at, topic, reason, detail, payload, size in rows
    ]


def alert_row(alert: dict[str, Any]) -> tuple[str, str, str, float, float, bytes]:
    """(alert_id, rule, state, started_at, updated_at, payload) of one alert object."""
    return (
        str(alert["id"]), str(alert["rule"]), str(alert["state"]), float(alert["started_at"]),
        float(alert["updated_at"]), orjson.dumps(alert),
    )


def next_watermark(current: int, base: int, seqs_above: Sequence[int]) -> int:
    """Pure: advance ``current`` over ``base - 1`` and then over consecutive stored seqs (sorted ascending)."""
    mark = max(current, base - 1)
    for seq in seqs_above:
        if seq <= mark:
            continue
        if seq != mark + 1:
            break
        mark = seq
    return mark


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """A failed read is the store's state (closed, locked, I/O): StoreUnavailableError."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreUnavailableError(f"coordinator store: {exc}") from exc


class SqliteStore:
    """Store in one SQLite file (WAL, synchronous=FULL); safe to share between processes on one host."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=self.busy_timeout_s
            )
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise StoreUnavailableError(f"coordinator store {self.path}: {exc}") from exc
        return conn

    def reconnect(self) -> None:
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = self._open()

    def commit_batch(
        self, results: Sequence[ResultRow], devices: Sequence[DeviceUpdate], dead: Sequence[DeadLetter] = (),
        events: Sequence[EventRow] = (),
    ) -> BatchOutcome:
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                inserted = 0
                fresh: dict[str, int] = {}
                bases: dict[tuple[str, str], int] = {}
                last: dict[str, float] = {}
                for r in results:
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (r.result_id, r.device, r.epoch, r.seq, r.input_id, r.pipeline, r.model, r.model_version,
                         r.created_at, r.received_at, r.payload),
                    )
                    inserted += cur.rowcount
                    fresh[r.device] = fresh.get(r.device, 0) + cur.rowcount
                    key = (r.device, r.epoch)
                    bases[key] = max(bases.get(key, 1), r.base)
                    last[r.device] = max(last.get(r.device, 0.0), r.received_at)
                marks = {key: self._advance(conn, key[0], key[1], base) for key, base in bases.items()}
                for device, ts in last.items():
                    conn.execute("INSERT OR IGNORE INTO devices (device) VALUES (?)", (device,))
                    conn.execute(
                        "UPDATE devices SET last_result = ?, results = results + ? WHERE device = ?",
                        (ts, fresh[device], device),
                    )
                for d in devices:
                    self._device(conn, d)
                self._dead(conn, dead)
                events_inserted = 0
                for e in events:
                    events_inserted += conn.execute(
                        f"INSERT OR IGNORE INTO events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                        event_params(e),
                    ).rowcount
                if events_inserted:
                    conn.execute(CAP_EVENTS.replace("%s", "?"), (EVENTS_KEEP,))
                conn.execute("COMMIT")
            except BaseException as exc:  # anything at all: never leave the transaction open
                try:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the connection is unusable; the coordinator reconnects
                if not isinstance(exc, Exception):
                    raise
                raise _sqlite_failure(exc) from exc
        return BatchOutcome(inserted, len(results) - inserted, marks, events_inserted, len(events) - events_inserted)

    @staticmethod
    def _dead(conn: sqlite3.Connection, dead: Sequence[DeadLetter]) -> None:
        if not dead:
            return
        conn.executemany(
            "INSERT INTO dead_letters (received_at, topic, reason, detail, payload, payload_bytes)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(d.received_at, d.topic, d.reason, d.detail, d.payload, d.payload_bytes) for d in dead],
        )
        conn.execute(
            "DELETE FROM dead_letters WHERE id <= (SELECT MAX(id) FROM dead_letters) - ?", (DEAD_LETTER_KEEP,)
        )

    @staticmethod
    def _advance(conn: sqlite3.Connection, device: str, epoch: str, base: int) -> int:
        row = conn.execute(
            "SELECT acked_seq FROM watermarks WHERE device = ? AND epoch = ?", (device, epoch)
        ).fetchone()
        current = int(row[0]) if row else 0
        mark = max(current, base - 1)
        while True:
            seqs = [
                s for (s,) in conn.execute(
                    "SELECT seq FROM results WHERE device = ? AND epoch = ? AND seq > ? ORDER BY seq LIMIT 5000",
                    (device, epoch, mark),
                )
            ]
            new = next_watermark(mark, 1, seqs)
            if new == mark or len(seqs) < 5000 or new != seqs[-1]:
                mark = new
                break
            mark = new
        if mark != current or row is None:
            conn.execute(
                "INSERT INTO watermarks VALUES (?, ?, ?, strftime('%s','now'))"
                " ON CONFLICT (device, epoch) DO UPDATE SET acked_seq = MAX(acked_seq, excluded.acked_seq),"
                " updated_at = excluded.updated_at",
                (device, epoch, mark),
            )
        return mark

    @staticmethod
    def _device(conn: sqlite3.Connection, d: DeviceUpdate) -> None:
        conn.execute("INSERT OR IGNORE INTO devices (device) VALUES (?)", (d.device,))
        if d.state is not None:
            conn.execute(
                "UPDATE devices SET state = ?, state_ts = ? WHERE device = ? AND COALESCE(state_ts, 0) <= ?",
                (d.state, d.ts, d.device, d.ts),
            )
        if d.heartbeat is not None:
            conn.execute(
                "UPDATE devices SET last_heartbeat = ?, heartbeat = ? WHERE device = ?",
                (d.ts, orjson.dumps(d.heartbeat), d.device),
            )

    def devices(self) -> list[dict[str, Any]]:
        with _reading(), self._lock:
            rows = self._conn.execute(
                "SELECT device, state, state_ts, last_heartbeat, heartbeat, last_result, results FROM devices"
                " ORDER BY device"
            ).fetchall()
        out = []
        for device, state, state_ts, last_hb, hb, last_result, count in rows:
            heartbeat = heartbeat_dict(hb)
            out.append(
                {
                    "device": device,
                    "state": state or "unknown",
                    "state_ts": state_ts,
                    "last_heartbeat": last_hb,
                    "last_result": last_result,
                    "results": count,
                    "backlog": backlog(heartbeat),
                    "agent_state": heartbeat.get("state"),
                    "heartbeat": heartbeat,
                }
            )
        return out

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        with _reading(), self._lock:
            rows = self._conn.execute(
                "SELECT id, received_at, topic, reason, detail, payload, payload_bytes FROM dead_letters"
                " ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return dead_letter_rows(rows)

    def prune(self, *, older_than: float | None = None, keep: int | None = None, limit: int = 5000) -> int:
        """Delete at most ``limit`` acknowledged results: received before ``older_than`` (epoch seconds), then the
        oldest beyond the newest ``keep``. Returns how many went; one short transaction per call."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                deleted = 0
                if older_than is not None:
                    deleted += conn.execute(
                        PRUNE_BY_AGE.replace("%s", "?"), (older_than, limit),
                    ).rowcount
                if keep is not None and deleted < limit:
                    excess = int(conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]) - keep
                    if excess > 0:
                        deleted += conn.execute(
                            PRUNE_OLDEST.replace("%s", "?"), (min(excess, limit - deleted),),
                        ).rowcount
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                if not isinstance(exc, Exception):
                    raise
                raise _sqlite_failure(exc) from exc
        return deleted

    def count_results(self, device: str | None = None) -> int:
        with _reading(), self._lock:
            if device is None:
                return int(self._conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
            return int(self._conn.execute("SELECT COUNT(*) FROM results WHERE device = ?", (device,)).fetchone()[0])

    def result_ids(self, device: str | None = None) -> set[str]:
        with _reading(), self._lock:
            if device is None:
                return {r for (r,) in self._conn.execute("SELECT result_id FROM results")}
            return {r for (r,) in self._conn.execute("SELECT result_id FROM results WHERE device = ?", (device,))}

    def query_results(self, query: ResultQuery) -> list[StoredResult]:
        sql, params = result_sql(query, "?")
        with _reading(), self._lock:
            return stored_results(self._conn.execute(sql, params).fetchall())

    def query_events(self, query: EventQuery) -> list[EventRow]:
        sql, params = event_sql(query, "?")
        with _reading(), self._lock:
            return event_rows(self._conn.execute(sql, params).fetchall())

    def feedback_summary(self, since: float, until: float, device: str | None = None) -> list[dict[str, Any]]:
        sql = FEEDBACK_SQL.format(device=" AND device = %s" if device is not None else "").replace("%s", "?")
        params: list[Any] = [since, until] + ([device] if device is not None else [])

        def inspected(dev: str, pipeline: str) -> int:
            return int(self._conn.execute(INSPECTED_SQL.replace("%s", "?"), (dev, pipeline, since, until))
                       .fetchone()[0])

        with _reading(), self._lock:
            return feedback_lines(self._conn.execute(sql, params).fetchall(), inspected)

    def prune_events(self, *, older_than: float | None = None, keep: int | None = None, limit: int = 5000) -> int:
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                deleted = 0
                if older_than is not None:
                    deleted += conn.execute(PRUNE_EVENTS_BY_AGE.replace("%s", "?"), (older_than, limit)).rowcount
                if keep is not None and deleted < limit:
                    excess = int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]) - keep
                    if excess > 0:
                        deleted += conn.execute(PRUNE_EVENTS_OLDEST.replace("%s", "?"),
                                                (min(excess, limit - deleted),)).rowcount
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                if not isinstance(exc, Exception):
                    raise
                raise _sqlite_failure(exc) from exc
        return deleted

    def save_alerts(self, alerts: Sequence[dict[str, Any]]) -> None:
        if not alerts:
            return
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "INSERT INTO alerts VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (alert_id) DO UPDATE SET"
                    " state = excluded.state, updated_at = excluded.updated_at, payload = excluded.payload",
                    [alert_row(a) for a in alerts],
                )
                conn.execute(
                    "DELETE FROM alerts WHERE alert_id IN (SELECT alert_id FROM alerts ORDER BY started_at DESC"
                    " LIMIT -1 OFFSET ?)", (ALERTS_KEEP,),
                )
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                if not isinstance(exc, Exception):
                    raise
                raise _sqlite_failure(exc) from exc

    def alerts(self, *, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        with _reading(), self._lock:
            if state:
                rows = self._conn.execute(
                    "SELECT payload FROM alerts WHERE state = ? ORDER BY started_at DESC LIMIT ?", (state, limit)
                ).fetchall()
            else:
                rows = self._conn.execute("SELECT payload FROM alerts ORDER BY started_at DESC LIMIT ?",
                                          (limit,)).fetchall()
        return [orjson.loads(bytes(r[0])) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
