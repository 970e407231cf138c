"""Coordinator retention (``store.retention``): results are bounded by age and count, on SQLite and PostgreSQL;
only acknowledged results (at or below their device's watermark) are ever deleted."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.coordinator.config import RetentionConfig, parse_coordinator_config
from edge_agent.coordinator.retention import Retention
from edge_agent.coordinator.store import ResultRow, SqliteStore, Store
from edge_agent.errors import ConfigError

T0 = 1_795_440_000.0


def row(seq: int, received_at: float, device: str = "d1") -> ResultRow:
    return ResultRow(
        result_id=f"{device}-{seq}", device=device, epoch="e1", seq=seq, base=1, input_id=f"i{seq}", pipeline="p",
        model="m", model_version="1", created_at=received_at, received_at=received_at, payload=b"{}",
    )


def seqs(store: Store, device: str = "d1") -> list[int]:
    return sorted(int(r.split("-")[1]) for r in store.result_ids(device))


def test_prune_by_age_and_count_keeps_what_is_not_acknowledged(store: Store) -> None:
    # d1: seqs 1..10 received one minute apart, then 12 (11 missing: the watermark stops at 10)
    store.commit_batch([row(s, T0 + 60 * s) for s in range(1, 11)] + [row(12, T0)], [])
    store.commit_batch([row(s, T0 + 60 * s, device="d2") for s in range(1, 4)], [])
    # by age: everything received before T0 + 300 s and acknowledged (d1 1..4, d2 1..3), never d1's 12 (unacked)
    assert store.prune(older_than=T0 + 300) == 7
    assert seqs(store) == [5, 6, 7, 8, 9, 10, 12] and seqs(store, "d2") == []
    # by count: keep 4 -> the oldest acknowledged go; 12 stays although it is the oldest of all
    assert store.prune(keep=4, limit=2) == 2  # at most `limit` per call
    assert store.prune(keep=4) == 1
    assert seqs(store) == [8, 9, 10, 12]
    assert store.prune(keep=1) == 3 and seqs(store) == [12]  # only the unacknowledged one is left
    assert store.prune(older_than=T0 + 10**6, keep=0 + 1) == 0
    # the watermark is unaffected: filling the gap acknowledges up to 12, after which 12 may go too
    outcome = store.commit_batch([row(11, T0 + 700)], [])
    assert outcome.watermarks[("d1", "e1")] == 12
    assert store.prune(older_than=T0 + 10**6) == 2 and store.count_results() == 0


def test_retention_keeps_a_growing_store_bounded(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    retention = Retention(store, RetentionConfig(max_results=250, batch=40))
    try:
        for batch in range(10):  # 1,000 results arrive; after each pass the store holds at most 250
            store.commit_batch([row(100 * batch + s, T0 + 100 * batch + s) for s in range(1, 101)], [])
            retention.run_once(now=T0)
            assert store.count_results() == min(250, 100 * (batch + 1))
        assert retention.deleted == 750
        assert seqs(store) == list(range(751, 1001))  # the newest
        aged = Retention(store, RetentionConfig(max_age_days=1.0))
        assert aged.run_once(now=T0 + 900 + 86_400) == 149  # seqs 751..899: received before T0 + 900
        assert min(seqs(store)) == 900
        assert Retention(store, RetentionConfig()).run_once() == 0  # no bound configured: nothing goes
    finally:
        store.close()


def test_retention_config_keys() -> None:
    cfg = parse_coordinator_config({"store": {"type": "postgres", "dsn": "host=x", "retention": {
        "max_age_days": 90, "max_results": 10_000_000, "interval_s": 600}}}, "c.yaml")
    assert cfg.store.retention == RetentionConfig(max_age_days=90, max_results=10_000_000, interval_s=600)
    assert parse_coordinator_config({}, "c.yaml").store.retention == RetentionConfig()
    with pytest.raises(ConfigError, match=r"store\.sqlite\.retention\.max_results"):
        parse_coordinator_config({"store": {"type": "sqlite", "retention": {"max_results": 0}}}, "c.yaml")
