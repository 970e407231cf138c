"""The coordinator's HTTP API (FastAPI): results with filters, cursor pages and streamed CSV on both stores,
bearer tokens, health, readiness, Prometheus metrics, alerts and the server-sent event stream."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient

from edge_agent.auth.tokens import TokenSet
from edge_agent.coordinator.alerts import AlertsConfig, DeviceMeta
from edge_agent.coordinator.http import HttpContext, HttpServer, create_app
from edge_agent.coordinator.monitor import FleetMonitor
from edge_agent.coordinator.service import Coordinator
from edge_agent.coordinator.store import DeviceUpdate, SqliteStore, Store
from edge_agent.errors import ConfigError
from edge_agent.protocol import codec
from edge_agent.transport import FakeBroker, FakeTransport, InboundMessage
from tests.fleet_fixtures import crop, inspection, result_row
from tests.support.wait import wait_for

T0 = 1_700_000_000.0
TOKEN = "t0ken-for-the-fleet-api-0123456789"


def status(**over: Any) -> dict[str, Any]:
    snap: dict[str, Any] = {"connected": True, "store_ok": True, "inserted": 3, "duplicates": 0, "dead_letters": 0,
                            "received": 5, "store_errors": 2, "dead_letter_reasons": {"json_invalid": 1},
                            "ingest_rate": 1.5,
                            "ack_latency": {"bounds": [0.01, 0.1], "cumulative": [2, 3, 3], "sum": 0.05, "count": 3}}
    snap.update(over)
    return snap


def fill(store: Store) -> None:
    """30 results: devices a and b, pipelines leaf and line, one created every second from T0."""
    rows = []
    for i in range(30):
        device = "a" if i % 2 == 0 else "b"
        if i % 3 == 0:
            rows.append(result_row(device, i + 1, T0 + i, inspection(fail=i % 6 == 0), pipeline="line"))
        else:
            rows.append(result_row(device, i + 1, T0 + i, crop("Bean___rust" if i % 4 == 1 else None), pipeline="leaf"))
    store.commit_batch(rows, [DeviceUpdate("a", T0, state="online"), DeviceUpdate("b", T0, state="offline")])


def all_pages(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        r = client.get("/api/v1/results", params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        out += r.json()["results"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return out
    raise AssertionError("pagination did not end")


def test_results_filters_cursor_pages_and_csv(store: Store) -> None:
    fill(store)
    client = TestClient(create_app(HttpContext(store, status)))
    everything = all_pages(client, limit=7)
    assert [r["created_at"] for r in everything] == [T0 + i for i in range(30)]  # every row once, in order
    assert len({r["result_id"] for r in everything}) == 30
    assert all_pages(client, limit=4, order="desc") == everything[::-1]
    only_a = all_pages(client, device="a", limit=5)
    assert {r["device"] for r in only_a} == {"a"} and len(only_a) == 15
    line = all_pages(client, pipeline="line", limit=3)
    assert len(line) == 10 and {r["verdict"] for r in line} == {"pass", "fail"}
    rust = all_pages(client, label="Bean___rust", limit=2)
    assert [r["created_at"] - T0 for r in rust] == [i for i in range(30) if i % 3 and i % 4 == 1]
    assert all(r["body"]["sector"]["label"] == "Bean___rust" for r in rust)
    failed = all_pages(client, label="fail", pipeline="line", limit=100)
    assert len(failed) == 5
    window = all_pages(client, since=T0 + 10, until="2023-11-14T22:13:40Z")  # T0 + 20 in ISO 8601
    assert [r["created_at"] - T0 for r in window] == list(range(10, 20))

    r = client.get("/api/v1/results", params={"format": "csv", "device": "b"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 15 and {row["device"] for row in rows} == {"b"}
    assert rows[0]["result_id"] == next(x["result_id"] for x in everything if x["device"] == "b")
    assert len(list(csv.reader(io.StringIO(client.get("/api/v1/results?format=csv&limit=4").text)))) == 5

    bad = client.get("/api/v1/results", params={"cursor": "nonsense"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_cursor"
    bad = client.get("/api/v1/results", params={"since": "yesterday"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_parameter"

    devices = {d["device"]: d for d in client.get("/api/v1/devices").json()["devices"]}
    assert devices["a"]["online"] is True and devices["b"]["availability"] == "offline"
    assert devices["a"]["results"] == 15


def test_csv_export_streams_more_than_one_page(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    store.commit_batch([result_row("d", i + 1, T0 + i, inspection(False)) for i in range(2500)], [])
    with TestClient(create_app(HttpContext(store, status))) as client, \
            client.stream("GET", "/api/v1/results?format=csv") as r:
        chunks = list(r.iter_bytes())
    lines = b"".join(chunks).decode().splitlines()
    assert len(lines) == 2501 and len(chunks) >= 3  # header + 2500 rows, sent a page at a time


def test_bearer_tokens(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"{TOKEN}\nexpired-token-0123456789abcdef 2020-01-01\n")
    tokens = TokenSet.load(tokens_file)
    client = TestClient(create_app(HttpContext(store, status, tokens)))
    for path in ("/api/v1/devices", "/api/v1/results", "/api/v1/alerts", "/metrics", "/api/v1/stream"):
        r = client.get(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", path
    r = client.get("/api/v1/devices", headers={"Authorization": "Bearer expired-token-0123456789abcdef"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "token_expired"
    r = client.get("/api/v1/devices", headers={"Authorization": "Bearer wrong-token-0123456789abcdef"})
    assert r.status_code == 401
    assert client.get("/api/v1/devices", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get("/healthz").json() == {"ok": True}
    assert client.get("/").status_code == 200  # the page holds no data
    with pytest.raises(ConfigError, match="tokens_file"):
        HttpServer(create_app(HttpContext(store, status)), "0.0.0.0", 0, TokenSet())


def test_readiness_and_metrics(store: Store) -> None:
    store.commit_batch([], [DeviceUpdate("a", T0, state="online"), DeviceUpdate("b", T0, state="offline"),
                            DeviceUpdate("c", T0, state="online")])
    snap = status()
    client = TestClient(create_app(HttpContext(store, lambda: snap)))
    assert client.get("/readyz").status_code == 200
    snap.update(connected=False, store_ok=False)
    r = client.get("/readyz")
    assert r.status_code == 503 and set(r.json()["reasons"]) == {"mqtt_disconnected", "store_unavailable"}
    text = client.get("/metrics").text
    for line in (
        "edge_coordinator_ingest_rate 1.5",
        "edge_coordinator_devices_online 2.0",
        'edge_coordinator_ack_latency_seconds_bucket{le="0.01"} 2.0',
        'edge_coordinator_ack_latency_seconds_bucket{le="+Inf"} 3.0',
        "edge_coordinator_ack_latency_seconds_count 3.0",
        "edge_coordinator_store_errors_total 2.0",
        'edge_coordinator_dead_letters_total{reason="json_invalid"} 1.0',
        "edge_coordinator_store_up 0.0",
    ):
        assert line in text, line


def test_store_unavailable_is_a_503_and_the_server_keeps_serving(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    client = TestClient(create_app(HttpContext(store, status)))
    store.close()  # every read now fails
    r = client.get("/api/v1/results")
    assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
    assert client.get("/healthz").status_code == 200


def read_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event == "snapshot":
            yield orjson.loads(line[6:])


def test_stream_pushes_a_snapshot_whenever_the_fleet_changes(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    monitor = FleetMonitor(store, None, AlertsConfig(), {"a": DeviceMeta(site="farm-1")}, clock=lambda: T0 + 100)
    ctx = HttpContext(store, status, monitor=monitor, devices_meta={"a": DeviceMeta(site="farm-1")},
                      stream_interval_s=0.05)
    server = HttpServer(create_app(ctx), "127.0.0.1", 0, TokenSet())
    server.start()
    try:
        with httpx.stream("GET", f"http://127.0.0.1:{server.port}/api/v1/stream", timeout=10) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = read_events(r)
            first = next(events)
            assert first["devices"] == [] and first["latest"] == []
            started = time.monotonic()
            rows = [result_row("a", 1, T0 + 50, crop("Bean___rust"))]
            store.commit_batch(rows, [DeviceUpdate("a", T0 + 50, state="online")])
            monitor.process((rows, [DeviceUpdate("a", T0 + 50, state="online")]))
            second = next(events)
            assert time.monotonic() - started < 5
            assert second["devices"][0]["site"] == "farm-1" and second["devices"][0]["online"]
            assert second["latest"][0]["verdict"] == "Bean___rust"
            assert second["charts"]["diagnoses"] == [
                {"day": "2023-11-14", "site": "farm-1", "disease": "Bean___rust", "count": 1}]
    finally:
        server.stop()


def test_the_coordinator_measures_ack_latency_and_ingest_rate_and_tells_its_observers(tmp_path: Path) -> None:
    broker = FakeBroker()
    coordinator = Coordinator(SqliteStore(tmp_path / "c.db"), FakeTransport(broker))
    told: list[tuple[int, int]] = []
    coordinator.observers.append(lambda results, devices: told.append((len(results), len(devices))))

    def broken(results: object, devices: object) -> None:
        raise RuntimeError("observer bug")

    coordinator.observers.append(broken)  # a failing observer changes nothing
    topic = codec.results_topic("d1", "p")
    for seq in range(1, 31):
        payload = codec.result_payload(device="d1", epoch="e1", base=1, result_id=f"{seq:032x}", seq=seq,
                                       input_id=f"i{seq}", pipeline="p", model="m", model_version="1",
                                       created_at=1.0, sent_at=2.0, body={})
        coordinator.on_message(InboundMessage(topic, codec.dumps(payload), 1, False, seq))
    coordinator.on_message(InboundMessage(topic, codec.dumps(codec.result_payload(
        device="d1", epoch="e1", base=1, result_id=f"{1:032x}", seq=1, input_id="i1", pipeline="p", model="m",
        model_version="1", created_at=1.0, sent_at=2.0, body={})), 1, False, 99))  # a duplicate
    coordinator.start()
    try:
        assert wait_for(lambda: coordinator.counters["settled"] >= 31, 5)
        snap = coordinator.snapshot()
        assert snap["ack_latency"]["count"] == 31 and snap["ack_latency"]["cumulative"][-1] == 31
        assert 0 <= snap["ack_latency"]["sum"] < 31 * 5
        assert snap["ingest_rate"] == pytest.approx(30 / 60)  # 30 stored (the duplicate not) in the last minute
        assert sum(r for r, _ in told) == 31 and coordinator.store.count_results() == 30
    finally:
        coordinator.stop(2)
