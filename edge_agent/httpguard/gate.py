"""A connection gate for uvicorn (h11), so hostile clients cannot starve an HTTP server of descriptors.

Used by the agent's API server (``edge_agent.api.server``) and the coordinator's (``edge_agent.coordinator.http``).
What uvicorn alone does not bound, and this module does:

- **open connections** (:class:`ConnectionGate`): at most ``max_connections`` in all and ``per_client`` per
  client address (the TCP peer, never a forwarded header). One over the cap is answered
  ``503 too_many_connections`` and closed at once, before a byte is read, so a flood of idle or half-open
  connections never holds more than the cap of file descriptors;
- **the time to send a request's headers** (:func:`guarded_protocol`): a connection whose request line and
  headers are not complete ``header_timeout_s`` after it opened, or after its previous answer, is closed
  (uvicorn only times out a keep-alive connection that sends nothing at all; a byte now and then kept it open);
- **header size**: ``MAX_HEADER_BYTES`` (pass it as uvicorn's ``h11_max_incomplete_event_size``; h11 answers
  400 over it);
- **the accept burst**: the listen backlog (:func:`listen_backlog`) is also how many sockets asyncio accepts
  per loop turn before the gate sees them, so it is kept small.

Refusals go to the gate's ``on_refuse(reason)`` (``too_many_connections``, ``header_timeout``) and the number of
open connections to ``on_change(n)``; :class:`ConnectionStats` keeps both for a metrics collector.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
"""Request line plus headers, at most (h11 answers 400 over it)."""
REFUSAL_REASONS = ("too_many_connections", "header_timeout")
"""What the gate refuses or cuts a connection for (the ``reason`` passed to ``on_refuse``)."""


def refusal_bytes(retry_after_s: int) -> bytes:
    """The whole answer written to a connection over the cap: 503 ``too_many_connections``, then closed."""
    body = orjson.dumps({"error": {"code": "too_many_connections",
                                   "message": "too many open connections; retry later"}})
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: {retry_after_s}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ConnectionGate:
    """Open connections, in all and per client address, for one server (the event loop's thread only)."""

    def __init__(
        self,
        max_connections: int,
        per_client: int,
        on_refuse: Callable[[str], None] = lambda reason: None,
        on_change: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.max_connections = max_connections
        self.per_client = per_client
        self.on_refuse = on_refuse
        self.on_change = on_change
        self.open = 0
        self.by_client: Counter[str] = Counter()
        self.refused = 0

    def admit(self, client: str) -> bool:
        if self.open >= self.max_connections or self.by_client[client] >= self.per_client:
            self.refused += 1
            self.on_refuse("too_many_connections")
            if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                log.warning("HTTP connection from %s refused: %d open (%d from it); %d refused so far",
                            client, self.open, self.by_client[client], self.refused)
            return False
        self.open += 1
        self.by_client[client] += 1
        self.on_change(self.open)
        return True

    def release(self, client: str) -> None:
        self.open -= 1
        self.by_client[client] -= 1
        if self.by_client[client] <= 0:
            del self.by_client[client]
        self.on_change(self.open)


class ConnectionStats:
    """A gate's refusals by reason and its open connections, written on the event loop's thread (pass
    ``refuse`` and ``set_open`` as the gate's callbacks) and read by a metrics collector on another."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refused = dict.fromkeys(REFUSAL_REASONS, 0)
        self.open = 0

    def refuse(self, reason: str) -> None:
        with self._lock:
            self._refused[reason] = self._refused.get(reason, 0) + 1

    def set_open(self, n: int) -> None:
        self.open = n

    def refused(self) -> dict[str, int]:
        with self._lock:
            return dict(self._refused)


def guarded_protocol(gate: ConnectionGate, header_timeout_s: float, retry_after_s: int = 5) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the gate at ``connection_made`` and a deadline on request headers (pass it
    as uvicorn's ``http``); a refused connection gets :func:`refusal_bytes` with ``Retry-After: retry_after_s``."""
    refusal = refusal_bytes(retry_after_s)

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._client_host: str | None = None
            self._deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            peer = transport.get_extra_info("peername")
            host = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
            if not gate.admit(host):
                transport.write(refusal)
                transport.close()  # the descriptor is freed as soon as the short answer is flushed
                return
            self._client_host = host
            super().connection_made(transport)
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._client_host is None:
                return  # refused at connection_made: uvicorn never knew it
            gate.release(self._client_host)
            self._client_host = None
            self._stop_watch()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._client_host is None:
                return
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def _waiting_for_request(self) -> bool:
            """No request is in the app: the client owes us (the rest of) a request's headers."""
            cycle = self.cycle  # uvicorn keeps the last request's cycle until the next request's headers are in
            return cycle is None or cycle.response_complete

        def _watch(self) -> None:
            if self.transport.is_closing() or not self._waiting_for_request():
                self._stop_watch()
            elif self._deadline is None:  # armed once per wait: bytes dribbling in do not push it back
                self._deadline = self.loop.call_later(header_timeout_s, self._expired)

        def _stop_watch(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or not self._waiting_for_request():
                return
            gate.on_refuse("header_timeout")
            log.info("HTTP connection from %s closed: no complete request within %.1f s",
                     self._client_host, header_timeout_s)
            self.transport.close()

    return GuardedH11Protocol


def listen_backlog(max_connections: int) -> int:
    """The listen backlog, which is also how many connections asyncio accepts in one go before any of them is
    seen by the gate: the gate can refuse at most this many per loop turn, so it bounds the descriptors a
    connection storm holds for an instant (uvicorn's default, 2048, let 4,200 sockets pile up to 3,600)."""
    return max(16, min(128, max_connections))
