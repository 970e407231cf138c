"""A TCP fault proxy for tests: pass, delay, bandwidth cap, blackhole (half-open), reset, refuse.

No tc/netem or iptables here, so network faults are injected between client and broker:
``client -> proxy.port -> target``. Modes apply to live connections at once.

* ``pass``: forward (with ``delay_s`` latency and ``bandwidth_bps`` cap when set);
* ``blackhole``: keep sockets open but silently discard everything (a half-open link);
* ``refuse``: new connections are reset at once (existing ones untouched; combine with ``reset()``);
* ``reset()``: abort every live connection with a TCP RST.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading
import time
from typing import Literal

Mode = Literal["pass", "blackhole", "refuse"]
Queue = collections.deque[tuple[float, bytes]]


def _abort(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    """One proxied connection: two directions, each a reader and a paced writer."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        for src, dst in ((client, upstream), (upstream, client)):
            pending: Queue = collections.deque()
            cond = threading.Condition()
            threading.Thread(target=self._read, args=(src, pending, cond), daemon=True).start()
            threading.Thread(target=self._write, args=(dst, pending, cond), daemon=True).start()

    def _read(self, src: socket.socket, pending: Queue, cond: threading.Condition) -> None:
        try:
            while not self.closed.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if self.proxy.mode == "blackhole":
                    self.proxy.discarded += len(data)
                    continue
                with cond:
                    pending.append((time.monotonic() + self.proxy.delay_s, data))
                    cond.notify()
        except OSError:
            pass
        self.close()
        with cond:
            cond.notify()

    def _write(self, dst: socket.socket, pending: Queue, cond: threading.Condition) -> None:
        try:
            while not self.closed.is_set():
                with cond:
                    while not pending and not self.closed.is_set():
                        cond.wait(0.5)
                    if self.closed.is_set():
                        return
                    due, data = pending[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)  # emulated link latency
                with cond:
                    pending.popleft()
                if self.proxy.mode == "blackhole":
                    continue
                dst.sendall(data)
                self.proxy.forwarded += len(data)
                if self.proxy.bandwidth_bps:
                    time.sleep(len(data) / self.proxy.bandwidth_bps)  # emulated bandwidth cap
        except OSError:
            self.close()

    def close(self, abort: bool = False) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            if abort:
                _abort(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.mode: Mode = "pass"
        self.delay_s = 0.0
        self.bandwidth_bps: float | None = None
        self.forwarded = 0
        self.discarded = 0
        self.accepted = 0
        self.links: list[_Link] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)
        self._thread.start()

    def set(self, mode: Mode = "pass", *, delay_s: float = 0.0, bandwidth_bps: float | None = None) -> None:
        self.mode, self.delay_s, self.bandwidth_bps = mode, delay_s, bandwidth_bps

    def reset(self) -> int:
        """Abort every live connection with RST; returns how many."""
        with self._lock:
            links, self.links = self.links, []
        for link in links:
            link.close(abort=True)
        return len(links)

    def _accept_loop(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.mode == "refuse":
                _abort(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _abort(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self.links = [link for link in self.links if not link.closed.is_set()]
                self.links.append(_Link(self, client, upstream))

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.close()
        self.reset()
        self._thread.join(timeout=5)
