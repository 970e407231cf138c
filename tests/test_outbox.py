"""The durable outbox: ids, sequence, idempotency, recovery, caps, corruption."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from edge_agent.delivery.interface import OutboxInterface
from edge_agent.delivery.outbox import Outbox, OutboxLimits, make_result_id
from edge_agent.errors import StorageFullError


def add(ob: Outbox, input_id: str, body: dict[str, Any] | None = None, model_version: str = "1") -> Any:
    ob.accept_input(input_id, source="folder", pipeline="crop", spool_path=f"/spool/{input_id}", meta={"k": 1})
    return ob.add_result(input_id, pipeline="crop", model="leaf", model_version=model_version, body=body or {})


@pytest.fixture
def outbox(tmp_path: Path) -> Any:
    ob = Outbox(tmp_path / "outbox.db", "dev1")
    yield ob
    ob.close()


def test_result_ids_are_deterministic_and_seq_increases(outbox: Outbox) -> None:
    first = add(outbox, "a", {"x": 1})
    second = add(outbox, "b")
    assert first.result_id == make_result_id("dev1", "a", "leaf", "1")
    assert len(first.result_id) == 32
    assert (first.seq, second.seq) == (1, 2)
    assert make_result_id("dev2", "a", "leaf", "1") != first.result_id
    assert add(outbox, "a", model_version="2").seq == 3  # a new model version is a new result


def test_add_result_is_idempotent(outbox: Outbox) -> None:
    first = add(outbox, "a", {"x": 1})
    again = outbox.add_result("a", pipeline="crop", model="leaf", model_version="1", body={"x": 2})
    assert again.result_id == first.result_id and again.seq == first.seq and again.body == {"x": 1}
    assert outbox.stats().backlog == 1
    assert outbox.accept_input("a", source="folder", pipeline="crop", spool_path=None, meta={}) is False


def test_concurrent_writers_get_unique_gapless_sequence(outbox: Outbox) -> None:
    def work(k: int) -> None:
        for i in range(50):
            add(outbox, f"{k}-{i}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = outbox.unacked(limit=1000)
    assert [r.seq for r in rows] == list(range(1, 301))
    assert len({r.result_id for r in rows}) == 300


def test_everything_survives_a_reopen_and_pending_inputs_are_recovered(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", "dev1")
    add(ob, "done-1", {"v": 1})
    ob.accept_input("pending-1", source="folder", pipeline="crop", spool_path="/s/p1", meta={"name": "p1.jpg"})
    ob.accept_input("bad-1", source="folder", pipeline="crop", spool_path=None, meta={})
    ob.reject_input("bad-1", "image_invalid", "truncated")
    epoch = ob.epoch
    ob.close()
    ob = Outbox(tmp_path / "o.db", "dev1")
    try:
        assert ob.epoch == epoch
        assert [p.input_id for p in ob.pending_inputs()] == ["pending-1"]
        assert ob.pending_inputs()[0].meta == {"name": "p1.jpg"}
        assert ob.input_state("bad-1") == "rejected" and ob.stats().rejected_inputs == 1
        assert ob.get_result_by_input("done-1") is not None
        assert add(ob, "pending-1").seq == 2
        assert ob.pending_inputs() == []
    finally:
        ob.close()


def test_ack_through_deletes_only_up_to_the_ack(outbox: Outbox) -> None:
    for i in range(5):
        add(outbox, f"i{i}")
    assert outbox.ack_through(3) == 3
    assert outbox.ack_through(3) == 0
    assert [r.seq for r in outbox.unacked()] == [4, 5]
    assert outbox.first_unacked_seq() == 4
    assert outbox.stats().acked_total == 3 and outbox.stats().backlog == 2
    assert outbox.unacked(after_seq=4) == outbox.unacked()[1:]


def test_retention_keeps_acked_rows_until_pruned(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", "d", OutboxLimits(retention_s=3600))
    try:
        add(ob, "a")
        ob.ack_through(1)
        stored = ob.get_result_by_input("a")
        assert stored is not None and stored.acked
        assert ob.unacked() == [] and ob.prune()["pruned"] == 0
    finally:
        ob.close()


def test_byte_cap_reject_new_refuses_and_counts_then_recovers(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", "d", OutboxLimits(max_bytes=3000, min_free_bytes=0))
    try:
        accepted = 0
        with pytest.raises(StorageFullError):
            for i in range(100):
                add(ob, f"i{i}", {"pad": "x" * 500})
                accepted += 1
        assert 3 <= accepted < 10
        assert ob.stats().refused_full == 1
        ob.ack_through(ob.stats().next_seq - 1)  # the backlog drains...
        add(ob, "after")  # ...and new inputs are accepted again
    finally:
        ob.close()


def test_byte_cap_drop_oldest_drops_and_counts(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", "d", OutboxLimits(max_bytes=3000, full_policy="drop_oldest", min_free_bytes=0))
    try:
        for i in range(20):
            add(ob, f"i{i}", {"pad": "x" * 500})
        stats = ob.stats()
        assert stats.bytes <= 3000 and stats.dropped == 20 - stats.backlog and stats.dropped > 0
        assert ob.unacked()[-1].input_id == "i19"
        assert ob.first_unacked_seq() > 1  # 'base' tells the coordinator to skip the dropped seqs
    finally:
        ob.close()


def test_age_cap_expires_unsent_rows_and_counts(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", "d", OutboxLimits(max_age_s=0.0))
    try:
        add(ob, "old")
        assert ob.prune()["expired"] == 1
        assert ob.stats().expired == 1 and ob.stats().backlog == 0
    finally:
        ob.close()


def test_disk_full_refuses_new_inputs(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", "d", OutboxLimits(min_free_bytes=1 << 62))
    try:
        with pytest.raises(StorageFullError) as info:
            ob.accept_input("x", source="s", pipeline="p", spool_path=None, meta={})
        assert info.value.code == "storage_full"
        assert ob.input_state("x") is None
    finally:
        ob.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated_header"])
def test_corrupt_database_is_quarantined_recreated_and_alarmed(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "o.db"
    ob = Outbox(path, "d")
    add(ob, "a")
    old_epoch = ob.epoch
    ob.close()
    if damage == "garbage":
        path.write_bytes(b"this is not a database" * 500)
    else:
        with path.open("r+b") as f:
            f.write(b"\x00" * 100)
    ob = Outbox(path, "d")
    try:
        assert any(a.startswith("outbox_corrupt") for a in ob.stats().alarms)
        assert ob.epoch != old_epoch  # a new epoch: seq restarts without colliding with old acks
        assert list(tmp_path.glob("o.db.corrupt-*"))
        assert add(ob, "b").seq == 1  # keeps accepting
    finally:
        ob.close()


def test_commands_run_at_most_once_even_across_restarts(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", "d")
    assert ob.record_command("c1", "ping") is True
    assert ob.record_command("c1", "ping") is False
    ob.close()
    ob = Outbox(tmp_path / "o.db", "d")
    try:
        assert ob.record_command("c1", "ping") is False
    finally:
        ob.close()


def test_listeners_hear_about_new_results(outbox: Outbox) -> None:
    heard: list[str] = []
    outbox.add_listener(lambda: heard.append(threading.current_thread().name))
    add(outbox, "a")
    assert heard == ["outbox-writer"]  # from the writer right after the commit, before add_result returns


def test_a_failing_listener_neither_fails_the_write_nor_stops_the_writer(outbox: Outbox) -> None:
    def broken() -> None:
        raise RuntimeError("listener bug")

    outbox.add_listener(broken)
    assert add(outbox, "a").seq == 1
    assert add(outbox, "b").seq == 2


def test_ack_through_async_resolves_once_the_deletion_is_committed(outbox: Outbox) -> None:
    for i in range(4):
        add(outbox, f"i{i}")
    fut = outbox.ack_through_async(2)
    assert fut.result(timeout=10) == 2
    assert [r.seq for r in outbox.unacked()] == [3, 4]
    assert outbox.stats().acked_total == 2


def test_a_real_disk_full_error_is_storage_full_and_nothing_half_written(tmp_path: Path) -> None:
    """SQLite's max_page_count yields the genuine SQLITE_FULL path (no tmpfs or root needed)."""
    ob = Outbox(tmp_path / "o.db", "d", OutboxLimits(min_free_bytes=0))
    try:
        pages = ob._writer.execute("PRAGMA page_count").fetchone()[0]
        ob._write(lambda c: c.execute(f"PRAGMA max_page_count={pages + 2}").fetchone())
        stored = 0
        with pytest.raises(StorageFullError):
            for i in range(100):
                add(ob, f"i{i}", {"pad": "x" * 2000})
                stored += 1
        assert ob.input_state(f"i{stored}") == "pending"  # accepted, its result not written: recoverable
        assert ob.stats().backlog == stored
        ob._write(lambda c: c.execute("PRAGMA max_page_count=1073741823").fetchone())  # space is freed
        ob.add_result(f"i{stored}", pipeline="crop", model="leaf", model_version="1", body={})
        assert ob.stats().backlog == stored + 1 and ob.pending_inputs() == []
    finally:
        ob.close()


def test_the_sqlite_outbox_is_the_published_interface(tmp_path: Path) -> None:
    """mypy checks the structure (``Outbox`` against ``delivery.interface.OutboxInterface``); this checks it runs."""
    outbox = Outbox(tmp_path / "o.db", "dev1")
    box: OutboxInterface = outbox
    try:
        assert box.accept_input("i1", source="t", pipeline="p", spool_path=None, meta={}, idempotency_key="k" * 16)
        assert box.input_for_key("k" * 16) == "i1" and [p.input_id for p in box.pending_inputs()] == ["i1"]
        stored = box.add_result("i1", pipeline="p", model="m", model_version="1", body={"x": 1})
        assert box.get_result(stored.result_id) == box.get_result_by_input("i1") and box.input_state("i1") == "done"
    finally:
        outbox.close()
