"""Raw-socket helpers for the hostile-client tests of the agent's and the coordinator's HTTP servers."""

from __future__ import annotations

import socket


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
