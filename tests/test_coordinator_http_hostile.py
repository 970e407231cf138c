"""The coordinator's HTTP server under hostile clients: the agent's connection gate (edge_agent.httpguard.gate)
in front of the real uvicorn server, built from the coordinator's config as `edge-coordinator run` builds it.

Given a coordinator whose ``http`` section caps connections at 8 in all and 4 per client with a 1.5 s header
deadline; when one client holds 4 idle connections and opens more, then the extra ones are answered
``503 too_many_connections`` and closed while the held ones stay open and another client is served; at the global
cap everyone is refused, and once the idle connections go a request from the same client is served again; a
client sending its headers one byte at a time, or nothing at all, is cut at the deadline; /metrics counts both.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge_agent.coordinator.cli import build_http
from edge_agent.coordinator.config import CoordinatorHttp, parse_coordinator_config
from edge_agent.coordinator.http import HttpServer
from edge_agent.coordinator.service import Coordinator
from edge_agent.coordinator.store import SqliteStore
from edge_agent.transport import FakeBroker, FakeTransport
from tests.support.sockets import connect_from, dribble, server_closed
from tests.support.wait import wait_for

MAX_CONNECTIONS = 8
PER_CLIENT = 4
HEADER_TIMEOUT_S = 1.5
HALF_OPEN = b"GET /api/v1/devices HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\nX-Pad: " + b"a" * 40


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[HttpServer]:
    cfg = parse_coordinator_config({"http": {
        "enabled": True, "port": 0, "max_connections": MAX_CONNECTIONS, "max_connections_per_client": PER_CLIENT,
        "header_timeout_s": HEADER_TIMEOUT_S, "keepalive_timeout_s": 30}}, "test")
    coordinator = Coordinator(SqliteStore(tmp_path / "c.db"), FakeTransport(FakeBroker()))
    http = build_http(cfg, coordinator, None)
    http.start()
    try:
        yield http
    finally:
        http.stop()
        coordinator.store.close()


def read_to_eof(s: socket.socket) -> bytes:
    """What the server sent before it closed (the socket's 10 s timeout fails the test if it never does)."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def get_from(source: str, url: str) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=10) as client:
        return client.get(url)


def metric(server: HttpServer, name: str, labels: str = "") -> float:
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def test_the_http_settings_default_to_the_agents_limits() -> None:
    http = parse_coordinator_config({}, "test").http_settings()
    assert (http.max_connections, http.max_connections_per_client) == (256, 64)
    assert (http.header_timeout_s, http.keepalive_timeout_s) == (10.0, 5.0)
    legacy = parse_coordinator_config({"dashboard": {"enabled": True}}, "test").http_settings()
    assert legacy.max_connections == 256 and legacy.header_timeout_s == 10.0
    with pytest.raises(Exception, match="max_connections"):
        CoordinatorHttp.model_validate({"max_connections": 0})


def test_one_client_over_its_cap_is_refused_while_others_are_served_until_the_global_cap(
    server: HttpServer,
) -> None:
    base = f"http://127.0.0.1:{server.port}"
    held: list[socket.socket] = []
    try:
        held += [connect_from("127.0.0.2", server.port) for _ in range(PER_CLIENT)]
        assert wait_for(lambda: server.gate.by_client["127.0.0.2"] == PER_CLIENT, 5), "the idle ones admitted"
        for _ in range(3):  # one client, over its cap: answered 503 and closed before it sends a byte
            with connect_from("127.0.0.2", server.port) as extra:
                answer = read_to_eof(extra)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"too_many_connections" in answer and b"retry-after: 5" in answer.lower()
        assert not any(server_closed(s) for s in held)  # the admitted ones are untouched
        served = get_from("127.0.0.1", f"{base}/api/v1/devices")  # another client is served meanwhile
        assert served.status_code == 200 and served.json()["devices"] == []
        assert wait_for(lambda: server.gate.open == PER_CLIENT, 5), "that client's connection released"
        assert metric(server, "edge_coordinator_http_refused_total", '{reason="too_many_connections"}') == 3
        assert metric(server, "edge_coordinator_http_connections") == PER_CLIENT + 1  # + the scrape itself
        assert wait_for(lambda: server.gate.open == PER_CLIENT, 5), "the scrape's connection released"

        held += [connect_from("127.0.0.4", server.port) for _ in range(PER_CLIENT)]  # the global cap
        assert wait_for(lambda: server.gate.open == MAX_CONNECTIONS, 5), "the global cap reached"
        full = get_from("127.0.0.1", f"{base}/healthz")
        assert full.status_code == 503 and full.json()["error"]["code"] == "too_many_connections"
        assert full.headers["connection"] == "close" and full.headers["retry-after"] == "5"

        for s in held:  # the idle connections go: the client that flooded is served again
            s.close()
        assert wait_for(lambda: server.gate.open == 0, 5), "the closed connections released"
        again = get_from("127.0.0.2", f"{base}/api/v1/devices")
        assert again.status_code == 200, again.text
    finally:
        for s in held:
            s.close()


def test_headers_dribbled_a_byte_at_a_time_or_never_sent_are_cut_at_the_header_deadline(
    server: HttpServer,
) -> None:
    pace = threading.Event()
    silent = connect_from("127.0.0.6", server.port)
    dribbler = connect_from("127.0.0.5", server.port)
    try:
        # one byte every 0.05 s keeps it busy but never completes a request (~4.7 s)
        sent, elapsed = dribble(dribbler, HALF_OPEN, 0.05, pace)
        assert sent < len(HALF_OPEN), "the server let the dribble finish"
        assert HEADER_TIMEOUT_S - 0.3 <= elapsed <= HEADER_TIMEOUT_S + 3, elapsed
        assert wait_for(lambda: server_closed(silent), 2), "the silent connection cut too"
        assert metric(server, "edge_coordinator_http_refused_total", '{reason="header_timeout"}') == 2
        assert wait_for(lambda: server.gate.open == 0, 5)
        assert httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=10).status_code == 200
    finally:
        silent.close()
        dribbler.close()
