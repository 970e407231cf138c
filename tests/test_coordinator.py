"""The coordinator: exactly-once storage, cumulative acks, device tracking, config, shared subscriptions."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from edge_agent.coordinator.config import load_coordinator_config
from edge_agent.coordinator.service import Coordinator
from edge_agent.coordinator.store import (
    DEAD_LETTER_PAYLOAD_BYTES,
    BatchOutcome,
    DeadLetter,
    DeviceUpdate,
    ResultRow,
    SqliteStore,
    Store,
    next_watermark,
)
from edge_agent.coordinator.store_pg import PostgresStore
from edge_agent.errors import ConfigError, StoreRejectedError
from edge_agent.protocol import codec
from edge_agent.transport import FakeBroker, FakeTransport, InboundMessage
from tests.support.broker import Broker
from tests.support.delivery import start_agent, start_coordinator, wait_until
from tests.support.postgres import Postgres


@pytest.mark.parametrize(
    ("current", "base", "seqs", "expected"),
    [
        (0, 1, [1, 2, 3], 3),
        (0, 1, [2, 3], 0),  # 1 missing: nothing acked
        (0, 2, [2, 3], 3),  # the agent says seq 1 was settled (dropped by policy)
        (5, 1, [6, 8], 6),
        (5, 1, [], 5),
        (0, 10, [], 9),
        (7, 3, [8], 8),  # base never moves the watermark back
    ],
)
def test_watermark_is_the_contiguous_prefix(current: int, base: int, seqs: list[int], expected: int) -> None:
    assert next_watermark(current, base, seqs) == expected


def row(seq: int, device: str = "d1", epoch: str = "e1", base: int = 1) -> ResultRow:
    return ResultRow(
        result_id=f"{device}-{epoch}-{seq}", device=device, epoch=epoch, seq=seq, base=base, input_id=f"i{seq}",
        pipeline="p", model="m", model_version="1", created_at=1.0, received_at=2.0, payload=b"{}",
    )


def test_store_ignores_duplicates_and_acks_only_contiguous_prefixes(store: Store) -> None:
    out = store.commit_batch([row(1), row(2), row(4)], [])
    assert (out.inserted, out.duplicates, out.watermarks) == (3, 0, {("d1", "e1"): 2})
    out = store.commit_batch([row(2), row(3)], [])
    assert (out.inserted, out.duplicates, out.watermarks) == (1, 1, {("d1", "e1"): 4})
    out = store.commit_batch([row(1, epoch="e2"), row(9, device="d2", base=9)], [])
    assert out.watermarks == {("d1", "e2"): 1, ("d2", "e1"): 9}
    assert store.count_results() == 6 and store.count_results("d1") == 5
    assert store.result_ids("d2") == {"d2-e1-9"}


def test_two_stores_on_one_database_ack_only_what_is_committed(tmp_path: Path, postgres: Postgres) -> None:
    dsn = postgres.new_database()
    for a, b in ((SqliteStore(tmp_path / "s.db"), SqliteStore(tmp_path / "s.db")),
                 (PostgresStore(dsn), PostgresStore(dsn))):
        assert a.commit_batch([row(2)], []).watermarks == {("d1", "e1"): 0}
        assert b.commit_batch([row(1)], []).watermarks == {("d1", "e1"): 2}  # sees a's committed seq 2
        assert a.commit_batch([row(1)], []).duplicates == 1
        a.close()
        b.close()


def test_store_tracks_devices(store: Store) -> None:
    store.commit_batch([row(1)], [DeviceUpdate("d1", 10.0, state="online")])
    store.commit_batch([], [DeviceUpdate("d1", 5.0, state="offline")])  # older news is ignored
    store.commit_batch([], [DeviceUpdate("d1", 11.0, heartbeat={"state": "degraded", "outbox": {"backlog": 7}})])
    (device,) = store.devices()
    assert device["state"] == "online" and device["backlog"] == 7 and device["agent_state"] == "degraded"
    assert device["results"] == 1 and device["last_heartbeat"] == 11.0


def result_bytes(seq: int, device: str = "d1", over: dict[str, object] | None = None) -> bytes:
    payload = codec.result_payload(
        device=device, epoch="e1", base=1, result_id=f"{seq:032x}", seq=seq, input_id=f"i{seq}", pipeline="p",
        model="m", model_version="1", created_at=1.0, sent_at=2.0, body={},
    )
    payload.update(over or {})
    return codec.dumps(payload)


def test_coordinator_acks_after_commit_and_survives_garbage(tmp_path: Path) -> None:
    broker = FakeBroker()
    transport = FakeTransport(broker)
    coordinator = Coordinator(SqliteStore(tmp_path / "c.db"), transport, max_payload_bytes=4096)
    coordinator.start()
    try:
        topic = codec.results_topic("d1", "p")
        for data in (result_bytes(1), result_bytes(1), b"not json", b"\xff\xfe", result_bytes(2, device="other"),
                     result_bytes(3, over={"seq": "3"}), b"{" + b" " * 10000 + b"}", result_bytes(2)):
            broker.route(topic, data, False)
        online = codec.dumps(codec.status_payload(device="d1", state="online", ts=3.0))
        broker.route(codec.status_topic("d1"), online, True)
        broker.route(codec.status_topic("d1"), b"", True)  # a cleared retained status is ignored
        # 10 from the device + the coordinator's own retained status, which it ignores
        wait_until(lambda: coordinator.counters["received"] == 11, 5, "all processed")
        assert coordinator.store.count_results() == 2
        assert coordinator.counters["invalid"] == 5 and coordinator.counters["duplicates"] >= 1
        acks = [json.loads(p) for t, p in broker.published if t == codec.ack_topic("d1")]
        assert (acks[-1]["epoch"], acks[-1]["seq"]) == ("e1", 2)
        assert codec.ack_topic("d1") not in broker.retained  # acks are never retained (agents refuse those)
        assert len(transport.acked) == 11  # every message acknowledged to the broker, after the commit
        assert coordinator.store.devices()[0]["state"] == "online"
        reasons = sorted(d["reason"] for d in coordinator.store.dead_letters())
        assert reasons == ["device_mismatch", "field_invalid", "not_json", "not_json", "too_large"]
        assert coordinator.counters["dead_letters"] == 5
    finally:
        coordinator.stop(2)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("mqtt: {port: 70000}\n", "mqtt.port"),
        ("mqtt: {hots: x}\n", "mqtt.hots"),
        ("store: {type: sqlite, path: x, extra: 1}\n", "store.sqlite.extra"),
        ("store: {type: oracle}\n", "store"),
        ("batch_max: lots\n", "batch_max"),
        ("mqtt: !!python/object:os.system {}\n", "YAML"),
        ("mqtt: [unclosed\n", "YAML"),
        ("device_keys: {'a/b': k.pub}\n", "device_keys"),
        ("ack_ttl_s: 0\n", "ack_ttl_s"),
        ("mqtt: {port: 1883}\nbatch_max: 10\nmqtt: {port: 1884}\n", "mqtt: duplicate key (lines 1 and 3)"),
    ],
)
def test_bad_config_fails_fast_naming_file_and_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "coordinator.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_coordinator_config(path)
    assert str(path) in info.value.message and fragment in info.value.message
    assert "\n" not in info.value.message


def test_password_comes_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "a.yaml").write_text(f"mqtt: {{password_file: {tmp_path / 'pw'}}}\n")
    assert load_coordinator_config(tmp_path / "a.yaml").password() == "s3cret"
    (tmp_path / "b.yaml").write_text("mqtt: {password_env: EDGE_TEST_PW}\n")
    config = load_coordinator_config(tmp_path / "b.yaml")
    with pytest.raises(ConfigError):
        config.password()
    monkeypatch.setenv("EDGE_TEST_PW", "x")
    assert config.password() == "x"
    assert "s3cret" not in repr(load_coordinator_config(tmp_path / "a.yaml"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_two_coordinators_share_the_load_without_loss_or_double_storage(
    tmp_path: Path, broker: Broker, backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        c1 = start_coordinator(tmp_path / "shared.db", broker.port, "coord-a", share_group="coordinators")
        c2 = start_coordinator(tmp_path / "shared.db", broker.port, "coord-b", share_group="coordinators")
    else:
        dsn = request.getfixturevalue("postgres").new_database()
        c1 = start_coordinator(dsn, broker.port, "coord-a", share_group="coordinators")
        c2 = start_coordinator(dsn, broker.port, "coord-b", share_group="coordinators")
    agents = [start_agent(tmp_path / d, broker.port, d) for d in ("dev-a", "dev-b")]
    try:
        wait_until(lambda: c1.connected.is_set() and c2.connected.is_set(), 10, "coordinators connected")
        accepted = {a.device: a.feed([f"{a.device}-{i}" for i in range(600)]) for a in agents}
        wait_until(lambda: all(a.outbox.stats().backlog == 0 for a in agents), 60, "both outboxes drained")
        assert c1.store.count_results() == sum(len(v) for v in accepted.values()) == 1200
        for agent in agents:
            assert c1.store.count_results(agent.device) == 600
        assert c1.counters["inserted"] > 0 and c2.counters["inserted"] > 0  # both did part of the work
        assert c1.counters["inserted"] + c2.counters["inserted"] == 1200  # and nothing was stored twice
    finally:
        for agent in agents:
            agent.stop()
        c1.stop()
        c2.stop()


def test_cli_runs_stores_and_stops_on_sigterm(tmp_path: Path, broker: Broker) -> None:
    config = tmp_path / "coordinator.yaml"
    config.write_text(
        f"mqtt: {{port: {broker.port}, client_id: cli-coord}}\nstore: {{type: sqlite, path: {tmp_path / 'c.db'}}}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", "from edge_agent.coordinator.cli import main; main()", "run", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    agent = start_agent(tmp_path / "agent", broker.port, "dev-cli")
    try:
        agent.feed([f"x{i}" for i in range(50)])
        wait_until(lambda: agent.outbox.stats().backlog == 0, 30, "acked by the CLI coordinator")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        store = SqliteStore(tmp_path / "c.db")
        assert store.count_results("dev-cli") == 50
        store.close()
    finally:
        agent.stop()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_cli_refuses_a_bad_config_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("mqtt: {port: 70000}\n")
    proc = subprocess.run(
        [sys.executable, "-c", "from edge_agent.coordinator.cli import main; main()", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2
    assert f"{config}: mqtt.port" in proc.stderr


def test_bad_key_files_are_refused_naming_the_key(tmp_path: Path) -> None:
    from edge_agent.coordinator.cli import build_auth

    (tmp_path / "junk.pem").write_text("not a key")
    for text, key in ((f"ack_key: {tmp_path / 'junk.pem'}\n", "ack_key"),
                      (f"ack_key: {tmp_path / 'none.key'}\n", "ack_key"),
                      (f"device_keys: {{farm-01: {tmp_path / 'junk.pem'}}}\n", "device_keys.farm-01")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            build_auth(load_coordinator_config(path))
        assert info.value.message.startswith(f"{key}: "), info.value.message


# ---------------------------------------------------------------- issue 13: nothing can jam the store or the worker
def deep_list(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_any_exception_in_a_batch_rolls_it_back_and_the_next_batch_commits(store: Store) -> None:
    with pytest.raises(StoreRejectedError):
        store.commit_batch([row(1), row(2**63)], [])  # not an int64: raised while binding, mid-transaction
    assert store.count_results() == 0
    assert store.commit_batch([row(1)], []).watermarks == {("d1", "e1"): 1}  # no transaction left open
    with pytest.raises(StoreRejectedError):  # orjson cannot encode it: raised inside the transaction too
        store.commit_batch([row(2)], [DeviceUpdate("d1", 1.0, heartbeat={"deep": deep_list(300)})])
    assert store.count_results() == 1
    assert store.commit_batch([row(2)], []).inserted == 1


def test_dead_letters_are_kept_cut_and_bounded(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_agent.coordinator.store as sqlite_module
    import edge_agent.coordinator.store_pg as pg_module

    monkeypatch.setattr(sqlite_module, "DEAD_LETTER_KEEP", 3)
    monkeypatch.setattr(pg_module, "DEAD_LETTER_KEEP", 3)
    big = b"\x00\xff" + b"x" * 100_000
    letter = DeadLetter.of("edge/v1/evil/results/p\ud800", big, "too_large", "detail\x00\n" * 200, 5.0)
    assert len(letter.payload) == DEAD_LETTER_PAYLOAD_BYTES and letter.payload_bytes == len(big)
    store.commit_batch([row(1)], [], [letter])
    (kept,) = store.dead_letters()
    assert (kept["reason"], kept["payload_bytes"], kept["received_at"]) == ("too_large", len(big), 5.0)
    assert kept["topic"] == "edge/v1/evil/results/p?" and len(kept["detail"]) == 500 and "\x00" not in kept["detail"]
    for i in range(5):
        store.commit_batch([], [], [DeadLetter.of("t", b"{}", f"r{i}", "", 6.0)])
    assert [d["reason"] for d in store.dead_letters()] == ["r4", "r3", "r2"]  # newest first, oldest pruned
    assert store.count_results() == 1


def acks_published(broker: FakeBroker, device: str) -> list[dict[str, Any]]:
    return [json.loads(p) for t, p in list(broker.published) if t == codec.ack_topic(device)]


class PickyStore:
    """A real SQLite store that refuses (like a constraint would) any batch holding input id ``bad``."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner
        self.calls = 0

    def commit_batch(
        self, results: Sequence[ResultRow], devices: Sequence[DeviceUpdate], dead: Sequence[DeadLetter] = (),
        events: Sequence[Any] = (),
    ) -> BatchOutcome:
        self.calls += 1
        if any(r.input_id == "bad" for r in results):
            raise StoreRejectedError("refused: input bad")
        return self.inner.commit_batch(results, devices, dead, events)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_batch_the_store_refuses_is_split_until_the_culprit_is_quarantined(tmp_path: Path) -> None:
    broker = FakeBroker()
    transport = FakeTransport(broker)
    store = PickyStore(SqliteStore(tmp_path / "c.db"))
    coordinator = Coordinator(store, transport, batch_max=1000)
    topic = codec.results_topic("d1", "p")
    for seq in range(1, 41):  # queued before the worker starts: one batch of 40
        over: dict[str, object] = {"input_id": "bad"} if seq == 17 else {}
        coordinator.on_message(InboundMessage(topic, result_bytes(seq, over=over), 1, False, seq))
    coordinator.start()
    try:
        wait_until(lambda: coordinator.counters["settled"] >= 41, 5, "the batch settled")
        assert coordinator.store.count_results() == 39
        (dead,) = coordinator.store.dead_letters()
        assert dead["reason"] == "store_rejected" and b'"bad"' in dead["payload"].encode()
        assert len(transport.acked) == 41  # the culprit too: the broker's window never fills
        ack = acks_published(broker, "d1")[-1]
        assert ack["seq"] == 16  # never beyond the quarantined seq 17: the agent keeps it and sends it again
        assert store.calls <= 2 * 6 + 2  # split in halves, not one transaction per message
    finally:
        coordinator.stop(2)


def test_a_locked_store_is_retried_with_backoff_and_nothing_is_acked_before_the_commit(tmp_path: Path) -> None:
    broker = FakeBroker()
    transport = FakeTransport(broker)
    store = SqliteStore(tmp_path / "c.db", busy_timeout_s=0.1)
    coordinator = Coordinator(store, transport, retry_min_s=0.05, retry_max_s=0.2)
    locker = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # another process holds the database
    coordinator.start()
    try:
        for seq in (1, 2, 3):
            broker.route(codec.results_topic("d1", "p"), result_bytes(seq), False)
        wait_until(lambda: coordinator.counters["store_errors"] >= 3, 5, "failed attempts")
        assert not coordinator.store_ok and coordinator.snapshot()["store_ok"] is False
        assert transport.acked == [] and acks_published(broker, "d1") == []
        locker.execute("ROLLBACK")
        # the three results and the coordinator's own status (which it ignores)
        wait_until(lambda: len(transport.acked) == 4, 5, "committed, then acknowledged")
        assert coordinator.store_ok and coordinator.counters["store_reconnects"] >= 1
        assert store.count_results() == 3 and acks_published(broker, "d1")[-1]["seq"] == 3
    finally:
        locker.close()
        coordinator.stop(2)


def test_postgres_going_away_is_survived_by_reconnecting(tmp_path: Path, broker: Broker) -> None:
    """The PostgreSQL server crashes while results arrive: nothing is acknowledged meanwhile, then all are stored."""
    server = Postgres()
    server.start()
    coordinator = start_coordinator(server.new_database(), broker.port)
    coordinator.retry_max_s = 1.0
    agent = start_agent(tmp_path / "agent", broker.port)
    try:
        agent.feed([f"a{i}" for i in range(100)])
        wait_until(lambda: agent.outbox.stats().backlog == 0, 20, "first 100 stored and acked")
        server.crash()
        agent.feed([f"b{i}" for i in range(100)])
        wait_until(lambda: not coordinator.store_ok, 20, "the coordinator noticed")
        assert agent.outbox.stats().backlog == 100  # not one acknowledged without a commit
        server.resume()
        wait_until(lambda: agent.outbox.stats().backlog == 0, 30, "everything stored after the server came back")
        assert coordinator.store.count_results("dev1") == 200 and coordinator.store_ok
        assert coordinator.counters["store_reconnects"] >= 1
    finally:
        agent.stop()
        coordinator.stop()
        coordinator.store.close()
        server.stop()
