"""A real network camera for tests: MJPEG over HTTP (``multipart/x-mixed-replace``), as many IP cameras serve it.

Run as ``python -m tests.support.mjpeg_camera PORT LEVEL``: serves 160x120 JPEG frames of grey ``LEVEL`` (with a
moving white bar) at about 50 frames/s to every client, until the process is killed. Tests start it on a free
loopback port and kill it by PID to make the camera go away.
"""

from __future__ import annotations

import http.server
import io
import socketserver
import sys
import threading

import numpy as np
from PIL import Image

BOUNDARY = b"frame"


def frames(level: int, count: int = 8) -> list[bytes]:
    out = []
    for i in range(count):
        a = np.full((120, 160, 3), level, np.uint8)
        a[:, 10 * i : 10 * i + 8] = 255  # the bar stays left of x = 80
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def serve(port: int, level: int) -> None:
    jpegs = frames(level)
    tick = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY.decode()}")
            self.end_headers()
            i = 0
            try:
                while True:
                    jpeg = jpegs[i % len(jpegs)]
                    i += 1
                    head = b"--%s\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % (BOUNDARY, len(jpeg))
                    self.wfile.write(head + jpeg + b"\r\n")
                    self.wfile.flush()
                    tick.wait(0.02)  # the camera's frame rate, not synchronisation
            except (BrokenPipeError, ConnectionResetError):
                return

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    Server(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
