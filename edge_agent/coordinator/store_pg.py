"""PostgreSQL store for the coordinator (psycopg 3): same contract as ``SqliteStore``.

Several coordinators may share one database. Inside each batch transaction the watermark row of
every (device, epoch) touched is locked (``FOR UPDATE``, in sorted order, so no deadlocks) before
the contiguous prefix is computed; a coordinator therefore always sees the other's committed rows
and never acknowledges anything that is not committed.

Any exception inside a transaction rolls it back. A lost or broken connection (server restarted,
network gone) raises StoreUnavailableError and ``reconnect()`` opens a new one; errors caused by the
batch's data raise StoreRejectedError.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import psycopg

from edge_agent.coordinator.events import EventRow
from edge_agent.coordinator.store import (
    ALERTS_KEEP,
    CAP_EVENTS,
    DEAD_LETTER_KEEP,
    EVENT_COLUMNS,
    EVENTS_KEEP,
    FEEDBACK_SQL,
    INSPECTED_SQL,
    PRUNE_BY_AGE,
    PRUNE_EVENTS_BY_AGE,
    PRUNE_EVENTS_OLDEST,
    PRUNE_OLDEST,
    BatchOutcome,
    DeadLetter,
    DeviceUpdate,
    EventQuery,
    ResultQuery,
    ResultRow,
    StoredResult,
    alert_row,
    backlog,
    dead_letter_rows,
    event_params,
    event_rows,
    event_sql,
    feedback_lines,
    heartbeat_dict,
    next_watermark,
    result_sql,
    stored_results,
)
from edge_agent.errors import StorageError, StoreRejectedError, StoreUnavailableError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    result_id TEXT PRIMARY KEY, device TEXT NOT NULL, epoch TEXT NOT NULL, seq BIGINT NOT NULL,
    input_id TEXT NOT NULL, pipeline TEXT NOT NULL, model TEXT NOT NULL, model_version TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, received_at DOUBLE PRECISION NOT NULL, payload BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS results_dev_seq ON results(device, epoch, seq);
CREATE INDEX IF NOT EXISTS results_received ON results(received_at);
CREATE TABLE IF NOT EXISTS watermarks (
    device TEXT NOT NULL, epoch TEXT NOT NULL, acked_seq BIGINT NOT NULL, PRIMARY KEY (device, epoch));
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, state TEXT, state_ts DOUBLE PRECISION, last_heartbeat DOUBLE PRECISION,
    heartbeat BYTEA, last_result DOUBLE PRECISION, results BIGINT NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS dead_letters (
    id BIGSERIAL PRIMARY KEY, received_at DOUBLE PRECISION NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, payload BYTEA NOT NULL, payload_bytes BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS results_created ON results(created_at, result_id);
CREATE TABLE IF NOT EXISTS alerts (
    alert_id TEXT PRIMARY KEY, rule TEXT NOT NULL, state TEXT NOT NULL, started_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL, payload BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS alerts_started ON alerts(started_at);
CREATE TABLE IF NOT EXISTS events (
    n BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, device TEXT NOT NULL, event TEXT NOT NULL,
    severity TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, received_at DOUBLE PRECISION NOT NULL, pipeline TEXT,
    result_id TEXT, subtype TEXT, subject_ts DOUBLE PRECISION, via TEXT NOT NULL, data BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts, event_id);
CREATE INDEX IF NOT EXISTS events_kind ON events(event, ts);
CREATE INDEX IF NOT EXISTS events_received ON events(received_at);
"""


def _pg_failure(exc: Exception, conn: psycopg.Connection[Any] | None) -> StorageError:
    """The server or the link (retry after reconnect), or the batch's content (isolate it)."""
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) or conn is None or conn.broken:
        return StoreUnavailableError(f"coordinator store (postgres): {exc}")
    if isinstance(exc, psycopg.errors.InsufficientResources | psycopg.errors.LockNotAvailable):
        return StoreUnavailableError(f"coordinator store (postgres): {exc}")
    return StoreRejectedError(f"coordinator store (postgres) refused the batch: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _reading(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """A failed read is the server's or the link's state: StoreUnavailableError."""
    try:
        yield
    except psycopg.Error as exc:
        raise StoreUnavailableError(f"coordinator store (postgres): {exc}") from exc


class PostgresStore:
    def __init__(self, dsn: str, *, connect_timeout_s: int = 5) -> None:
        self._dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._conn = self._open()

    def _open(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = None
        try:
            conn = psycopg.connect(self._dsn, autocommit=False, connect_timeout=self._connect_timeout_s)
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(724011)")  # two coordinators creating tables
                for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                    conn.execute(statement)
        except psycopg.Error as exc:
            if conn is not None:
                conn.close()
            raise StoreUnavailableError(f"coordinator store (postgres): {exc}") from exc
        return conn

    def reconnect(self) -> None:
        with self._lock:
            self._conn.close()
            self._conn = self._open()

    def commit_batch(
        self, results: Sequence[ResultRow], devices: Sequence[DeviceUpdate], dead: Sequence[DeadLetter] = (),
        events: Sequence[EventRow] = (),
    ) -> BatchOutcome:
        with self._lock:
            try:  # conn.transaction() rolls back on any exception raised inside it
                return self._commit(results, devices, dead, events)
            except Exception as exc:
                raise _pg_failure(exc, self._conn) from exc

    def _commit(
        self, results: Sequence[ResultRow], devices: Sequence[DeviceUpdate], dead: Sequence[DeadLetter],
        events: Sequence[EventRow],
    ) -> BatchOutcome:
        conn = self._conn
        with conn.transaction():
            inserted = 0
            fresh: dict[str, int] = {}
            bases: dict[tuple[str, str], int] = {}
            last: dict[str, float] = {}
            for r in results:
                cur = conn.execute(
                    "INSERT INTO results VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (result_id) DO NOTHING",
                    (r.result_id, r.device, r.epoch, r.seq, r.input_id, r.pipeline, r.model, r.model_version,
                     r.created_at, r.received_at, r.payload),
                )
                inserted += cur.rowcount
                fresh[r.device] = fresh.get(r.device, 0) + cur.rowcount
                key = (r.device, r.epoch)
                bases[key] = max(bases.get(key, 1), r.base)
                last[r.device] = max(last.get(r.device, 0.0), r.received_at)
            marks = {key: self._advance(conn, key[0], key[1], bases[key]) for key in sorted(bases)}
            for device in sorted(set(last) | {d.device for d in devices}):
                conn.execute("INSERT INTO devices (device) VALUES (%s) ON CONFLICT DO NOTHING", (device,))
            for device, ts in sorted(last.items()):
                conn.execute(
                    "UPDATE devices SET last_result = GREATEST(COALESCE(last_result, 0), %s), results = results + %s"
                    " WHERE device = %s",
                    (ts, fresh[device], device),
                )
            for d in devices:
                if d.state is not None:
                    conn.execute(
                        "UPDATE devices SET state = %s, state_ts = %s"
                        " WHERE device = %s AND COALESCE(state_ts, 0) <= %s",
                        (d.state, d.ts, d.device, d.ts),
                    )
                if d.heartbeat is not None:
                    conn.execute(
                        "UPDATE devices SET last_heartbeat = %s, heartbeat = %s WHERE device = %s",
                        (d.ts, orjson.dumps(d.heartbeat), d.device),
                    )
            if dead:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO dead_letters (received_at, topic, reason, detail, payload, payload_bytes)"
                        " VALUES (%s, %s, %s, %s, %s, %s)",
                        [(x.received_at, x.topic, x.reason, x.detail, x.payload, x.payload_bytes) for x in dead],
                    )
                conn.execute(
                    "DELETE FROM dead_letters WHERE id <= (SELECT MAX(id) FROM dead_letters) - %s",
                    (DEAD_LETTER_KEEP,),
                )
            events_inserted = 0
            for e in events:
                events_inserted += conn.execute(
                    f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"  # noqa: S608
                    " ON CONFLICT (event_id) DO NOTHING",
                    event_params(e),
                ).rowcount
            if events_inserted:
                conn.execute(CAP_EVENTS, (EVENTS_KEEP,))
        return BatchOutcome(inserted, len(results) - inserted, marks, events_inserted, len(events) - events_inserted)

    @staticmethod
    def _advance(conn: psycopg.Connection[Any], device: str, epoch: str, base: int) -> int:
        conn.execute(
            "INSERT INTO watermarks VALUES (%s, %s, 0) ON CONFLICT DO NOTHING", (device, epoch)
        )
        row = conn.execute(
            "SELECT acked_seq FROM watermarks WHERE device = %s AND epoch = %s FOR UPDATE", (device, epoch)
        ).fetchone()
        current = int(row[0]) if row else 0
        mark = max(current, base - 1)
        while True:
            seqs = [
                int(s)
                for (s,) in conn.execute(
                    "SELECT seq FROM results WHERE device = %s AND epoch = %s AND seq > %s ORDER BY seq LIMIT 5000",
                    (device, epoch, mark),
                ).fetchall()
            ]
            new = next_watermark(mark, 1, seqs)
            done = new == mark or len(seqs) < 5000 or new != seqs[-1]
            mark = new
            if done:
                break
        if mark > current:
            conn.execute(
                "UPDATE watermarks SET acked_seq = %s WHERE device = %s AND epoch = %s", (mark, device, epoch)
            )
        return mark

    def devices(self) -> list[dict[str, Any]]:
        with self._lock, _reading(self._conn), self._conn.transaction():
            rows = self._conn.execute(
                "SELECT device, state, state_ts, last_heartbeat, heartbeat, last_result, results FROM devices"
                " ORDER BY device"
            ).fetchall()
        out = []
        for device, state, state_ts, last_hb, hb, last_result, count in rows:
            heartbeat = heartbeat_dict(bytes(hb) if hb else None)
            out.append(
                {
                    "device": device,
                    "state": state or "unknown",
                    "state_ts": state_ts,
                    "last_heartbeat": last_hb,
                    "last_result": last_result,
                    "results": int(count),
                    "backlog": backlog(heartbeat),
                    "agent_state": heartbeat.get("state"),
                    "heartbeat": heartbeat,
                }
            )
        return out

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock, _reading(self._conn), self._conn.transaction():
            rows = self._conn.execute(
                "SELECT id, received_at, topic, reason, detail, payload, payload_bytes FROM dead_letters"
                " ORDER BY id DESC LIMIT %s",
                (limit,),
            ).fetchall()
        return dead_letter_rows(rows)

    def prune(self, *, older_than: float | None = None, keep: int | None = None, limit: int = 5000) -> int:
        """As ``SqliteStore.prune``: at most ``limit`` acknowledged results, by age then beyond ``keep``."""
        with self._lock:
            try:
                with self._conn.transaction():
                    deleted = 0
                    if older_than is not None:
                        deleted += self._conn.execute(PRUNE_BY_AGE, (older_than, limit)).rowcount
                    if keep is not None and deleted < limit:
                        row = self._conn.execute("SELECT COUNT(*) FROM results").fetchone()
                        excess = (int(row[0]) if row else 0) - keep
                        if excess > 0:
                            deleted += self._conn.execute(PRUNE_OLDEST, (min(excess, limit - deleted),)).rowcount
            except Exception as exc:
                raise _pg_failure(exc, self._conn) from exc
        return deleted

    def count_results(self, device: str | None = None) -> int:
        with self._lock, _reading(self._conn), self._conn.transaction():
            if device is None:
                row = self._conn.execute("SELECT COUNT(*) FROM results").fetchone()
            else:
                row = self._conn.execute("SELECT COUNT(*) FROM results WHERE device = %s", (device,)).fetchone()
        return int(row[0]) if row else 0

    def result_ids(self, device: str | None = None) -> set[str]:
        with self._lock, _reading(self._conn), self._conn.transaction():
            if device is None:
                rows = self._conn.execute("SELECT result_id FROM results").fetchall()
            else:
                rows = self._conn.execute("SELECT result_id FROM results WHERE device = %s", (device,)).fetchall()
        return {str(r[0]) for r in rows}

    def query_results(self, query: ResultQuery) -> list[StoredResult]:
        sql, params = result_sql(query, "%s")
        with self._lock, _reading(self._conn), self._conn.transaction():
            return stored_results(self._conn.execute(sql, params).fetchall())

    def query_events(self, query: EventQuery) -> list[EventRow]:
        sql, params = event_sql(query, "%s")
        with self._lock, _reading(self._conn), self._conn.transaction():
            return event_rows(self._conn.execute(sql, params).fetchall())

    def feedback_summary(self, since: float, until: float, device: str | None = None) -> list[dict[str, Any]]:
        sql = FEEDBACK_SQL.format(device=" AND device = %s" if device is not None else "")
        params: list[Any] = [since, until] + ([device] if device is not None else [])

        def inspected(dev: str, pipeline: str) -> int:
            row = self._conn.execute(INSPECTED_SQL, (dev, pipeline, since, until)).fetchone()
            return int(row[0]) if row else 0

        with self._lock, _reading(self._conn), self._conn.transaction():
            return feedback_lines(self._conn.execute(sql, params).fetchall(), inspected)

    def prune_events(self, *, older_than: float | None = None, keep: int | None = None, limit: int = 5000) -> int:
        with self._lock:
            try:
                with self._conn.transaction():
                    deleted = 0
                    if older_than is not None:
                        deleted += self._conn.execute(PRUNE_EVENTS_BY_AGE, (older_than, limit)).rowcount
                    if keep is not None and deleted < limit:
                        row = self._conn.execute("SELECT COUNT(*) FROM events").fetchone()
                        excess = (int(row[0]) if row else 0) - keep
                        if excess > 0:
                            deleted += self._conn.execute(PRUNE_EVENTS_OLDEST, (min(excess, limit - deleted),)).rowcount
            except Exception as exc:
                raise _pg_failure(exc, self._conn) from exc
        return deleted

    def save_alerts(self, alerts: Sequence[dict[str, Any]]) -> None:
        if not alerts:
            return
        with self._lock:
            conn = self._conn
            try:
                with conn.transaction(), conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO alerts VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (alert_id) DO UPDATE SET"
                        " state = excluded.state, updated_at = excluded.updated_at, payload = excluded.payload",
                        [alert_row(a) for a in alerts],
                    )
                    cur.execute(
                        "DELETE FROM alerts WHERE alert_id IN (SELECT alert_id FROM alerts ORDER BY started_at DESC"
                        " OFFSET %s)", (ALERTS_KEEP,),
                    )
            except Exception as exc:
                raise _pg_failure(exc, conn) from exc

    def alerts(self, *, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock, _reading(self._conn), self._conn.transaction():
            if state:
                rows = self._conn.execute(
                    "SELECT payload FROM alerts WHERE state = %s ORDER BY started_at DESC LIMIT %s", (state, limit)
                ).fetchall()
            else:
                rows = self._conn.execute("SELECT payload FROM alerts ORDER BY started_at DESC LIMIT %s",
                                          (limit,)).fetchall()
        return [orjson.loads(bytes(r[0])) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
