"""When the outbox's files are damaged: notice it, set the files aside, salvage what SQLite can still read.

SQLite on its own is silent about two kinds of damage that lose committed results:

* a **damaged write-ahead log**: SQLite stops reading the WAL at the first frame whose checksum fails,
  so every transaction committed after it is dropped without an error. :func:`check_wal` reads the
  WAL itself (format: https://www.sqlite.org/fileformat.html#the_write_ahead_log) and reports a frame
  that fails its checksum while a later, intact frame commits a transaction; a torn frame at the very
  end (a crash in the middle of an uncommitted write) is normal and not reported.
  :func:`write_repaired_wal` keeps only the frames that verify on their own, chained again, so that
  SQLite applies the committed transactions after the damage too (a dropped frame leaves the older
  version of its one page, which the salvage reads around).
* an **empty or missing database** (a 0-byte file after a power cut, a deleted file): SQLite just
  creates a new one. The outbox keeps ``<db>.epoch`` beside the database to tell that apart from a
  first start (see ``outbox.py``).

:func:`salvage` reads every table of a set-aside database row by row, stepping over pages that raise,
and returns the rows; :func:`insert_salvage` puts them into the fresh database with the alarm.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

_WAL_MAGIC = (0x377F0682, 0x377F0683)  # little-endian / big-endian checksums
_WAL_HEADER = 32
_FRAME_HEADER = 24
_MASK = 0xFFFFFFFF


def _checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum over ``data`` (a multiple of 8 bytes), continuing from ``(s0, s1)``."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & _MASK
        s1 = (s1 + words[i + 1] + s0) & _MASK
    return s0, s1


@dataclass(frozen=True)
class WalReport:
    """What :func:`check_wal` found. ``damaged``: committed transactions SQLite would silently drop."""

    frames: int = 0
    in_use: int = 0  # frames of the log's current generation, up to its last intact one
    bad_frames: int = 0
    lost_commits: int = 0
    header_ok: bool = True
    first_bad: int | None = None

    @property
    def damaged(self) -> bool:
        return self.lost_commits > 0 or (not self.header_ok and self.frames > 0)

    def describe(self) -> str:
        if not self.header_ok:
            return f"write-ahead log header damaged: SQLite would ignore all {self.frames} frames"
        return (
            f"write-ahead log damaged at frame {self.first_bad}: {self.bad_frames} bad frame(s), "
            f"{self.lost_commits} committed transaction(s) after it would be silently dropped"
        )


@dataclass(frozen=True)
class _Frame:
    offset: int
    commit: bool
    ok: bool  # current salts and its own checksum verifies (seeded by the previous frame's stored checksum)


def _parse_wal(data: bytes) -> tuple[bool, int, bytes, list[_Frame]] | None:
    """(header_ok, page_size, salts, frames) or None when this is not a WAL at all."""
    if len(data) < _WAL_HEADER:
        return None
    magic, _version, page_size, _ckpt, _salt1, _salt2, c1, c2 = struct.unpack(">8I", data[:_WAL_HEADER])
    big = magic == _WAL_MAGIC[1]
    valid_size = page_size >= 512 and page_size <= 65536 and page_size & (page_size - 1) == 0
    header_ok = magic in _WAL_MAGIC and valid_size and _checksum(data[:24], 0, 0, big) == (c1, c2)
    if not valid_size:
        return (False, 0, b"", []) if magic in _WAL_MAGIC else None
    salts = data[16:24]
    if not header_ok and len(data) >= _WAL_HEADER + _FRAME_HEADER:
        salts = data[_WAL_HEADER + 8 : _WAL_HEADER + 16]  # the first frame's copy of the salts
    frames: list[_Frame] = []
    seed = (c1, c2)
    size = _FRAME_HEADER + page_size
    offset = _WAL_HEADER
    while offset + size <= len(data):
        head = data[offset : offset + _FRAME_HEADER]
        _page, db_size, f1, f2 = struct.unpack(">II8xII", head)
        mine = head[8:16] == salts
        ok = mine and _checksum(head[:8] + data[offset + _FRAME_HEADER : offset + size], *seed, big) == (f1, f2)
        frames.append(_Frame(offset, db_size != 0, ok))
        seed = (f1, f2)
        offset += size
    return header_ok, page_size, salts, frames


def check_wal(path: Path) -> WalReport:
    """Read ``path`` (a ``-wal`` file) and report committed transactions SQLite would drop (no writes)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return WalReport()
    parsed = _parse_wal(data)
    if parsed is None:
        return WalReport()
    header_ok, _page_size, _salts, frames = parsed
    first_bad = next((i for i, f in enumerate(frames) if not f.ok), None)
    if first_bad is None:
        return WalReport(frames=len(frames), in_use=len(frames), header_ok=header_ok)
    later = frames[first_bad + 1 :]
    lost = sum(1 for f in later if f.ok and f.commit)
    last_ok = max((i for i, f in enumerate(frames) if f.ok), default=-1)
    bad = sum(1 for f in frames[: last_ok + 1] if not f.ok)  # not counting a torn or stale tail
    return WalReport(frames=len(frames), in_use=last_ok + 1, bad_frames=bad, lost_commits=lost,
                     header_ok=header_ok, first_bad=first_bad)


def write_repaired_wal(src: Path, dst: Path) -> int:
    """Write to ``dst`` a WAL of the frames of ``src`` that verify on their own, re-chained (header rebuilt).

    Returns the number of frames kept. Raises OSError (e.g. ENOSPC) with ``dst`` removed."""
    data = src.read_bytes()
    parsed = _parse_wal(data)
    if parsed is None or parsed[1] == 0:
        raise OSError(f"{src} is not a write-ahead log")
    _header_ok, page_size, salts, frames = parsed
    big = struct.unpack(">I", data[:4])[0] == _WAL_MAGIC[1]
    magic = _WAL_MAGIC[1] if big else _WAL_MAGIC[0]
    header = struct.pack(">4I", magic, 3007000, page_size, struct.unpack(">I", data[12:16])[0]) + salts
    seed = _checksum(header, 0, 0, big)
    out = [header + struct.pack(">2I", *seed)]
    kept = 0
    for frame in frames:
        if not frame.ok:
            continue
        head = data[frame.offset : frame.offset + 8]
        page = data[frame.offset + _FRAME_HEADER : frame.offset + _FRAME_HEADER + page_size]
        seed = _checksum(head + page, *seed, big)
        out.append(head + salts + struct.pack(">2I", *seed) + page)
        kept += 1
    try:
        with dst.open("wb") as f:
            for chunk in out:
                f.write(chunk)
    except OSError:
        dst.unlink(missing_ok=True)
        raise
    return kept


def read_epoch_marker(db: Path) -> str | None:
    """The epoch last in use for ``db`` (``<db>.epoch``), or None on a first start."""
    try:
        value = orjson.loads(db.with_name(f"{db.name}.epoch").read_bytes()).get("epoch")
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return None
    return str(value) if value else None


def write_epoch_marker(db: Path, epoch: str, device_id: str) -> None:
    """Record ``epoch`` as the one in use for ``db`` (atomically; a failure is logged: only detection suffers)."""
    if read_epoch_marker(db) == epoch:
        return
    marker = db.with_name(f"{db.name}.epoch")
    tmp = marker.with_name(f".{marker.name}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(orjson.dumps({"epoch": epoch, "device_id": device_id, "created_at": time.time()}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, marker)
    except OSError as exc:  # without it a later empty database is not recognised as a loss: say so
        tmp.unlink(missing_ok=True)
        log.warning("outbox: cannot write %s: %s", marker, exc.strerror)


def damage_before_open(db: Path, marker: str | None) -> tuple[str | None, bool]:
    """Damage SQLite would not report, as (reason, the log is damaged): an empty or missing database where
    ``marker`` says one was in use, a write-ahead log with committed transactions SQLite would drop."""
    wal = Path(f"{db}-wal")
    exists = db.exists()
    if marker is not None and (not exists or db.stat().st_size == 0):
        state = "is missing" if not exists else "is empty (0 bytes)"
        return f"{state} although epoch {marker} was in use: its unsent results are lost", wal.exists()
    if exists and wal.exists() and wal.stat().st_size > _WAL_HEADER:
        report = check_wal(wal)
        if report.damaged:
            return f"has a damaged {report.describe()}", True
    return None, False


def quarantine(db: Path, reason: str = "", epoch: str | None = None, *, repair_wal: bool = False) -> Path:
    """Move ``db`` and its ``-wal``/``-shm`` aside to ``<db>.corrupt-<time>`` (same suffixes), with ``.reason``
    beside them (read by :func:`salvage_quarantines`); ``repair_wal``: also write a repaired log. Returns it."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = db.with_name(f"{db.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = db.with_name(f"{db.name}.corrupt-{stamp}-{n}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{db}{suffix}")
        if src.exists():
            src.replace(Path(f"{target}{suffix}"))
    if not target.exists():
        target.touch()  # the database itself was missing: keep a marker so the quarantine can be found
    with contextlib.suppress(OSError):
        Path(f"{target}.reason").write_bytes(orjson.dumps({"reason": reason, "epoch": epoch}))
    if repair_wal:
        repair_quarantined_wal(target)
    return target


def repair_quarantined_wal(target: Path) -> int | None:
    """Swap a quarantined database's damaged WAL for a repaired one (the original kept as ``-wal.damaged``).

    Returns frames kept, or None when there is no WAL or no room to write the repaired one."""
    wal = Path(f"{target}-wal")
    if not wal.exists():
        return None
    damaged = Path(f"{target}-wal.damaged")
    wal.replace(damaged)
    Path(f"{target}-shm").unlink(missing_ok=True)
    try:
        return write_repaired_wal(damaged, wal)
    except OSError as exc:
        log.error("outbox salvage: cannot write a repaired WAL (%s); reading what SQLite keeps", exc)
        damaged.replace(wal)  # SQLite then reads the log up to the damage
        return None


@dataclass
class Salvage:
    """Rows read back from a set-aside database; ``unreadable``: reads that failed (pages stepped over)."""

    epoch: str | None = None
    device_id: str | None = None
    results: list[tuple[Any, ...]] = field(default_factory=list)
    inputs: list[tuple[Any, ...]] = field(default_factory=list)
    commands: list[tuple[Any, ...]] = field(default_factory=list)
    input_keys: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    alarms: list[tuple[Any, ...]] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    unreadable: int = 0
    error: str | None = None


_TABLES: dict[str, str] = {
    "results": "result_id, seq, input_id, pipeline, model, model_version, created_at, body, size, acked_at",
    "inputs": "input_id, source, pipeline, spool_path, meta, state, code, message, accepted_at, finished_at",
    "commands": "command_id, name, ran_at",
    "input_keys": "key, input_id",
    "events": "event, severity, data, created_at",
    "alarms": "name, message, data, raised_at",
}


def _read_table(conn: sqlite3.Connection, table: str, columns: str) -> tuple[list[tuple[Any, ...]], int]:
    """Every readable row of ``table`` in rowid order. After a read raises, rows are read one at a time; a
    row that still raises is stepped over (to the next rowid that reads again) and counted."""
    rows: list[tuple[Any, ...]] = []
    errors = 0
    last = -(1 << 62)
    careful = 0  # rows left to read one at a time after a failure
    query = f"SELECT rowid, {columns} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?"  # noqa: S608
    while errors <= 10_000:
        try:
            batch = conn.execute(query, (last, 1 if careful else 256)).fetchall()
        except sqlite3.DatabaseError:
            if not careful:
                careful = 256
                continue
            errors += 1
            step = 1
            while last + step < (1 << 62):  # step over the damaged range: the next rowid that reads again
                try:
                    conn.execute(query, (last + step, 1)).fetchall()
                    break
                except sqlite3.DatabaseError:
                    step *= 4
            last += step
            if last >= (1 << 62):
                break
            continue
        if not batch:
            break
        careful = max(0, careful - len(batch))
        for row in batch:
            last = int(row[0])
            rows.append(tuple(row[1:]))
    return rows, errors


def salvage(db: Path) -> Salvage:
    """Read whatever SQLite can still read from the set-aside database ``db`` (opened read-only)."""
    out = Salvage()
    if not db.exists() or (db.stat().st_size == 0 and not Path(f"{db}-wal").exists()):
        out.error = "nothing to read (empty or missing file)"
        return out
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        out.error = str(exc)
        return out
    try:
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            out.error = str(exc)
            return out
        with contextlib.suppress(sqlite3.DatabaseError):
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
            out.epoch = meta.get("epoch")
            out.device_id = meta.get("device_id")
        with contextlib.suppress(sqlite3.DatabaseError):
            if "counters" in tables:
                out.counters = {str(k): int(v) for k, v in conn.execute("SELECT name, value FROM counters")}
        for table, columns in _TABLES.items():
            if table not in tables:
                continue
            try:
                rows, errors = _read_table(conn, table, columns)
            except sqlite3.Error as exc:  # e.g. a column missing in an older schema
                log.warning("outbox salvage: table %s unreadable: %s", table, exc)
                out.unreadable += 1
                continue
            setattr(out, table, rows)
            out.unreadable += errors
    finally:
        conn.close()
    return out


def _bump(conn: sqlite3.Connection, name: str, delta: int) -> None:
    conn.execute("UPDATE counters SET value = value + ? WHERE name = ?", (delta, name))


def store_alarm(conn: sqlite3.Connection, name: str, message: str, data: dict[str, Any]) -> None:
    """Store an alarm (``alarms``: heartbeats, metrics) and its event (``events``: sent until the broker has it)."""
    now = time.time()
    blob = orjson.dumps(data)
    conn.execute("INSERT INTO alarms (name, message, data, raised_at) VALUES (?, ?, ?, ?)", (name, message, blob, now))
    conn.execute("INSERT INTO events (event, severity, data, created_at) VALUES (?, 'alarm', ?, ?)", (name, blob, now))


def insert_salvage(
    conn: sqlite3.Connection, found: Salvage, *, what: str, target: Path,
    valid_result: Callable[[tuple[Any, ...]], bool], row_overhead: int,
) -> dict[str, Any]:
    """Put ``found`` into the fresh outbox ``conn`` in one transaction with its ``outbox_corrupt`` alarm: inputs
    with their state (pending ones are re-run by the recovery), unacknowledged results that ``valid_result``
    accepts re-numbered in the new epoch (same result ids: the coordinator de-duplicates), commands (replay
    protection), upload Idempotency-Keys, undelivered events, earlier alarms and the totals. ``what`` says what
    happened, for the alarm."""
    counts = {"results": 0, "inputs": 0, "pending_inputs": 0, "commands": 0, "events": 0, "invalid": 0,
              "unreadable": found.unreadable}
    conn.execute("BEGIN IMMEDIATE")
    try:
        for row in found.inputs:
            if len(row) != 10 or not isinstance(row[0], str) or row[5] not in ("pending", "done", "rejected"):
                counts["invalid"] += 1
            elif conn.execute("INSERT OR IGNORE INTO inputs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row).rowcount:
                counts["inputs"] += 1
        for row in sorted(found.results, key=lambda r: r[1] if isinstance(r[1], int) else 0):
            if row[9] is not None:
                continue  # acknowledged already
            if not valid_result(row):
                counts["invalid"] += 1
                continue
            if conn.execute("SELECT 1 FROM results WHERE result_id = ?", (row[0],)).fetchone():
                continue
            seq = int(conn.execute("SELECT value FROM counters WHERE name = 'next_seq'").fetchone()[0])
            size = len(row[7]) + row_overhead
            conn.execute(
                "INSERT INTO results (seq, result_id, input_id, pipeline, model, model_version, created_at, body, size)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (seq, row[0], *row[2:8], size),
            )
            conn.execute("UPDATE inputs SET state='done', finished_at=? WHERE input_id=?", (time.time(), row[2]))
            _bump(conn, "next_seq", 1)
            _bump(conn, "unacked_rows", 1)
            _bump(conn, "unacked_bytes", size)
            counts["results"] += 1
        counts["pending_inputs"] = conn.execute("SELECT COUNT(*) FROM inputs WHERE state='pending'").fetchone()[0]
        for row in found.commands:
            counts["commands"] += conn.execute("INSERT OR IGNORE INTO commands VALUES (?, ?, ?)", row).rowcount
        for row in found.input_keys:  # Idempotency-Keys: a retried upload still finds its first one
            conn.execute("INSERT OR IGNORE INTO input_keys VALUES (?, ?)", row)
        for row in found.events:
            conn.execute("INSERT INTO events (event, severity, data, created_at) VALUES (?, ?, ?, ?)", row)
            counts["events"] += 1
        for row in found.alarms:
            conn.execute("INSERT INTO alarms (name, message, data, raised_at) VALUES (?, ?, ?, ?)", row)
        for name in ("dropped", "expired", "rejected_inputs", "acked_total"):
            if isinstance(found.counters.get(name), int):
                _bump(conn, name, found.counters[name])
        epoch = conn.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0]
        message = (
            f"{what}; set aside as {target.name}; salvaged {counts['results']} unsent results and "
            f"{counts['inputs']} inputs ({counts['pending_inputs']} pending, re-run), {counts['unreadable']} "
            f"unreadable ranges, {counts['invalid']} invalid rows; new epoch {epoch}"
        )
        data = {"quarantined": target.name, "old_epoch": found.epoch, "epoch": epoch, "salvaged": counts,
                "message": message}
        store_alarm(conn, "outbox_corrupt", message, data)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    log.error("%s", message)
    return {**counts, "quarantined": target.name}


def salvage_quarantines(
    conn: sqlite3.Connection, db: Path, valid_result: Callable[[tuple[Any, ...]], bool], row_overhead: int
) -> list[dict[str, Any]]:
    """Salvage every database set aside beside ``db`` and not salvaged yet into ``conn``, each with its alarm
    (``<quarantine>.salvaged`` records it: a crash part way salvages again, at the next start). Raises
    sqlite3.Error when the fresh database cannot take the rows (a full disk: the next start tries again)."""
    done_now: list[dict[str, Any]] = []
    for target in sorted(db.parent.glob(f"{db.name}.corrupt-*")):
        if target.name.endswith(("-wal", "-shm", ".reason", ".salvaged", ".damaged")) or not target.is_file():
            continue
        done = Path(f"{target}.salvaged")
        if done.exists():
            continue
        try:
            info = orjson.loads(Path(f"{target}.reason").read_bytes())
        except (OSError, orjson.JSONDecodeError):
            info = {"reason": "was found set aside", "epoch": None}
        reason = str(info.get("reason") or "was found set aside")
        counts = insert_salvage(conn, salvage(target), what=f"outbox database {db} {reason}", target=target,
                                valid_result=valid_result, row_overhead=row_overhead)
        with contextlib.suppress(OSError):
            done.write_bytes(orjson.dumps(counts))
        done_now.append({**counts, "reason": reason})
    return done_now
