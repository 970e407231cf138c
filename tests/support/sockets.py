"""Raw-socket helpers for the hostile-client tests of the agent's and the coordinator's HTTP servers."""

from __future__ import annotations

import socket
import threading
import time


def connect_from(source: str, port: int) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from the loopback address ``source`` (a client of its own)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def server_closed(s: socket.socket) -> bool:
    """True once the server has closed its end (EOF or reset), whatever it sent first; the socket's timeout is kept."""
    timeout = s.gettimeout()
    s.setblocking(False)
    try:
        while True:
            if not s.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        s.settimeout(timeout)


def dribble(s: socket.socket, payload: bytes, every_s: float, pace: threading.Event) -> tuple[int, float]:
    """Send ``payload`` one byte every ``every_s`` (paced by ``pace.wait``) until the server closes the connection
    or the payload is sent; returns (bytes sent, seconds taken)."""
    t0 = time.monotonic()
    sent = 0
    for byte in payload:
        try:
            s.sendall(bytes([byte]))
        except OSError:
            break
        sent += 1
        if server_closed(s):
            break
        pace.wait(every_s)
    return sent, time.monotonic() - t0
