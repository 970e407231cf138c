"""Coordinator storage behind a small interface; SQLite (default) here, PostgreSQL in ``store_pg``.

Results are keyed by ``result_id`` (unique): inserting a duplicate is a no-op. Per device and
epoch the store keeps a watermark: the highest seq such that every seq up to it is stored (or was
settled on the agent, which each result's ``base`` tells). That watermark is the cumulative ack.
The watermark is computed inside the same transaction as the inserts, so several coordinators
sharing one store (through an MQTT shared subscription) never acknowledge what is not committed.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from edge_agent.errors import StorageError


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
class BatchOutcome:
    inserted: int
    duplicates: int
    watermarks: dict[tuple[str, str], int]
    """(device, epoch) -> cumulative ack for every pair touched by the batch."""


class Store(Protocol):
    def commit_batch(self, results: Sequence[ResultRow], devices: Sequence[DeviceUpdate]) -> BatchOutcome:
        """Insert results (duplicates ignored) and device updates, advance watermarks, commit."""

    def devices(self) -> list[dict[str, Any]]: ...

    def count_results(self, device: str | None = None) -> int: ...

    def result_ids(self, device: str | None = None) -> set[str]: ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    result_id TEXT PRIMARY KEY, device TEXT NOT NULL, epoch TEXT NOT NULL, seq INTEGER NOT NULL,
    input_id TEXT NOT NULL, pipeline TEXT NOT NULL, model TEXT NOT NULL, model_version TEXT NOT NULL,
    created_at REAL NOT NULL, received_at REAL NOT NULL, payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS results_dev_seq ON results(device, epoch, seq);
CREATE TABLE IF NOT EXISTS watermarks (
    device TEXT NOT NULL, epoch TEXT NOT NULL, acked_seq INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (device, epoch));
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, state TEXT, state_ts REAL, last_heartbeat REAL, heartbeat BLOB,
    last_result REAL, results INTEGER NOT NULL DEFAULT 0);
"""


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


class SqliteStore:
    """Store in one SQLite file (WAL, synchronous=FULL); safe to share between processes on one host."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60.0)
            self._conn.execute("PRAGMA busy_timeout=60000")
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StorageError(f"coordinator store {self.path}: {exc}") from exc

    def commit_batch(self, results: Sequence[ResultRow], devices: Sequence[DeviceUpdate]) -> BatchOutcome:
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
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StorageError(f"coordinator store: {exc}") from exc
        return BatchOutcome(inserted, len(results) - inserted, marks)

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
        with self._lock:
            rows = self._conn.execute(
                "SELECT device, state, state_ts, last_heartbeat, heartbeat, last_result, results FROM devices"
                " ORDER BY device"
            ).fetchall()
        out = []
        for device, state, state_ts, last_hb, hb, last_result, count in rows:
            heartbeat = orjson.loads(hb) if hb else {}
            out.append(
                {
                    "device": device,
                    "state": state or "unknown",
                    "state_ts": state_ts,
                    "last_heartbeat": last_hb,
                    "last_result": last_result,
                    "results": count,
                    "backlog": heartbeat.get("outbox", {}).get("backlog"),
                    "agent_state": heartbeat.get("state"),
                    "heartbeat": heartbeat,
                }
            )
        return out

    def count_results(self, device: str | None = None) -> int:
        with self._lock:
            if device is None:
                return int(self._conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
            return int(self._conn.execute("SELECT COUNT(*) FROM results WHERE device = ?", (device,)).fetchone()[0])

    def result_ids(self, device: str | None = None) -> set[str]:
        with self._lock:
            if device is None:
                return {r for (r,) in self._conn.execute("SELECT result_id FROM results")}
            return {r for (r,) in self._conn.execute("SELECT result_id FROM results WHERE device = ?", (device,))}

    def close(self) -> None:
        with self._lock:
            self._conn.close()
