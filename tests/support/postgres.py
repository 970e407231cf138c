"""A private PostgreSQL server for tests: initdb + pg_ctl on a free loopback port, in a temp dir.

As root, the server runs as the ``postgres`` system user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from tests.support.broker import free_port


def _bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise FileNotFoundError(f"{name} not found: install PostgreSQL (initdb, pg_ctl)")


class Postgres:
    """One server in a fresh temp dir (outside pytest's 0700 tree, so the postgres user can reach it)."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="edge-pg-"))
        self.data = self.workdir / "pgdata"
        self._names = itertools.count(1)
        self.port = free_port()
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            self._prefix = ["runuser", "-u", "postgres", "--"]

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user=postgres"

    def new_database(self) -> str:
        """Create an empty database; returns its DSN."""
        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def _run(self, *args: str) -> None:
        subprocess.run([*self._prefix, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        if self._prefix:
            shutil.chown(self.workdir, "postgres", "postgres")
            os.chmod(self.workdir, 0o700)
        self._run(_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.resume()

    def resume(self) -> None:
        """Start the server on its data directory (again)."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.workdir} -c fsync=on"
        # pg_ctl -w waits for the server to accept connections (its own readiness probe)
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.workdir / "log"), "-w", "start")

    def crash(self) -> None:
        """Stop the server abruptly (immediate mode: no checkpoint, clients cut off), keeping its data."""
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run(
                [*self._prefix, _bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                check=False, capture_output=True, timeout=60,
            )
        shutil.rmtree(self.workdir, ignore_errors=True)
