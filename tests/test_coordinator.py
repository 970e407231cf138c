"""The coordinator: exactly-once storage, cumulative acks, device tracking, config, shared subscriptions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.coordinator.config import load_coordinator_config
from edge_agent.coordinator.dashboard import Dashboard
from edge_agent.coordinator.service import Coordinator
from edge_agent.coordinator.store import DeviceUpdate, ResultRow, SqliteStore, Store, next_watermark
from edge_agent.coordinator.store_pg import PostgresStore
from edge_agent.errors import ConfigError
from edge_agent.protocol import codec
from edge_agent.transport import FakeBroker, FakeTransport
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


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The same contract tests run against both backends."""
    s: Store
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "c.db")
    else:
        s = PostgresStore(request.getfixturevalue("postgres").new_database())
    yield s
    s.close()


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
        wait_until(lambda: coordinator.counters["received"] == 10, 5, "all processed")
        assert coordinator.store.count_results() == 2
        assert coordinator.counters["invalid"] == 5 and coordinator.counters["duplicates"] >= 1
        acks = [json.loads(p) for t, p in broker.published if t == codec.ack_topic("d1")]
        assert (acks[-1]["epoch"], acks[-1]["seq"]) == ("e1", 2)
        assert codec.ack_topic("d1") not in broker.retained  # acks are never retained (agents refuse those)
        assert len(transport.acked) == 10  # every message acknowledged to the broker, after the commit
        assert coordinator.store.devices()[0]["state"] == "online"
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


def test_dashboard_serves_the_page_and_device_json() -> None:
    dash = Dashboard("127.0.0.1", 0, lambda: {"devices": [{"device": "d1"}], "counters": {}})
    dash.start()
    try:
        base = f"http://127.0.0.1:{dash.port}"
        with urllib.request.urlopen(base + "/", timeout=5) as r:
            assert b"Devices" in r.read()
        with urllib.request.urlopen(base + "/api/devices", timeout=5) as r:
            assert json.loads(r.read())["devices"][0]["device"] == "d1"
    finally:
        dash.stop()


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
