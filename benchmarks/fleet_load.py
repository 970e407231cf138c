"""Fleet load test: N simulated devices -> Mosquitto -> two coordinators on a shared subscription -> PostgreSQL.

Everything real and on loopback: a Mosquitto (``tests.support.broker``), a private PostgreSQL
(``tests.support.postgres``), two ``edge-coordinator run`` processes with ``mqtt.share_group`` over one
PostgreSQL store. The devices live in this one process: one paho MQTT 5 client each (own client id, own
session, own ack subscription), all driven by a single thread through paho's external-loop API
(``loop_read`` / ``loop_write`` / ``loop_misc`` over one selector), so 1,000 devices cost 1,000 sockets, not
1,000 threads.

Each device speaks the agent's wire protocol (``codec.result_payload``: epoch, gap-free ``seq``, ``base``,
``result_id``) with a realistic crop result body, at ``rate`` results/s, keeping at most ``window`` results
unacknowledged end to end (like the agent's publisher window; a device at its window skips its turn and the
skip is counted). Measured:

* ``acked_per_s``: results acknowledged end to end per second over the steady part (after ``warmup_s``);
* ``ingest_to_ack_ms`` p50/p95/p99/max: from the device's ``publish()`` of a result to its receipt of the
  coordinator's cumulative ack covering it (broker in, coordinator insert + commit in PostgreSQL, ack out);
* ``lost`` / ``stored_twice``: after the drain, every (device, seq) published must be in the store exactly once
  and every device's watermark must equal its last seq;
* each coordinator's CPU (% of one core, from ``/proc/<pid>/stat``) over the steady part, its RSS at the end and
  its peak (``VmHWM``), and the results each one inserted (the shared subscription's split).

Run: ``nice -n 10 .venv/bin/python -m benchmarks.fleet_load --devices 1000 --rate 1 --duration 60``
(``--json out.json`` writes the figures). Not part of the CI run; ``tests/test_fleet_load.py`` runs it with 20
devices for a few seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.protocol import codec
from tests.support.broker import Broker, free_port
from tests.support.postgres import Postgres

log = logging.getLogger("benchmarks.fleet_load")
ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _body(seq: int) -> dict[str, Any]:
    """A crop result body of the size a real one has (top-3, timings, sector verdict)."""
    top = [
        {"label": "Corn___Common_rust", "score": 0.9123, "index": 1},
        {"label": "Corn___healthy", "score": 0.051, "index": 3},
        {"label": "Corn___Northern_Leaf_Blight", "score": 0.0301, "index": 2},
    ]
    return {
        "task": "classification", "predictions": top, "rejected": False, "kind": "crop", "source": "upload",
        "timings_ms": {"decode": 3.1, "preprocess": 1.2, "inference": 9.8, "postprocess": 0.1, "total": 14.2},
        "sector": {"crop": "Corn", "condition": "Common_rust", "label": top[0]["label"], "healthy": False,
                   "recognised": True, "confidence": 0.9123, "top3": [], "crop_hint": None,
                   "crop_hint_applied": False, "n": seq},
    }


@dataclass
class Device:
    name: str
    client: mqtt.Client
    epoch: str = field(default_factory=lambda: secrets.token_hex(8))
    seq: int = 0
    acked: int = 0
    connected: bool = False
    sent_at: dict[int, float] = field(default_factory=dict)


class Fleet:
    """``n`` simulated devices on one selector thread."""

    def __init__(self, port: int, n: int, *, window: int, prefix: str = "sim") -> None:
        self.port = port
        self.window = window
        self.sel = selectors.DefaultSelector()
        self.devices: list[Device] = []
        self.by_client: dict[int, Device] = {}
        self.latencies: list[tuple[float, float]] = []  # (ack receipt time, ingest-to-ack seconds)
        self.skipped = 0
        self.acks = 0
        self.bad_acks = 0
        for i in range(n):
            name = f"{prefix}-{i:04d}"
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
            client.max_inflight_messages_set(max(20, window))
            client.max_queued_messages_set(0)
            client.on_connect = self._on_connect
            client.on_message = self._on_message
            client.user_data_set(name)
            dev = Device(name, client)
            self.devices.append(dev)
            self.by_client[id(client)] = dev

    # ---------------------------------------------------------------- paho callbacks (this thread only)
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode,
                    props: Properties | None) -> None:
        dev = self.by_client[id(client)]
        dev.connected = not rc.is_failure
        client.subscribe(codec.ack_topic(dev.name), qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        dev = self.by_client[id(client)]
        try:
            ack = orjson.loads(message.payload)
            seq = int(ack["seq"])
            if ack.get("epoch") != dev.epoch or seq > dev.seq:
                raise ValueError("wrong epoch or seq beyond sent")
        except (ValueError, KeyError, TypeError):
            self.bad_acks += 1
            return
        self.acks += 1
        for s in range(dev.acked + 1, seq + 1):
            sent = dev.sent_at.pop(s, None)
            if sent is not None:
                self.latencies.append((now, now - sent))
        dev.acked = max(dev.acked, seq)

    # ---------------------------------------------------------------- loop
    def connect(self, timeout: float = 120.0) -> float:
        t0 = time.monotonic()
        for dev in self.devices:
            dev.client.connect("127.0.0.1", self.port, keepalive=60, clean_start=True)
            sock = dev.client.socket()
            assert isinstance(sock, socket.socket)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the agent's transport does
            self.sel.register(sock, selectors.EVENT_READ, dev)
            dev.client.loop_write()
            self.poll(0)
        while not all(d.connected for d in self.devices):
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{sum(d.connected for d in self.devices)}/{len(self.devices)} devices connected")
            self.poll(0.05)
        return time.monotonic() - t0

    def poll(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            dev: Device = key.data
            dev.client.loop_read()
            if dev.client.want_write():
                dev.client.loop_write()

    def misc(self) -> None:
        for dev in self.devices:
            dev.client.loop_misc()
            if dev.client.want_write():
                dev.client.loop_write()

    def publish(self, dev: Device) -> None:
        if dev.seq - dev.acked >= self.window:
            self.skipped += 1
            return
        dev.seq += 1
        input_id = f"in-{dev.seq}"
        now = time.time()
        payload = codec.result_payload(
            device=dev.name, epoch=dev.epoch, base=dev.acked + 1, seq=dev.seq, input_id=input_id,
            result_id=hashlib.sha256(f"{dev.name}\0{dev.epoch}\0{input_id}".encode()).hexdigest()[:32],
            pipeline="leaf", model="crop_disease", model_version="1.0.0", created_at=now, sent_at=now,
            body=_body(dev.seq),
        )
        dev.sent_at[dev.seq] = time.monotonic()
        dev.client.publish(codec.results_topic(dev.name, "leaf"), orjson.dumps(payload), qos=1)

    def run(self, rate: float, duration: float) -> float:
        """Publish for ``duration`` s: device ``g % n`` at ``t0 + g / (n * rate)`` (evenly spread); returns t0."""
        n = len(self.devices)
        t0 = time.monotonic()
        g = 0
        next_misc = t0 + 1.0
        while True:
            now = time.monotonic()
            if now - t0 >= duration:
                return t0
            while t0 + g / (n * rate) <= now:
                self.publish(self.devices[g % n])
                g += 1
            if now >= next_misc:
                self.misc()
                next_misc = now + 1.0
            self.poll(max(0.0, min(0.01, t0 + g / (n * rate) - time.monotonic())))

    def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        next_misc = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if all(d.acked == d.seq for d in self.devices):
                return True
            self.poll(0.05)
            if time.monotonic() >= next_misc:
                self.misc()
                next_misc = time.monotonic() + 1.0
        return all(d.acked == d.seq for d in self.devices)

    def close(self) -> None:
        for dev in self.devices:
            try:
                dev.client.disconnect()
                dev.client.loop_write()
            except Exception:  # best effort at the end of a benchmark
                pass
            sock = dev.client.socket()
            if sock is not None:
                self.sel.unregister(sock)
        self.sel.close()


class NodelayBroker(Broker):
    """The test Mosquitto plus ``set_tcp_nodelay true``, as ``deploy/mosquitto/mosquitto.conf`` ships it."""

    def write_config(self) -> Path:
        conf = super().write_config()
        conf.write_text(conf.read_text() + "set_tcp_nodelay true\n")
        return conf


class CoordinatorProc:
    """One ``edge-coordinator run`` over PostgreSQL, in the shared group, with its dashboard for counters."""

    def __init__(self, workdir: Path, name: str, broker_port: int, dsn: str) -> None:
        self.workdir = workdir
        self.name = name
        self.dashboard_port = free_port()
        config = workdir / f"{name}.yaml"
        config.write_text(json.dumps({
            "mqtt": {"port": broker_port, "client_id": name, "share_group": "fleet", "keepalive_s": 10},
            "store": {"type": "postgres", "dsn": dsn},
            "http": {"enabled": True, "bind": "127.0.0.1", "port": self.dashboard_port},
        }))
        self.log = (workdir / f"{name}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from edge_agent.coordinator.cli import main; main()", "run", "-c", str(config)],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime (fields 14, 15)

    def memory_mb(self) -> tuple[float, float]:
        """(RSS now, peak RSS) in MB."""
        status = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines())
        return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024

    def counters(self) -> dict[str, float]:
        """The coordinator's Prometheus counters (``/metrics``), names without ``edge_coordinator_``; {} if down."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.dashboard_port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except (OSError, ValueError):
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name.startswith("edge_coordinator_") and "{" not in name:
                out[name.removeprefix("edge_coordinator_")] = float(value)
        return out

    def connected(self) -> bool:
        return self.counters().get("mqtt_connected") == 1

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "max": round(1000 * ordered[-1], 1)}


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling a condition with a deadline


def measure(devices: int = 1000, rate: float = 1.0, duration: float = 60.0, *, window: int = 50,
            warmup_s: float = 10.0, drain_s: float = 60.0, tmp_root: Path | None = None) -> dict[str, Any]:
    """Run the whole set-up once and return the figures (see the module docstring)."""
    work = Path(tempfile.mkdtemp(prefix="fleet-load-", dir=tmp_root))
    broker = NodelayBroker(work / "broker", max_queued_messages=100_000)
    pg = Postgres()
    coordinators: list[CoordinatorProc] = []
    fleet: Fleet | None = None
    try:
        broker.start()
        pg.start()
        dsn = pg.new_database()
        coordinators = [CoordinatorProc(work, f"coord-{i}", broker.port, dsn) for i in (1, 2)]
        _wait(lambda: all(c.connected() for c in coordinators), 60, "coordinators connected")
        fleet = Fleet(broker.port, devices, window=window)
        connect_s = fleet.connect()
        log.info("%d devices connected in %.1f s", devices, connect_s)
        cpu0 = [c.cpu_s() for c in coordinators]
        t_cpu0 = time.monotonic()
        t0 = fleet.run(rate, duration)
        t_end = time.monotonic()
        cpu1 = [c.cpu_s() for c in coordinators]
        drained = fleet.drain(drain_s)
        steady = [lat for at, lat in fleet.latencies if t0 + warmup_s <= at <= t_end]
        acked_steady = len(steady)
        published = sum(d.seq for d in fleet.devices)
        with psycopg.connect(dsn) as conn:
            total, distinct = conn.execute(
                "SELECT count(*), count(DISTINCT (device, epoch, seq)) FROM results").fetchone() or (0, 0)
            per_device = {
                row[0]: (int(row[1]), int(row[2]))
                for row in conn.execute("SELECT device, count(DISTINCT seq), max(seq) FROM results GROUP BY device")
            }
            watermarks: dict[str, int] = {
                str(d): int(s) for d, s in conn.execute("SELECT device, acked_seq FROM watermarks").fetchall()}
        lost = sum(max(0, d.seq - per_device.get(d.name, (0, 0))[0]) for d in fleet.devices)
        gaps = sum(per_device.get(d.name, (0, 0)) != ((d.seq, d.seq) if d.seq else (0, 0)) for d in fleet.devices)
        wm_short = sum(1 for d in fleet.devices if d.seq and watermarks.get(d.name) != d.seq)
        counters = [c.counters() for c in coordinators]
        memory = [c.memory_mb() for c in coordinators]
        return {
            "devices": devices, "rate_per_device": rate, "offered_per_s": devices * rate, "duration_s": duration,
            "window": window, "connect_s": round(connect_s, 1),
            "published": published, "skipped_at_window": fleet.skipped,
            "acked_per_s": round(acked_steady / max(1e-9, t_end - t0 - warmup_s), 1),
            "ingest_to_ack_ms": _percentiles(steady),
            "ingest_to_ack_ms_all": _percentiles([lat for _, lat in fleet.latencies]),
            "drained": drained, "stored": total, "stored_twice": int(total) - int(distinct), "lost": lost,
            "devices_with_gaps": gaps, "watermarks_short": wm_short, "bad_acks": fleet.bad_acks,
            "coordinators": [
                {
                    "name": c.name,
                    "cpu_percent": round(100 * (b - a) / (t_end - t_cpu0), 1),
                    "rss_mb": round(m[0], 1), "peak_rss_mb": round(m[1], 1),
                    "inserted": int(k.get("results_inserted_total", -1)),
                    "duplicates": int(k.get("duplicates_total", -1)),
                    "received": int(k.get("messages_total", -1)),
                }
                for c, a, b, m, k in zip(coordinators, cpu0, cpu1, memory, counters, strict=True)
            ],
        }
    finally:
        if fleet is not None:
            fleet.close()
        for c in coordinators:
            c.stop()
        broker.close()
        pg.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=1.0, help="results per second per device")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of publishing")
    ap.add_argument("--window", type=int, default=50, help="unacknowledged results per device at most")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds left out of the steady figures")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    doc = measure(args.devices, args.rate, args.duration, window=args.window, warmup_s=args.warmup)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0 if doc["lost"] == 0 and doc["stored_twice"] == 0 and doc["drained"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
