"""HTTP under hostile clients (issue 13, finding 5), against real ``edge-agent run`` processes on loopback.

Given an agent with a tokens file, a watched folder and the HTTP API; when clients flood it with thousands
of half-open POSTs (no token), dribble headers, forge X-Forwarded-For, send a DNS-rebinding Host, send four
40 MP PNGs at once, or retry an upload after the connection dropped; then the agent's open descriptors stay
under the connection cap, uploads, health and the folder source keep working, the rate limit holds, the
rebinding request gets 421, decoding costs under 80 MB over idle and the retried upload is stored once.
"""

from __future__ import annotations

import contextlib
import re
import socket
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from edge_agent.httpguard.gate import listen_backlog
from edge_agent.sectors.advice import CROP_LABELS
from tests.support.agent_process import ROOT, AgentProcess, agent_process, raise_nofile, tiny_crop_models
from tests.support.api_harness import leaf_jpeg, wait_for
from tests.support.sockets import connect_from, dribble, server_closed

TOKEN = "hostile-test-token-0123456789abcdef"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MAX_CONNECTIONS = 128
PER_CLIENT = 48
HEADER_TIMEOUT_S = 5.0

CONFIG = f"""\
device_id: hostile-1
state_dir: state
models_dir: models
shutdown_timeout_s: 5
models:
  - {{name: crop, bundle: tiny_crop}}
pipelines:
  - {{name: crop, kind: crop, model: crop}}
sources:
  - {{type: folder, name: inbox, pipeline: crop, path: inbox, poll_interval_s: 0.05, settle_s: 0.0}}
mqtt: {{enabled: false}}
metrics: {{enabled: false}}
http:
  enabled: true
  port: {{port}}
  tokens_file: tokens
  max_connections: {MAX_CONNECTIONS}
  max_connections_per_client: {PER_CLIENT}
  header_timeout_s: {HEADER_TIMEOUT_S}
  rate_limit_per_minute: 1
  rate_limit_burst: 20
  trusted_proxies: [127.0.0.5]
"""


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    root = tmp_path_factory.mktemp("hostile")
    tiny_crop_models(root, list(CROP_LABELS))
    (root / "tokens").write_text(TOKEN + "\n")
    (root / "inbox").mkdir()
    with agent_process(root, CONFIG, nofile=8192) as proc:
        yield proc


def server_side_connections(port: int, client: str) -> int:
    """Connections the server on ``port`` still has open to ``client`` (from /proc/net/tcp: established or
    waiting for the server to close)."""
    a, b, c, d = (int(x) for x in client.split("."))
    want_ip = f"{d:02X}{c:02X}{b:02X}{a:02X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if int(local.split(":")[1], 16) == port and remote.split(":")[0] == want_ip and state in ("01", "08"):
            count += 1
    return count


def drop_photo(root: Path, name: str) -> None:
    tmp = root / f".{name}"
    tmp.write_bytes(leaf_jpeg())
    tmp.rename(root / "inbox" / name)


def metric(agent: AgentProcess, name: str, labels: str) -> float:
    text = httpx.get(f"{agent.base}/metrics", headers=AUTH, timeout=10).text
    match = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


HALF_OPEN = b"POST /v1/diagnose HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nContent-Length: 900000\r\n"


def test_flood_of_half_open_posts_is_capped_while_uploads_health_and_folder_keep_working(
    agent: AgentProcess,
) -> None:
    raise_nofile(8192)  # this process holds the 4,200 client ends
    root = agent.log.parent
    idle_fds = agent.open_fds()
    most_fds = idle_fds
    flood: list[socket.socket] = []
    try:
        for i in range(4200):  # two hostile addresses, headers never finished, no token
            s = connect_from("127.0.0.2" if i % 2 else "127.0.0.3", agent.port)
            flood.append(s)
            with contextlib.suppress(OSError):  # refused and closed already
                s.sendall(HALF_OPEN)
            if i % 100 == 0:
                most_fds = max(most_fds, agent.open_fds())
        most_fds = max(most_fds, agent.open_fds())
        print(f"\nagent descriptors: {idle_fds} idle, at most {most_fds} during the flood of 4,200")
        # the soft limit of 8192 did not stop it: the cap did. A refused socket lives one loop turn, and asyncio
        # accepts at most a backlog's worth per turn: a few backlogs over the cap for an instant, never 4,200
        assert most_fds <= idle_fds + 2 * PER_CLIENT + 4 * listen_backlog(MAX_CONNECTIONS), (idle_fds, most_fds)
        def hostile_held() -> int:  # accepted and kept, or still waiting in the kernel's accept queue
            return sum(server_side_connections(agent.port, ip) for ip in ("127.0.0.2", "127.0.0.3"))

        wait_for(lambda: hostile_held() <= 2 * PER_CLIENT, timeout=10, what="the accept queue to drain")
        held = hostile_held()
        assert agent.open_fds() <= idle_fds + 2 * PER_CLIENT + 8  # once refused sockets are closed: the cap
        refusal = next(s for s in reversed(flood) if server_closed(s))
        refusal.setblocking(True)

        # meanwhile: an upload, health and the folder source all work
        r = httpx.post(f"{agent.base}/v1/diagnose", content=leaf_jpeg(),
                       headers={**AUTH, "content-type": "image/jpeg"}, timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "done", r.text
        assert httpx.get(f"{agent.base}/healthz", timeout=10).status_code == 200
        drop_photo(root, "during-flood.jpg")
        wait_for((root / "inbox" / "done" / "during-flood.jpg").exists, timeout=30,
                 what="the folder source to take a file")

        # nobody finishes their headers: every connection is closed by the header deadline
        wait_for(lambda: all(server_closed(s) for s in flood), timeout=HEADER_TIMEOUT_S + 15,
                 what="the header deadline to close the half-open connections")
        wait_for(lambda: agent.open_fds() <= idle_fds + 4, timeout=10, what="the descriptors to be given back")
        refused = metric(agent, "edge_agent_http_refused_total", 'reason="too_many_connections"')
        timed_out = metric(agent, "edge_agent_http_refused_total", 'reason="header_timeout"')
        assert refused + timed_out >= 4200 and timed_out >= held
    finally:
        for s in flood:
            s.close()


def test_at_the_global_cap_http_answers_503_and_the_agent_keeps_working(agent: AgentProcess) -> None:
    root = agent.log.parent
    idle_fds = agent.open_fds()
    hostile: list[socket.socket] = []
    try:
        t0 = time.monotonic()
        for source in ("127.0.0.8", "127.0.0.9", "127.0.0.10"):
            hostile += [connect_from(source, agent.port) for _ in range(PER_CLIENT)]
        wait_for(lambda: sum(not server_closed(s) for s in hostile) == MAX_CONNECTIONS, timeout=HEADER_TIMEOUT_S,
                 what="the global cap to be reached")
        first_refused = next(s for s in hostile if server_closed(s))
        assert time.monotonic() - t0 < HEADER_TIMEOUT_S  # still inside everyone's header deadline
        refused = httpx.get(f"{agent.base}/healthz", timeout=10)  # HTTP is full for everyone...
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "too_many_connections"
        assert refused.headers["retry-after"] and refused.headers["connection"] == "close"
        assert agent.open_fds() <= idle_fds + MAX_CONNECTIONS + 8
        drop_photo(root, "at-the-cap.jpg")  # ...but the agent is not starved of descriptors
        wait_for((root / "inbox" / "done" / "at-the-cap.jpg").exists, timeout=30, what="the folder source at the cap")
        wait_for(lambda: all(server_closed(s) for s in hostile), timeout=HEADER_TIMEOUT_S + 15,
                 what="the header deadline")
        assert time.monotonic() - t0 >= HEADER_TIMEOUT_S - 0.5  # closed by the deadline, not before
        assert httpx.get(f"{agent.base}/healthz", timeout=10).status_code == 200
        assert first_refused is not None
    finally:
        for s in hostile:
            s.close()


def test_headers_dribbled_a_byte_at_a_time_are_cut_off_at_the_header_deadline(agent: AgentProcess) -> None:
    s = connect_from("127.0.0.6", agent.port)
    pause = threading.Event()
    try:
        # one byte every 0.25 s keeps the connection busy but never completes a request
        sent, elapsed = dribble(s, HALF_OPEN, 0.25, pause)
        assert sent < len(HALF_OPEN), "the server let the dribble finish"
        assert HEADER_TIMEOUT_S - 0.5 <= elapsed <= HEADER_TIMEOUT_S + 3
    finally:
        s.close()


def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy(agent: AgentProcess) -> None:
    def burst(source: str, forwarded: list[str]) -> list[int]:
        transport = httpx.HTTPTransport(local_address=source)
        with httpx.Client(transport=transport, timeout=10) as c:
            return [c.get(f"{agent.base}/v1/models", headers={**AUTH, "x-forwarded-for": f}).status_code
                    for f in forwarded]

    spoofed = burst("127.0.0.7", [f"203.0.113.{i}" for i in range(30)])  # loopback, but not a trusted proxy
    assert spoofed == [200] * 20 + [429] * 10  # one bucket: its own address (burst 20, one more a minute)
    proxied = burst("127.0.0.5", [f"198.51.100.{i}" for i in range(30)])  # the configured proxy: one per client
    assert proxied == [200] * 30
    same_client = burst("127.0.0.5", ["198.51.100.200"] * 25)
    assert same_client.count(429) == 5


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", socket.gethostname(),
                                  f"{socket.gethostname().split('.')[0]}.local"])
def test_host_names_of_this_board_are_served(agent: AgentProcess, host: str) -> None:
    r = httpx.get(f"{agent.base}/healthz", headers={"host": f"{host}:{agent.port}"}, timeout=10)
    assert r.status_code == 200, r.text


def test_dns_rebinding_host_is_refused_with_421(agent: AgentProcess) -> None:
    for host in ("evil.example", f"evil.example:{agent.port}", "127.0.0.1.nip.io"):
        for path in ("/", "/healthz", "/v1/models"):
            r = httpx.get(f"{agent.base}{path}", headers={**AUTH, "host": host}, timeout=10)
            assert r.status_code == 421 and r.json()["error"]["code"] == "host_not_allowed", (host, path)


# --------------------------------------------------------------------------------------- the decoded-pixel budget


def flat_png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A flat RGB PNG written row by row (the test never holds the decoded picture): ~130 KB for 40 MP."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\x00" + bytes(rgb) * width
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.slow
def test_four_concurrent_40_megapixel_pngs_cost_under_80_mb_over_idle(tmp_path: Path) -> None:
    photo = flat_png(7280, 5456, (60, 140, 50))  # 39.7 MP
    assert len(photo) < 200_000
    body = f"""\
device_id: pixels-1
state_dir: state
models_dir: {ROOT / "models"}
models: [{{name: leaf, bundle: crop_disease}}]
pipelines: [{{name: crop, kind: crop, model: leaf, workers: 4}}]
mqtt: {{enabled: false}}
metrics: {{enabled: false}}
http: {{enabled: true, port: {{port}}, result_timeout_s: 120, queue_wait_s: 60}}
"""
    with agent_process(tmp_path, body) as agent:
        idle_mb = agent.status("VmRSS") / 1024
        peak = [0.0]
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.005):
                peak[0] = max(peak[0], agent.status("VmRSS") / 1024)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()

        def upload(_: int) -> httpx.Response:
            return httpx.post(f"{agent.base}/v1/diagnose", content=photo, headers={"content-type": "image/png"},
                              timeout=180)

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(upload, range(4)))
        done.set()
        watcher.join(5)
        hwm_mb = agent.status("VmHWM") / 1024
    print(f"\nRSS idle {idle_mb:.0f} MB, peak sampled {peak[0]:.0f} MB, high-water mark {hwm_mb:.0f} MB")
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert all(a.json()["diagnosis"]["label"] for a in answers)
    # What the hostile photos may cost is the rise over idle: one 39.7 MP RGB frame decoded whole is 119 MB, so any
    # full-frame decode fails this. The idle figure is the models' (4 sessions of crop_disease: ~15 MB each since
    # its per-class open-set covariances, 2.0.0), bounded separately.
    assert hwm_mb - idle_mb < 80, f"decoding cost {hwm_mb - idle_mb:.0f} MB ({idle_mb:.0f} -> {hwm_mb:.0f} MB)"
    assert hwm_mb < 300, f"agent peaked at {hwm_mb:.0f} MB (idle {idle_mb:.0f} MB)"


# ------------------------------------------------------------------------------------------------ idempotency


def inputs_in(state: Path) -> int:
    with sqlite3.connect(f"file:{state / 'outbox.db'}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT COUNT(*) FROM inputs").fetchone()[0])


def upload_then_reset(port: int, key: str, photo: bytes, stored: Callable[[], bool]) -> None:
    """Send a whole upload; once the agent has stored it, reset the connection without reading the answer
    (the phone lost the link just then)."""
    head = (f"POST /v1/diagnose HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: image/jpeg\r\nIdempotency-Key: {key}\r\nContent-Length: {len(photo)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + photo)
        wait_for(stored, what="the upload to be stored")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST


def test_upload_retried_after_a_reset_is_stored_once_even_across_a_restart(tmp_path: Path) -> None:
    tiny_crop_models(tmp_path, list(CROP_LABELS))
    (tmp_path / "tokens").write_text(TOKEN + "\n")
    (tmp_path / "inbox").mkdir()
    state = tmp_path / "state"
    photo = leaf_jpeg()
    headers = {**AUTH, "content-type": "image/jpeg"}
    with agent_process(tmp_path, CONFIG) as agent:
        port = agent.port
        upload_then_reset(agent.port, "photo-key-0001", photo, lambda: inputs_in(state) == 1)
        retry = httpx.post(f"{agent.base}/v1/diagnose", content=photo, timeout=30,
                           headers={**headers, "idempotency-key": "photo-key-0001"})
        assert retry.status_code == 200 and retry.headers["idempotent-replayed"] == "true", retry.text
        first_id = retry.json()["id"]
        again = httpx.post(f"{agent.base}/v1/diagnose", content=photo, timeout=30,
                           headers={**headers, "idempotency-key": "photo-key-0001"})
        assert again.json()["id"] == first_id
        other = httpx.post(f"{agent.base}/v1/diagnose", content=photo, timeout=30,
                           headers={**headers, "idempotency-key": "photo-key-0002"})
        assert other.status_code == 200 and "idempotent-replayed" not in other.headers
        assert other.json()["id"] != first_id
        bad = httpx.post(f"{agent.base}/v1/diagnose", content=photo, timeout=30,
                         headers={**headers, "idempotency-key": "no spaces/slashes"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "idempotency_key_invalid"
        assert inputs_in(state) == 2
    with agent_process(tmp_path, CONFIG, port=port) as agent:  # the key survives a restart
        after = httpx.post(f"{agent.base}/v1/diagnose", content=photo, timeout=30,
                           headers={**headers, "idempotency-key": "photo-key-0001"})
        assert after.status_code == 200 and after.json()["id"] == first_id
        assert inputs_in(state) == 2
