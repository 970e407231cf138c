"""The coordinator's update files over HTTP, for agents on the local network (``edge-coordinator rollout``).

``GET``/``HEAD /updates/<name>`` serves only files registered with :meth:`FileServer.publish` (never a folder
listing, never a path from the request), with ``Content-Length``, ``ETag`` (the sha256), ``Accept-Ranges`` and single
``Range: bytes=a-[b]`` requests (206, 416), so an agent resumes a broken download. A small stdlib server of its own
(threads, no dependency); the coordinator's HTTP app can serve the same route instead (see docs/model-updates.md).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BufferedIOBase
from pathlib import Path
from typing import BinaryIO

from edge_agent.protocol.commands import FILE_RE

log = logging.getLogger(__name__)

PREFIX = "/updates/"
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Published:
    name: str
    path: Path
    size: int
    sha256: str


def describe(path: Path, name: str | None = None) -> Published:
    """Name, size and sha256 of an update file (what the ``model_update`` command carries)."""
    name = name or path.name
    if not FILE_RE.match(name):
        raise ValueError(f"update file name {name!r} must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return Published(name, path, path.stat().st_size, h.hexdigest())


class FileServer:
    """Serves published update files on ``bind:port`` (port 0: a free one) until :meth:`stop`."""

    def __init__(self, bind: str = "127.0.0.1", port: int = 0) -> None:
        self.bind = bind
        self.files: dict[str, Published] = {}
        self.requests: list[tuple[str, str, int]] = []  # (name, Range header or "", status): what was asked
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server._serve(self, body=True)

            def do_HEAD(self) -> None:
                server._serve(self, body=False)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("files: %s", format % args)

        self._httpd = ThreadingHTTPServer((bind, port), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def url(self, name: str, host: str | None = None) -> str:
        return f"http://{host or self.bind}:{self.port}{PREFIX}{name}"

    def publish(self, path: Path, name: str | None = None) -> Published:
        published = describe(path, name)
        self.files[published.name] = published
        return published

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="update-files", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def _serve(self, h: BaseHTTPRequestHandler, *, body: bool) -> None:
        name = h.path[len(PREFIX):] if h.path.startswith(PREFIX) else ""
        published = self.files.get(name)
        rng = h.headers.get("Range", "")
        if published is None:
            self.requests.append((name[:128], rng[:64], 404))
            self._answer(h, 404, b"no such update file\n")
            return
        size = published.size
        start, end = 0, size - 1
        status = 200
        if rng:
            match = _RANGE.match(rng.strip())
            first = int(match.group(1)) if match else size
            last = int(match.group(2)) if match and match.group(2) else size - 1
            if match is None or first >= size or last < first:
                self.requests.append((name, rng[:64], 416))
                self._answer(h, 416, b"", {"Content-Range": f"bytes */{size}"})
                return
            start, end, status = first, min(last, size - 1), 206
        self.requests.append((name, rng[:64], status))
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(end - start + 1))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", f'"{published.sha256}"')
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        if not body:
            return
        try:
            with published.path.open("rb") as f:
                f.seek(start)
                _copy(f, h.wfile, end - start + 1)
        except OSError as exc:  # the agent went away, or the file did: it resumes with Range
            log.info("files: sending %s stopped: %s", name, exc)
            h.close_connection = True

    @staticmethod
    def _answer(h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def _copy(src: BinaryIO, dst: BufferedIOBase | BinaryIO, n: int) -> None:
    while n > 0:
        chunk = src.read(min(n, 256 * 1024))
        if not chunk:
            raise OSError("file shrank while being sent")
        dst.write(chunk)
        n -= len(chunk)
