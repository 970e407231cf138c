"""HTTP collectors of the API on the agent's Prometheus registry, and the ASGI wrapper that feeds them.

Names::

    edge_agent_http_requests_total{route,status}   counter
    edge_agent_http_request_seconds{route}         histogram
    edge_agent_http_refused_total{reason}          counter   rate_limited|unauthorized|token_expired|body_too_large|
                                                             too_many_connections|header_timeout|host_not_allowed|...
    edge_agent_http_connections                    gauge     open HTTP connections
    edge_agent_http_uploads_total{outcome}         counter   accepted|diagnosed|pending|rejected|refused
    edge_agent_http_upload_bytes_total             counter   bytes of accepted photos
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge_agent.api.errors import Message, Receive, Scope, Send
from edge_agent.api.middleware import ASGIApp

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ROUTES = ("/", "/v1/diagnose", "/v1/models", "/healthz", "/readyz", "/metrics", "/openapi.json")


def route_label(path: str) -> str:
    """Bounded label set: known routes as-is, results and static files grouped, the rest ``other``."""
    if path in _ROUTES:
        return path
    if path.startswith("/v1/results/"):
        return "/v1/results/{id}"
    if path.startswith("/static/"):
        return "/static"
    return "other"


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "edge_agent_http_requests_total",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "edge_agent_http_request_seconds", "HTTP request duration.", ["route"], registry=registry, buckets=_BUCKETS
        )
        self.refused = Counter(
            "edge_agent_http_refused_total", "Requests refused before the app ran.", ["reason"], registry=registry
        )
        self.uploads = Counter(
            "edge_agent_http_uploads_total", "Photo uploads by outcome.", ["outcome"], registry=registry
        )
        self.upload_bytes = Counter(
            "edge_agent_http_upload_bytes_total", "Bytes of accepted photos.", registry=registry
        )
        self.connections = Gauge("edge_agent_http_connections", "Open HTTP connections.", registry=registry)

    def refuse(self, reason: str) -> None:
        self.refused.labels(reason=reason).inc()

    def upload(self, outcome: str) -> None:
        self.uploads.labels(outcome=outcome).inc()


class Telemetry:
    """Outermost ASGI wrapper: counts every answer by route and status and times it."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(scope["path"])
        status = 0
        start = time.perf_counter()

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.requests.labels(route=route, status=str(status or 500)).inc()
            self.metrics.seconds.labels(route=route).observe(time.perf_counter() - start)
