"""The HTTP server: uvicorn (h11) behind a connection gate, so hostile clients cannot starve the agent.

What uvicorn alone does not bound, and this module does:

- **open connections**: at most ``http.max_connections`` in all and ``http.max_connections_per_client``
  per client address. One over the cap is answered ``503 too_many_connections`` and closed at once,
  before a byte is read, so a flood of idle or half-open connections never holds more than the cap of
  file descriptors (uploads, the folder source, SQLite and MQTT keep theirs);
- **the time to send a request's headers**: a connection whose request line and headers are not
  complete ``http.header_timeout_s`` after it opened, or after its previous answer, is closed (uvicorn
  only times out a keep-alive connection that sends nothing at all; a byte now and then kept it open);
- **header size**: ``MAX_HEADER_BYTES`` (h11 answers 400 over it);
- **the accept burst**: the listen backlog (:func:`listen_backlog`) is also how many sockets asyncio
  accepts per loop turn before the gate sees them, so it is kept small;
- **proxy headers**: believed only from ``http.trusted_proxies`` (uvicorn trusts loopback by default,
  which let any local client pick its rate-limit bucket with X-Forwarded-For).

Refusals are counted in ``edge_agent_http_refused_total{reason}`` (``too_many_connections``,
``header_timeout``); open connections are the gauge ``edge_agent_http_connections``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from edge_agent.api.errors import RETRY_AFTER_S, error_body
from edge_agent.config import HttpConfig

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
"""Request line plus headers, at most (h11 answers 400 over it)."""


def _refusal() -> bytes:
    body = error_body("too_many_connections", "too many open connections; retry later")
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: {RETRY_AFTER_S}\r\nconnection: close\r\n\r\n"
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


def guarded_protocol(gate: ConnectionGate, header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the gate at ``connection_made`` and a deadline on request headers."""

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._client_host: str | None = None
            self._deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            peer = transport.get_extra_info("peername")
            host = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
            if not gate.admit(host):
                transport.write(_REFUSAL)
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


_REFUSAL = _refusal()


def listen_backlog(max_connections: int) -> int:
    """The listen backlog, which is also how many connections asyncio accepts in one go before any of them is
    seen by the gate: the gate can refuse at most this many per loop turn, so it bounds the descriptors a
    connection storm holds for an instant (uvicorn's default, 2048, let 4,200 sockets pile up to 3,600)."""
    return max(16, min(128, max_connections))


def make_server(app: Any, settings: HttpConfig) -> uvicorn.Server:
    """A uvicorn server for ``app`` with the agent's connection, time and proxy limits (``settings``).

    ``app.state.http_metrics`` (set by :func:`edge_agent.api.create_app`), when present, gets the refusals
    and the open-connection gauge."""
    metrics = getattr(getattr(app, "state", None), "http_metrics", None)
    gate = ConnectionGate(
        settings.max_connections,
        settings.max_connections_per_client,
        on_refuse=metrics.refuse if metrics is not None else (lambda reason: None),
        on_change=metrics.connections.set if metrics is not None else (lambda n: None),
    )
    trusted = list(settings.trusted_proxies)
    config = uvicorn.Config(
        app,
        host=settings.bind,
        port=settings.port,
        http=guarded_protocol(gate, settings.header_timeout_s),
        ws="none",
        lifespan="off",
        log_config=None,
        access_log=False,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or [],
        server_header=False,
        timeout_keep_alive=max(1, round(settings.keepalive_timeout_s)),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        backlog=listen_backlog(settings.max_connections),
    )
    return uvicorn.Server(config)
