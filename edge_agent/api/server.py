"""The HTTP server: uvicorn (h11) behind a connection gate, so hostile clients cannot starve the agent.

What uvicorn alone does not bound, and this module does (the gate, the header deadline and the backlog are
``edge_agent.httpguard.gate``, shared with the coordinator's server):

- **open connections**: at most ``http.max_connections`` in all and ``http.max_connections_per_client``
  per client address. One over the cap is answered ``503 too_many_connections`` and closed at once,
  before a byte is read, so a flood of idle or half-open connections never holds more than the cap of
  file descriptors (uploads, the folder source, SQLite and MQTT keep theirs);
- **the time to send a request's headers**: a connection whose request line and headers are not
  complete ``http.header_timeout_s`` after it opened, or after its previous answer, is closed (uvicorn
  only times out a keep-alive connection that sends nothing at all; a byte now and then kept it open);
- **header size**: ``MAX_HEADER_BYTES`` (h11 answers 400 over it);
- **the accept burst**: the listen backlog (``listen_backlog``) is also how many sockets asyncio
  accepts per loop turn before the gate sees them, so it is kept small;
- **proxy headers**: believed only from ``http.trusted_proxies`` (uvicorn trusts loopback by default,
  which let any local client pick its rate-limit bucket with X-Forwarded-For).

Refusals are counted in ``edge_agent_http_refused_total{reason}`` (``too_many_connections``,
``header_timeout``); open connections are the gauge ``edge_agent_http_connections``.
"""

from __future__ import annotations

from typing import Any

import uvicorn

from edge_agent.api.errors import RETRY_AFTER_S
from edge_agent.config import HttpConfig
from edge_agent.httpguard.gate import MAX_HEADER_BYTES, ConnectionGate, guarded_protocol, listen_backlog


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
        http=guarded_protocol(gate, settings.header_timeout_s, RETRY_AFTER_S),
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
