"""A real coordinator process (``edge-coordinator run``) for tests: own config, SQLite store, dashboard port.

Managed by PID; readiness and counters come from its dashboard's JSON (``/api/devices``), never from sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.broker import free_port
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parent.parent.parent


class CoordinatorProcess:
    """One ``edge-coordinator run`` process; ``db`` is its SQLite store (shared across restarts)."""

    def __init__(
        self,
        workdir: Path,
        broker_port: int,
        *,
        client_id: str = "coord",
        db: Path | None = None,
        batch_max: int = 1000,
        extra_config: str = "",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker_port = broker_port
        self.client_id = client_id
        self.db = db or self.workdir / "coordinator.db"
        self.batch_max = batch_max
        self.extra_config = extra_config
        self.dashboard_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "coordinator.log"
        self.starts = 0

    def write_config(self) -> Path:
        config = self.workdir / "coordinator.yaml"
        config.write_text(
            f"mqtt: {{port: {self.broker_port}, client_id: {self.client_id}, keepalive_s: 5}}\n"
            f"store: {{type: sqlite, path: {self.db}}}\n"
            f"batch_max: {self.batch_max}\n"
            f"http: {{enabled: true, bind: 127.0.0.1, port: {self.dashboard_port}}}\n"
            + self.extra_config
        )
        return config

    def start(self, *, client_id: str | None = None, wait_connected: bool = False) -> None:
        """Start (or restart) the process; ``client_id`` replaces the MQTT client id (a fresh broker session)."""
        if client_id is not None:
            self.client_id = client_id
        config = self.write_config()
        self.starts += 1
        log = self.log_path.open("ab")
        cmd = [sys.executable, "-c", "from edge_agent.coordinator.cli import main; main()", "run", "-c", str(config)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if wait_connected:
            assert wait_for(lambda: bool((self.stats() or {}).get("counters", {}).get("connected")), 20), (
                f"coordinator not connected: {self.read_log()[-2000:]}"
            )

    def stats(self) -> dict[str, Any] | None:
        """The dashboard's JSON, or None while it is not serving."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.dashboard_port}/api/devices", timeout=2) as r:
                data: dict[str, Any] = json.loads(r.read())
                return data
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.dashboard_port}/metrics", timeout=2) as r:
            return str(r.read().decode())

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: the process holds its connection but reads and acknowledges nothing."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout=15)

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """Read the store while the process runs (WAL: readers never block its writer)."""
        if not self.db.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []
        finally:
            conn.close()

    def count(self, device: str) -> int:
        rows = self.query("SELECT COUNT(*) FROM results WHERE device = ?", device)
        return int(rows[0][0]) if rows else 0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.thaw()
        with contextlib.suppress(Exception):
            self.kill()
