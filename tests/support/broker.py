"""A real Mosquitto for tests: own config on a free loopback port, managed by PID.

Readiness is checked by connecting and completing an MQTT CONNECT/CONNACK exchange, never by sleeping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from tests.support.tls import TlsFiles

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mqtt_ping(port: int, timeout: float = 1.0, ca_file: Path | None = None) -> bool:
    """True when something on ``port`` answers an MQTT 3.1.1 CONNECT with a CONNACK (over TLS with ``ca_file``)."""
    packet = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x05\x00\x04ping"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            sock = raw
            if ca_file is not None:
                sock = ssl.create_default_context(cafile=str(ca_file)).wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(packet)
            data = sock.recv(4)
            return len(data) >= 2 and data[0] == 0x20
    except OSError:
        return False


class Broker:
    """One mosquitto process. ``users`` maps user -> password (anonymous access is then refused)."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        persistence: bool = False,
        max_queued_messages: int = 1000,
        users: dict[str, str] | None = None,
        acl: str | None = None,
        tls: TlsFiles | None = None,
        max_inflight_messages: int = 0,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.persistence = persistence
        self.max_queued_messages = max_queued_messages
        self.users = users
        self.acl = acl
        self.tls = tls
        self.max_inflight_messages = max_inflight_messages
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "mosquitto.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def write_config(self) -> Path:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'false' if self.users else 'true'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"max_queued_messages {self.max_queued_messages}",
            f"max_inflight_messages {self.max_inflight_messages}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"log_dest file {self.log_path}",
        ]
        if self.tls is not None:
            lines += [f"cafile {self.tls.ca}", f"certfile {self.tls.cert}", f"keyfile {self.tls.key}"]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to 'mosquitto' and cannot read the temp dir
        if self.users:
            pwfile = self.workdir / "passwords"
            pwfile.write_text("")
            for user, password in self.users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(pwfile), user, password], check=True, capture_output=True)
            lines.append(f"password_file {pwfile}")
        if self.acl is not None:
            (self.workdir / "acl").write_text(self.acl)
            lines.append(f"acl_file {self.workdir / 'acl'}")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 10.0) -> None:
        conf = self.write_config()
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err} {self.read_log()}")
            if mqtt_ping(self.port, timeout=0.5, ca_file=self.tls.ca if self.tls else None):
                return
            time.sleep(0.02)  # polling a condition with a deadline, not synchronisation by sleep
        raise TimeoutError(f"mosquitto on port {self.port} not ready after {timeout} s")

    def read_log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL (no persistence written) and reap."""
        if self.proc is not None:
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self) -> None:
        if self.proc is not None:
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def freeze(self) -> None:
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def set_acl(self, acl: str) -> None:
        """Rewrite the ACL and make mosquitto reload it (SIGHUP)."""
        self.acl = acl
        (self.workdir / "acl").write_text(acl)
        self._signal(signal.SIGHUP)

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.kill()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()


DEPLOY = Path(__file__).resolve().parent.parent.parent / "deploy" / "mosquitto"


class ShippedBroker(Broker):
    """``deploy/mosquitto/mosquitto.conf`` and ``acl`` as shipped: only the /etc and /var paths, the ports (two free
    loopback ones: ``port`` plain, ``tls_port`` TLS) and the log destination are moved into the test's folder.
    ``drop`` removes shipped lines that start with one of its strings (to show what a line is for)."""

    def __init__(self, workdir: Path, *, users: dict[str, str], tls: TlsFiles, drop: tuple[str, ...] = ()) -> None:
        super().__init__(workdir, users=users)
        self.tls_files = tls
        self.tls_port = free_port()
        self.drop = drop

    def write_config(self) -> Path:
        edge = self.workdir / "etc"
        edge.mkdir(exist_ok=True)
        pwfile = edge / "passwords"
        pwfile.write_text("")
        for user, password in (self.users or {}).items():
            subprocess.run([MOSQUITTO_PASSWD, "-b", str(pwfile), user, password], check=True, capture_output=True)
        (edge / "acl").write_text((DEPLOY / "acl").read_text())
        moved = {
            "/etc/mosquitto/edge/passwords": str(pwfile),
            "/etc/mosquitto/edge/acl": str(edge / "acl"),
            "/etc/mosquitto/edge/ca.pem": str(self.tls_files.ca),
            "/etc/mosquitto/edge/broker.pem": str(self.tls_files.cert),
            "/etc/mosquitto/edge/broker.key": str(self.tls_files.key),
            "/var/lib/mosquitto/": f"{self.workdir}/",
        }
        lines: list[str] = []
        ports = {
            "listener 8883": f"listener {self.tls_port} 127.0.0.1",
            "listener 1883 127.0.0.1": f"listener {self.port} 127.0.0.1",
            "log_dest syslog": f"log_dest file {self.log_path}",
        }
        for shipped in (DEPLOY / "mosquitto.conf").read_text().splitlines():
            if any(shipped.startswith(d) for d in self.drop):
                continue
            line = ports.get(shipped, shipped)
            for old, new in moved.items():
                line = line.replace(old, new)
            lines.append(line)
        if os.geteuid() == 0:
            lines.append("user root")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf
