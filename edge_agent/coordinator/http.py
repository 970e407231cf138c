"""The coordinator's HTTP side on FastAPI: the read API, health, Prometheus metrics and the live dashboard.

``create_app(ctx)`` builds the app from an :class:`HttpContext` (the store, the coordinator's counters,
the fleet monitor, the tokens); every router is included by ``create_app`` and every route not listed
in ``PUBLIC_PATHS`` needs a bearer token when a tokens file is configured (the check is a middleware,
so a router added later, ``create_app(ctx, extra_routers=[...])``, is protected the same way).

Endpoints (docs/coordinator.md)::

    GET /healthz                 public   the process answers
    GET /readyz                  public   store readable and MQTT connected (503 and the reasons otherwise)
    GET /metrics                 token    Prometheus text (ingest rate, ack latency, devices online, ...)
    GET /api/v1/devices          token    devices with availability, backlog, site
    GET /api/v1/results          token    filters device, pipeline, label, since, until; cursor; format=csv
    GET /api/v1/alerts           token    stored alerts, newest first (state=firing|resolved)
    GET /api/v1/events           token    device events: filters device, event, pipeline, since, until; cursor
    GET /api/v1/feedback/summary token    operator feedback per device and pipeline: counts and rates in a window
    GET /api/v1/stream           token    server-sent events: the dashboard's snapshot whenever it changes
    GET /                        public   the dashboard page (no data in it; it reads the stream)

Errors are ``{"error": {"code", "message"}}`` with stable codes: ``unauthorized``, ``token_expired``,
``invalid_parameter``, ``invalid_cursor``, ``store_unavailable``, ``not_found``.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from typing import Annotated, Any, Literal

import orjson
import uvicorn
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

from edge_agent.auth.tokens import TokenSet, is_loopback
from edge_agent.coordinator.alerts import DeviceMeta
from edge_agent.coordinator.events import EventRow, event_json
from edge_agent.coordinator.monitor import FleetMonitor
from edge_agent.coordinator.store import EventQuery, ResultQuery, Store, StoredResult
from edge_agent.coordinator.summary import summarize
from edge_agent.errors import ConfigError, StorageError
from edge_agent.httpguard.gate import (
    MAX_HEADER_BYTES,
    ConnectionGate,
    ConnectionStats,
    guarded_protocol,
    listen_backlog,
)

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/favicon.ico"})
MAX_PAGE = 1000
SCAN_MAX = 20_000
"""A page with a label filter reads at most this many rows; its cursor then lets the client go on."""
RETRY_AFTER_S = 5
"""Retry-After (seconds) on 503 answers (store unavailable, a connection refused over the cap)."""
FEEDBACK_WINDOW_S = 86_400.0
"""Default window of ``/api/v1/feedback/summary`` and the dashboard's false-reject chart."""
DASHBOARD_EVENTS = ("inspection_feedback", "livestock_animal_stationary", "livestock_headcount_drop",
                    "livestock_zone_over_capacity", "storage_full", "outbox_corrupt", "publish_rejected")
"""The device events the dashboard lists (newest 20)."""
MAX_EVENT_NAMES = 20
CSV_COLUMNS = ("result_id", "device", "pipeline", "model", "model_version", "epoch", "seq", "created_at",
               "received_at", "verdict", "confidence", "labels")


@dataclass
class HttpContext:
    """What the HTTP app reads. ``status`` is the coordinator's ``snapshot()``."""

    store: Store
    status: Callable[[], dict[str, Any]]
    tokens: TokenSet = field(default_factory=TokenSet)
    monitor: FleetMonitor | None = None
    devices_meta: dict[str, DeviceMeta] = field(default_factory=dict)
    stream_interval_s: float = 1.0
    keepalive_s: float = 15.0
    clock: Callable[[], float] = time.time
    feedback_cache_s: float = 10.0
    """The dashboard recomputes the false-reject summary at most this often (it counts results in a day)."""
    connections: ConnectionStats = field(default_factory=ConnectionStats)
    """The HTTP server's connection gate: refusals by reason and open connections (``HttpServer`` fills it)."""
    _feedback: tuple[float, list[dict[str, Any]]] | None = None


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class BearerAuth:
    """Every path but ``PUBLIC_PATHS`` needs ``Authorization: Bearer <token>`` when tokens are configured."""

    def __init__(self, app: ASGIApp, *, tokens: TokenSet, clock: Callable[[], float] = time.time) -> None:
        self.app, self.tokens, self.clock = app, tokens, clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.tokens.enabled and scope["path"] not in PUBLIC_PATHS:
            values = [v for k, v in scope["headers"] if k == b"authorization"]
            verdict = self.tokens.check(values[0].decode("latin-1"), self.clock()) if len(values) == 1 else (
                "missing" if not values else "invalid")
            if verdict != "ok":
                code = "token_expired" if verdict == "expired" else "unauthorized"
                response = _error(401, code, f"{verdict} bearer token", {"WWW-Authenticate": 'Bearer realm="edge"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------------------------------- helpers
def parse_time(value: str | None, name: str) -> float | None:
    """Seconds since the epoch, or ISO 8601 (naive means UTC)."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ApiError(400, "invalid_parameter", f"{name}: expected seconds since the epoch or ISO 8601") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def encode_cursor(row: StoredResult | EventRow) -> str:
    key = [row.created_at, row.result_id] if isinstance(row, StoredResult) else [row.ts, row.event_id]
    return base64.urlsafe_b64encode(orjson.dumps(key)).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[float, str] | None:
    if not cursor:
        return None
    try:
        value = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if (isinstance(value, list) and len(value) == 2 and isinstance(value[0], int | float)
                and isinstance(value[1], str)):
            return float(value[0]), value[1]
    except (ValueError, orjson.JSONDecodeError):
        pass
    raise ApiError(400, "invalid_cursor", "cursor: not one this API returned")


def result_json(row: StoredResult) -> dict[str, Any]:
    try:
        payload = orjson.loads(row.payload)
    except orjson.JSONDecodeError:
        payload = None
    summary = summarize(payload if isinstance(payload, dict) else b"")
    return {
        "result_id": row.result_id, "device": row.device, "pipeline": row.pipeline, "model": row.model,
        "model_version": row.model_version, "epoch": row.epoch, "seq": row.seq, "created_at": row.created_at,
        "received_at": row.received_at, "verdict": summary.headline, "confidence": summary.confidence,
        "labels": sorted(summary.labels), "body": payload.get("body") if isinstance(payload, dict) else None,
    }


def scan(store: Store, query: ResultQuery, label: str | None, want: int) -> tuple[list[StoredResult], str | None]:
    """Up to ``want`` rows matching ``query`` and ``label``; the cursor to go on from (None: nothing more)."""
    out: list[StoredResult] = []
    after = query.after
    scanned = 0
    while True:
        step = min(MAX_PAGE, want - len(out)) if label is None else MAX_PAGE
        page = store.query_results(ResultQuery(query.device, query.pipeline, query.since, query.until, after,
                                               query.descending, step))
        scanned += len(page)
        for i, row in enumerate(page):
            if label is None or label in summarize(row.payload).labels:
                out.append(row)
                if len(out) == want:
                    more = i + 1 < len(page) or len(page) == step
                    return out, encode_cursor(row) if more else None
        if len(page) < step:
            return out, None
        after = (page[-1].created_at, page[-1].result_id)
        if scanned >= SCAN_MAX:
            return out, encode_cursor(page[-1])


def csv_lines(store: Store, query: ResultQuery, label: str | None, limit: int) -> Iterator[bytes]:
    """The CSV export, a page at a time (the whole result set is never in memory)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    sent = 0
    after = query.after
    while sent < limit:
        page = store.query_results(ResultQuery(query.device, query.pipeline, query.since, query.until, after,
                                               query.descending, MAX_PAGE))
        for row in page:
            summary = summarize(row.payload)
            if label is not None and label not in summary.labels:
                continue
            writer.writerow((row.result_id, row.device, row.pipeline, row.model, row.model_version, row.epoch,
                             row.seq, repr(row.created_at), repr(row.received_at), summary.headline or "",
                             "" if summary.confidence is None else summary.confidence,
                             ";".join(sorted(summary.labels))))
            sent += 1
            if sent >= limit:
                break
        yield buf.getvalue().encode()
        buf.seek(0)
        buf.truncate()
        if len(page) < MAX_PAGE:
            return
        after = (page[-1].created_at, page[-1].result_id)


def device_json(d: dict[str, Any], meta: DeviceMeta | None) -> dict[str, Any]:
    return {
        "device": d["device"], "availability": d["state"], "online": d["state"] == "online",
        "state_ts": d["state_ts"], "agent_state": d["agent_state"], "backlog": d["backlog"],
        "last_heartbeat": d["last_heartbeat"], "last_result": d["last_result"], "results": d["results"],
        "site": meta.site if meta else None, "line": meta.line if meta else None, "pen": meta.pen if meta else None,
    }


# ------------------------------------------------------------------------------------------------- metrics
_COUNTERS = (
    ("received", "edge_coordinator_messages_total", "Messages received from the broker."),
    ("inserted", "edge_coordinator_results_inserted_total", "Results stored (first time)."),
    ("duplicates", "edge_coordinator_duplicates_total", "Results already stored (at-least-once delivery)."),
    ("events_inserted", "edge_coordinator_events_inserted_total", "Device events stored (first time)."),
    ("events_duplicates", "edge_coordinator_events_duplicates_total",
     "Device events already stored (re-sent, or a livestock event and its copy in a result)."),
    ("events_skipped", "edge_coordinator_events_skipped_total",
     "Livestock entries of stored results not stored as events (malformed, too large, too many)."),
    ("dropped", "edge_coordinator_dropped_total", "Messages that could not even be quarantined."),
    ("acks_sent", "edge_coordinator_acks_sent_total", "End-to-end acks published."),
    ("store_errors", "edge_coordinator_store_errors_total", "Failed store attempts (retried with backoff)."),
)


class CoordinatorCollector:
    """Prometheus collector reading the coordinator's, the monitor's and the store's state at scrape time."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        snap = self.ctx.status()
        for key, name, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=float(snap.get(key, 0)))
        dead = CounterMetricFamily(
            "edge_coordinator_dead_letters_total", "Messages quarantined, by reason code.", labels=["reason"]
        )
        for reason, count in sorted(snap.get("dead_letter_reasons", {}).items()):
            dead.add_metric([reason], float(count))
        yield dead
        yield GaugeMetricFamily("edge_coordinator_store_up", "0 while the store is unavailable.",
                                value=1.0 if snap.get("store_ok") else 0.0)
        yield GaugeMetricFamily("edge_coordinator_mqtt_connected", "1 when connected to the broker.",
                                value=1.0 if snap.get("connected") else 0.0)
        yield GaugeMetricFamily("edge_coordinator_ingest_rate", "Results stored per second over the last minute.",
                                value=float(snap.get("ingest_rate", 0.0)))
        lat = snap.get("ack_latency")
        if lat:
            buckets = [(repr(float(b)), float(c)) for b, c in zip(lat["bounds"], lat["cumulative"], strict=False)]
            buckets.append(("+Inf", float(lat["count"])))
            yield HistogramMetricFamily("edge_coordinator_ack_latency_seconds",
                                        "From a result's batch being taken to its ack being published.",
                                        buckets=buckets, sum_value=float(lat["sum"]))
        try:
            devices = self.ctx.store.devices()
            online = sum(1 for d in devices if d["state"] == "online")
            yield GaugeMetricFamily("edge_coordinator_devices", "Devices known to the store.", value=len(devices))
            yield GaugeMetricFamily("edge_coordinator_devices_online", "Devices whose availability is online.",
                                    value=online)
        except StorageError:
            pass  # store_up says it
        refused = CounterMetricFamily("edge_coordinator_http_refused_total",
                                      "HTTP connections refused over the cap or cut at the header deadline.",
                                      labels=["reason"])
        for reason, count in sorted(self.ctx.connections.refused().items()):
            refused.add_metric([reason], float(count))
        yield refused
        yield GaugeMetricFamily("edge_coordinator_http_connections", "Open HTTP connections.",
                                value=float(self.ctx.connections.open))
        monitor = self.ctx.monitor
        if monitor is not None:
            firing = GaugeMetricFamily("edge_coordinator_alerts_firing", "Alerts firing, by rule.", labels=["rule"])
            counts: dict[str, int] = {}
            for alert in monitor.engine.active():
                counts[alert["rule"]] = counts.get(alert["rule"], 0) + 1
            for rule in ("disease_outbreak", "defect_spike", "headcount_drop", "device_offline"):
                firing.add_metric([rule], float(counts.get(rule, 0)))
            yield firing
            yield CounterMetricFamily("edge_coordinator_alerts_raised_total", "Alerts raised.",
                                      value=float(monitor.counters["alerts_fired"]))
            yield CounterMetricFamily("edge_coordinator_alert_batches_skipped_total",
                                      "Committed batches the alert rules skipped (they fell behind ingest).",
                                      value=float(monitor.counters["batches_skipped"]))


# ------------------------------------------------------------------------------------------------- routers
def ops_router(ctx: HttpContext) -> APIRouter:
    router = APIRouter(tags=["operations"])
    registry = CollectorRegistry()
    registry.register(CoordinatorCollector(ctx))

    @router.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @router.get("/readyz")
    def readyz() -> JSONResponse:
        snap = ctx.status()
        reasons = []
        if not snap.get("connected"):
            reasons.append("mqtt_disconnected")
        if not snap.get("store_ok"):
            reasons.append("store_unavailable")
        else:
            try:
                ctx.store.alerts(limit=1)  # one cheap indexed read
            except StorageError:
                reasons.append("store_unavailable")
        return JSONResponse({"ready": not reasons, "reasons": reasons}, status_code=503 if reasons else 200)

    @router.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router


def api_router(ctx: HttpContext) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["fleet"])

    @router.get("/devices")
    def devices() -> dict[str, Any]:
        return {"devices": [device_json(d, ctx.devices_meta.get(d["device"])) for d in ctx.store.devices()]}

    @router.get("/results", response_model=None)
    def results(
        request: Request,
        device: str | None = None,
        pipeline: str | None = None,
        label: str | None = None,
        since: str | None = Query(None, description="created_at >= since (epoch seconds or ISO 8601)"),
        until: str | None = Query(None, description="created_at < until"),
        cursor: str | None = None,
        limit: int = Query(100, ge=1, le=MAX_PAGE, description="Page size (JSON); rows at most (CSV, default all)"),
        order: Literal["asc", "desc"] = "asc",
        format: Literal["json", "csv"] = "json",
    ) -> dict[str, Any] | StreamingResponse:
        query = ResultQuery(device, pipeline, parse_time(since, "since"), parse_time(until, "until"),
                            decode_cursor(cursor), order == "desc", limit)
        if format == "csv":
            rows = limit if "limit" in request.query_params else 1 << 62
            return StreamingResponse(csv_lines(ctx.store, query, label, rows), media_type="text/csv; charset=utf-8",
                                     headers={"Content-Disposition": 'attachment; filename="results.csv"'})
        found, next_cursor = scan(ctx.store, query, label, limit)
        return {"results": [result_json(r) for r in found], "next_cursor": next_cursor}

    @router.get("/alerts")
    def alerts(
        state: Literal["firing", "resolved"] | None = None, limit: int = Query(100, ge=1, le=MAX_PAGE)
    ) -> dict[str, Any]:
        return {"alerts": ctx.store.alerts(state=state, limit=limit)}

    @router.get("/events")
    def events(
        device: str | None = None,
        event: Annotated[list[str] | None, Query(description="event name(s), e.g. inspection_feedback (any)")] = None,
        pipeline: str | None = None,
        since: str | None = Query(None, description="ts >= since (epoch seconds or ISO 8601)"),
        until: str | None = Query(None, description="ts < until"),
        cursor: str | None = None,
        limit: int = Query(100, ge=1, le=MAX_PAGE),
        order: Literal["asc", "desc"] = "asc",
    ) -> dict[str, Any]:
        names = tuple(event or ())
        if len(names) > MAX_EVENT_NAMES:
            raise ApiError(400, "invalid_parameter", f"event: at most {MAX_EVENT_NAMES} names")
        query = EventQuery(device, names, pipeline, parse_time(since, "since"), parse_time(until, "until"),
                           decode_cursor(cursor), order == "desc", limit + 1)
        rows = ctx.store.query_events(query)
        more = len(rows) > limit
        rows = rows[:limit]
        return {"events": [event_json(r) for r in rows], "next_cursor": encode_cursor(rows[-1]) if more else None}

    @router.get("/feedback/summary")
    def feedback_summary(
        device: str | None = None,
        since: str | None = Query(None, description="parts inspected at or after (default: until - 24 h)"),
        until: str | None = Query(None, description="parts inspected before (default: now)"),
    ) -> dict[str, Any]:
        end = parse_time(until, "until")
        end = ctx.clock() if end is None else end
        start = parse_time(since, "since")
        start = end - FEEDBACK_WINDOW_S if start is None else start
        if start >= end:
            raise ApiError(400, "invalid_parameter", "since: must be before until")
        return {"since": start, "until": end, "lines": feedback_lines(ctx, start, end, device)}

    @router.get("/stream")
    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(_events(ctx, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return router


def feedback_lines(ctx: HttpContext, since: float, until: float, device: str | None) -> list[dict[str, Any]]:
    """The store's feedback summary with each line's site and line name (``devices`` in the config)."""
    lines = ctx.store.feedback_summary(since, until, device)
    for line in lines:
        meta = ctx.devices_meta.get(line["device"])
        line["site"], line["line"] = (meta.site, meta.line) if meta else (None, None)
    return lines


def dashboard_feedback(ctx: HttpContext) -> list[dict[str, Any]]:
    """The last 24 h of feedback per line, recomputed at most every ``feedback_cache_s``."""
    now = time.monotonic()
    if ctx._feedback is None or now - ctx._feedback[0] >= ctx.feedback_cache_s:
        until = ctx.clock()
        ctx._feedback = (now, feedback_lines(ctx, until - FEEDBACK_WINDOW_S, until, None))
    return ctx._feedback[1]


def dashboard_data(ctx: HttpContext) -> dict[str, Any]:
    """The dashboard's snapshot: devices, counters, alerts, device events, latest results, charts."""
    monitor = ctx.monitor.snapshot() if ctx.monitor is not None else {"charts": {}, "latest": [], "firing": []}
    snap = ctx.status()
    events = ctx.store.query_events(EventQuery(events=DASHBOARD_EVENTS, descending=True, limit=20))
    return {
        "events": [event_json(e) for e in events],
        "feedback": dashboard_feedback(ctx),
        "devices": [device_json(d, ctx.devices_meta.get(d["device"])) for d in ctx.store.devices()],
        "counters": {k: snap.get(k) for k in ("inserted", "duplicates", "dead_letters", "store_ok", "connected")},
        "alerts": ctx.store.alerts(limit=20),
        "latest": monitor["latest"],
        "charts": monitor["charts"],
    }


async def _events(ctx: HttpContext, request: Request) -> AsyncIterator[bytes]:
    """``event: snapshot`` whenever the snapshot changed (checked every ``stream_interval_s``); keep-alives."""
    last: bytes | None = None
    quiet = 0.0
    yield b"retry: 2000\n\n"
    while not await request.is_disconnected():
        try:
            body = orjson.dumps(await run_in_threadpool(dashboard_data, ctx))
        except StorageError as exc:
            body = orjson.dumps({"error": {"code": "store_unavailable", "message": exc.message}})
        if body != last:
            yield b"event: snapshot\ndata: " + body + b"\n\n"
            last, quiet = body, 0.0
        elif quiet >= ctx.keepalive_s:
            yield b": keep-alive\n\n"
            quiet = 0.0
        await asyncio.sleep(ctx.stream_interval_s)
        quiet += ctx.stream_interval_s


def dashboard_router(ctx: HttpContext) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    page = resources.files("edge_agent.coordinator").joinpath("static").joinpath("dashboard.html").read_bytes()

    @router.get("/")
    def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store", "Content-Security-Policy": "default-src 'self'; "
                                 "script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'"})

    @router.get("/api/devices")
    def legacy_devices() -> dict[str, Any]:
        """The old stdlib dashboard's JSON (kept for scripts): devices, counters, newest dead letters."""
        return {"devices": ctx.store.devices(), "counters": ctx.status(), "dead_letters": ctx.store.dead_letters(20)}

    return router


def create_app(ctx: HttpContext, extra_routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The coordinator's app. ``extra_routers`` (e.g. bundle downloads) get the same token check and errors."""
    app = FastAPI(title="edge coordinator", version="1", docs_url="/docs", redoc_url=None)
    for router in (ops_router(ctx), api_router(ctx), dashboard_router(ctx), *extra_routers):
        app.include_router(router)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(StorageError)
    async def storage_error(request: Request, exc: StorageError) -> JSONResponse:
        log.warning("http: store unavailable: %s", exc.message)
        return _error(503, "store_unavailable", exc.message, {"Retry-After": str(RETRY_AFTER_S)})

    app.add_middleware(BearerAuth, tokens=ctx.tokens)
    app.state.ctx = ctx
    return app


class HttpServer:
    """uvicorn in a thread: ``start()`` returns once it listens (``port`` is the bound one).

    Behind the agent's connection gate (``edge_agent.httpguard.gate``): at most ``max_connections`` open in all
    and ``max_connections_per_client`` per client address (one more is answered 503 ``too_many_connections``
    and closed before a byte is read), request headers complete within ``header_timeout_s``, idle keep-alive
    connections closed after ``keepalive_timeout_s``. When ``app`` is :func:`create_app`'s, its context's
    ``connections`` gets the refusals and the open count (``/metrics``)."""

    def __init__(self, app: FastAPI, bind: str, port: int, tokens: TokenSet, *, max_connections: int = 256,
                 max_connections_per_client: int = 64, header_timeout_s: float = 10.0,
                 keepalive_timeout_s: float = 5.0) -> None:
        if not tokens.enabled and not is_loopback(bind):
            raise ConfigError(f"http.tokens_file: required when http.bind ({bind}) is not a loopback address")
        ctx = getattr(app.state, "ctx", None)
        stats = ctx.connections if isinstance(ctx, HttpContext) else ConnectionStats()
        self.gate = ConnectionGate(max_connections, max_connections_per_client, on_refuse=stats.refuse,
                                   on_change=stats.set_open)
        config = uvicorn.Config(app, host=bind, port=port, log_level="warning", lifespan="off", access_log=False,
                                timeout_graceful_shutdown=2, ws="none",
                                http=guarded_protocol(self.gate, header_timeout_s, RETRY_AFTER_S),
                                timeout_keep_alive=max(1, round(keepalive_timeout_s)),
                                h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                                backlog=listen_backlog(max_connections))
        self.server = uvicorn.Server(config)
        self.port = port
        self._thread = threading.Thread(target=self.server.run, name="coordinator-http", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError("http: the server did not start (port in use?)")
            time.sleep(0.01)
        sockets: Iterable[Any] = (s for server in self.server.servers for s in server.sockets)
        self.port = int(next(iter(sockets)).getsockname()[1])

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
