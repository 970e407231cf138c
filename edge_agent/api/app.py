"""The FastAPI application: ``create_app(ctx) -> FastAPI``. The one module that imports FastAPI/Starlette
(with ``__init__``); everything that must run before a body is parsed is pure ASGI in ``middleware``.

Routes: ``POST /v1/diagnose``, ``POST /v1/line/trigger``, ``GET /v1/results/{id}``, ``POST /v1/feedback``,
``GET /v1/models``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``, the farmer page at ``/`` and its files
under ``/static/``.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from edge_agent import __version__
from edge_agent.api import idempotency
from edge_agent.api.context import ApiContext
from edge_agent.api.errors import RETRY_AFTER_S, ApiError, error_body, from_agent_error
from edge_agent.api.middleware import Auth, BodyLimit, HostCheck, HostRule, RateLimit, SecurityHeaders
from edge_agent.api.present import present
from edge_agent.api.schemas import (
    DiagnosisResponse,
    ErrorBody,
    FeedbackRequest,
    FeedbackResponse,
    Health,
    ModelInfo,
    ModelsResponse,
    PendingResponse,
    Ready,
)
from edge_agent.api.telemetry import HttpMetrics, Telemetry
from edge_agent.api.upload import MultipartUpload, SpoolFile, clean_hint, multipart_boundary, new_input_id
from edge_agent.auth.tokens import TokenSet, is_loopback
from edge_agent.config import HttpConfig
from edge_agent.errors import (
    ConfigError,
    EdgeAgentError,
    FeedbackConflictError,
    FeedbackError,
    FeedbackGoneError,
    FeedbackUnknownError,
    InputError,
    NoFrameError,
    OverloadedError,
)
from edge_agent.flow.pipeline import InputItem, PipelineOutput
from edge_agent.sectors.advice import AdviceBook, load_advice

log = logging.getLogger(__name__)

RAW_TYPES = ("image/jpeg", "image/png", "image/webp", "application/octet-stream")
PUBLIC_PATHS = frozenset({"/", "/sw.js", "/healthz", "/readyz", "/openapi.json", "/favicon.ico"})
SHELL_FILES = ("index.html", "app.css", "i18n.js", "app.js", "icon.svg", "manifest.webmanifest", "icon-192.png")
"""The page shell the service worker keeps (``web/static/sw.js`` lists the same files by URL)."""
_ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"


def static_dir() -> Path:
    """The farmer page's files, shipped inside the package."""
    return Path(str(resources.files("edge_agent").joinpath("web").joinpath("static")))


def service_worker(page_dir: Path) -> bytes:
    """``sw.js`` with its cache version: a hash of the shell files, so any change to the page renews the cache."""
    digest = hashlib.sha256()
    for name in SHELL_FILES:
        digest.update(name.encode() + b"\0" + (page_dir / name).read_bytes())
    return (page_dir / "sw.js").read_bytes().replace(b"__VERSION__", digest.hexdigest()[:16].encode())


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith("/static/")


LINE_TRIGGER = "/v1/line/trigger"
LINE_ANSWER_S = 75.0


def is_limited(path: str) -> bool:
    """Paths under the per-client rate limit: a line's trigger is not (a PLC triggers several parts a second; it
    still needs a token, and a flood meets the bounded queue: each refused part gets its fail-safe)."""
    return (path.startswith("/v1/") and path != LINE_TRIGGER) or path == "/metrics"


def _err(status: int, code: str, message: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": f"{code}: {message}"}}


def _errors(*rows: tuple[int, str, str]) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for status, code, message in rows:
        if status in out:
            out[status]["description"] += f"; {code}: {message}"
        else:
            out.update(_err(status, code, message))
    return out


_COMMON = (
    (401, "unauthorized", "missing or invalid bearer token (token_expired when expired)"),
    (429, "rate_limited", "too many requests from this client; see Retry-After"),
)
_DIAGNOSE_BODY: dict[str, Any] = {
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "pattern": r"^[A-Za-z0-9_.:\-]{1,128}$"},
            "description": "One random key per photo, the same on every retry: a retried upload is stored once and "
            "answered with the first one's result (header Idempotent-Replayed: true).",
        }
    ],
    "requestBody": {
        "required": True,
        "description": "The photo: a multipart form with an `image` file (and optional `lang`, `crop` fields), "
        "or the raw image bytes. Only JPEG, PNG and WebP, decided from the bytes.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "The leaf photo."},
                        "lang": {"type": "string", "maxLength": 64, "description": "Language, e.g. sw or fr-FR."},
                        "crop": {"type": "string", "maxLength": 64, "description": "What the farmer says the crop is."},
                    },
                }
            },
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in RAW_TYPES},
        },
    }
}


class _Uploads:
    """Uploads in progress (the event loop is single-threaded: a plain counter is enough)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0


def create_app(ctx: ApiContext) -> FastAPI:
    """Build the API for ``ctx``. Raises ConfigError for an unusable HTTP configuration."""
    settings = ctx.settings
    tokens = TokenSet.load(settings.tokens_file) if settings.tokens_file is not None else TokenSet()
    if not tokens.enabled and not is_loopback(settings.bind):
        raise ConfigError(f"http.tokens_file: required when http.bind ({settings.bind}) is not a loopback address")
    book = ctx.advice if ctx.advice is not None else load_advice()
    _warn_missing_advice(ctx, book)
    registry = ctx.registry if ctx.registry is not None else CollectorRegistry()
    metrics = HttpMetrics(registry)
    uploads = _Uploads(settings.max_concurrent_uploads)
    keys = idempotency.KeyRegistry()
    default_lang = settings.default_language

    app = FastAPI(
        title="edge-agent",
        version=__version__,
        summary="Photo diagnosis for farmers, from an edge device that works without the internet.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    bearer = Security(HTTPBearer(auto_error=False, description="API token (optional when bound to loopback)."))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return Response(error_body(exc.code, exc.message), exc.status, exc.headers, "application/json")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        return Response(error_body(code, str(exc.detail)), exc.status_code, dict(exc.headers or {}), "application/json")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return Response(
            error_body("request_invalid", f"{where}: {first.get('msg', 'invalid')}"), 422, None, "application/json"
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return Response(error_body("internal_error", "internal error"), 500, None, "application/json")

    # --- upload ---------------------------------------------------------------------------------------------------

    async def receive_photo(request: Request) -> tuple[SpoolFile, dict[str, str]]:
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        boundary = multipart_boundary(content_type) if media == "multipart/form-data" else None
        if boundary is None and media not in RAW_TYPES:
            raise ApiError(415, "unsupported_media_type", "send multipart/form-data or image/jpeg|png|webp")
        try:
            await run_in_threadpool(ctx.outbox.check_capacity)
        except EdgeAgentError as exc:
            raise from_agent_error(exc) from exc
        try:
            spool = SpoolFile(ctx.spool_dir, new_input_id(ctx.source))
        except OSError as exc:
            raise _storage_error(exc) from exc
        try:
            reader = MultipartUpload(boundary, spool) if boundary is not None else None
            async for chunk in request.stream():
                if reader is not None:
                    reader.feed(chunk)
                else:
                    spool.write(chunk)
            if reader is not None:
                reader.finish()
            else:
                spool.finish()
            await run_in_threadpool(spool.commit)
        except ClientDisconnect as exc:
            spool.discard()
            raise ApiError(400, "client_disconnected", "the upload was interrupted") from exc
        except OSError as exc:
            spool.discard()
            raise _storage_error(exc) from exc
        except BaseException:
            spool.discard()
            raise
        return spool, (reader.fields if reader is not None else {})

    async def submit_waiting(item: InputItem) -> Future[PipelineOutput]:
        deadline = time.monotonic() + settings.queue_wait_s
        delay = 0.02
        while True:
            try:
                return ctx.submit(item)
            except OverloadedError:
                if time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)  # bounded wait for room in the pipeline queue
            delay = min(delay * 2, 0.25)

    @app.post(
        "/v1/diagnose",
        summary="Diagnose a leaf photo",
        description="Stores the photo durably, runs it through the crop pipeline (so the result also goes to "
        "the outbox and MQTT) and answers with the diagnosis, confidence, top 3 and advice in `lang`. "
        "If the diagnosis takes longer than the server's result timeout the answer is 202 with where to poll.",
        response_model=DiagnosisResponse,
        responses={
            202: {"model": PendingResponse, "description": "Accepted; the result is not ready yet."},
            **_errors(
                (400, "image_empty", "empty photo"),
                (400, "image_missing", "no 'image' part"),
                (400, "multipart_invalid", "malformed or hostile multipart body"),
                (408, "body_timeout", "the body arrived too slowly"),
                (413, "body_too_large", "body over the size limit"),
                (413, "image_too_large", "too many pixels"),
                (415, "image_unsupported_format", "not JPEG, PNG or WebP"),
                (415, "unsupported_media_type", "wrong Content-Type"),
                (400, "idempotency_key_invalid", "malformed Idempotency-Key"),
                (409, "idempotency_key_in_use", "an upload with this Idempotency-Key is still in progress"),
                (421, "host_not_allowed", "the Host header names a host this agent is not"),
                (422, "image_invalid", "corrupt or truncated image"),
                (422, "input_rejected", "retry (same Idempotency-Key) of an upload that was refused"),
                (503, "overloaded", "too busy; see Retry-After"),
                (507, "storage_full", "no room to store the photo; see Retry-After"),
                *_COMMON,
            ),
        },
        openapi_extra=_DIAGNOSE_BODY,
        dependencies=[bearer],
    )
    async def diagnose(
        request: Request,
        lang: str | None = Query(None, max_length=64, description="Language of the answer, e.g. sw, fr-FR."),
        crop: str | None = Query(None, max_length=64, description="What the farmer says the crop is, e.g. Bean."),
    ) -> Response:
        if uploads.active >= uploads.limit:
            metrics.upload("refused")
            raise ApiError(503, "overloaded", "too many uploads in progress", {"Retry-After": str(RETRY_AFTER_S)})
        uploads.active += 1
        try:
            return await _diagnose(request, lang, crop)
        finally:
            uploads.active -= 1

    async def _diagnose(request: Request, lang: str | None, crop: str | None) -> Response:
        key = idempotency.parse_key(request.headers.get(idempotency.HEADER))
        if key is None:
            return await _store(request, lang, crop, None)
        await keys.claim(key, settings.result_timeout_s)
        try:
            existing = await run_in_threadpool(ctx.outbox.input_for_key, key)
            if existing is not None:  # a retry of an upload already stored: answer from it, store nothing
                metrics.upload("replayed")
                response = await _answer_stored(request, existing, lang, keys.running(existing))
                response.headers["Idempotent-Replayed"] = "true"
                return response
            return await _store(request, lang, crop, key)
        finally:
            keys.release(key)

    async def _answer_stored(
        request: Request, input_id: str, lang: str | None, running: Future[PipelineOutput] | None
    ) -> Response:
        """The answer for an input stored earlier: its result, 202 while it is diagnosed, or why it was refused."""
        if running is not None:
            waiter = asyncio.wrap_future(running)
            await asyncio.wait({waiter}, timeout=settings.result_timeout_s)  # never cancels the input
        try:
            stored, state = await run_in_threadpool(_lookup, input_id)
        except EdgeAgentError as exc:
            raise from_agent_error(exc) from exc
        if stored is not None:
            chosen = lang or request.headers.get("accept-language") or default_lang
            return JSONResponse(present(stored, book, chosen).model_dump(mode="json"))
        if state == "pending":
            location = f"/v1/results/{input_id}"
            return JSONResponse(PendingResponse(input_id=input_id, location=location).model_dump(), 202,
                                {"Location": location})
        if state == "rejected":
            raise ApiError(422, "input_rejected", "this upload was refused; take a new photo")
        raise ApiError(404, "not_found", "no such result")

    def _lookup(result_id: str) -> tuple[Any, str | None]:
        stored = ctx.outbox.get_result(result_id) or ctx.outbox.get_result_by_input(result_id)
        return stored, (None if stored is not None else ctx.outbox.input_state(result_id))

    async def _store(request: Request, lang: str | None, crop: str | None, key: str | None) -> Response:
        spool, fields = await receive_photo(request)
        hints = {
            key: value
            for key, value in (
                ("lang", clean_hint(fields.get("lang") or lang)),
                ("crop", clean_hint(fields.get("crop") or crop)),
            )
            if value
        }
        path = str(spool.final_path)
        meta = {"bytes": spool.size, "format": spool.format, "hints": hints}
        try:
            journalled = await run_in_threadpool(
                lambda: ctx.outbox.accept_input(
                    spool.input_id, source=ctx.source, pipeline=ctx.pipeline, spool_path=path, meta=meta,
                    idempotency_key=key,
                )
            )
        except EdgeAgentError as exc:
            spool.discard()
            raise from_agent_error(exc) from exc
        if not journalled:  # the key was journalled meanwhile (another process on this outbox): answer from it
            spool.discard()
            existing = await run_in_threadpool(ctx.outbox.input_for_key, key) if key is not None else None
            if existing is None:
                raise ApiError(503, "storage_error", "cannot store the photo now", {"Retry-After": str(RETRY_AFTER_S)})
            return await _answer_stored(request, existing, lang, None)
        metrics.upload("accepted")
        metrics.upload_bytes.inc(spool.size)
        item = InputItem(
            input_id=spool.input_id, pipeline=ctx.pipeline, source=ctx.source, spool_path=path, hints=hints
        )
        try:
            future = await submit_waiting(item)
        except OverloadedError as exc:
            await run_in_threadpool(ctx.outbox.reject_input, spool.input_id, exc.code, exc.message)
            spool.discard()
            metrics.upload("refused")
            raise from_agent_error(exc) from exc
        future.add_done_callback(_spool_cleanup(spool))
        if key is not None:
            keys.track(spool.input_id, future)
            keys.release(key)  # journalled: a retry now finds the key in the outbox and waits on this future
        waiter = asyncio.wrap_future(future)
        done, _ = await asyncio.wait({waiter}, timeout=settings.result_timeout_s)  # never cancels the input
        if not done:
            metrics.upload("pending")
            location = f"/v1/results/{spool.input_id}"
            body = PendingResponse(input_id=spool.input_id, location=location)
            return JSONResponse(body.model_dump(), 202, {"Location": location})
        failure = waiter.exception()
        if failure is not None:
            metrics.upload("rejected")
            if isinstance(failure, EdgeAgentError):
                raise from_agent_error(failure) from failure
            raise failure
        metrics.upload("diagnosed")
        output = waiter.result()
        answer = present(
            output.stored, book, hints.get("lang") or request.headers.get("accept-language") or default_lang
        )
        return JSONResponse(answer.model_dump(mode="json"))

    # --- the line ---------------------------------------------------------------------------------------------------

    @app.post(
        LINE_TRIGGER,
        summary="Trigger the inspection of one part on the line",
        description="Inspects a part with a recipe (docs/agent.md#the-line): the image is the request body (raw "
        "JPEG, PNG or WebP), or, with an empty body, the newest frame of the recipe's camera. Answers once the "
        "decision is signalled on the recipe's outputs, which is by the recipe's deadline: the verdict, or the "
        "fail-safe (fail_safe: true, with its cause).",
        responses=_errors(
            (400, "recipe_unknown", "no such recipe (and no default_recipe)"),
            (404, "line_disabled", "no line recipes are configured"),
            (409, "no_frame", "no image in the body and the recipe's camera has no frame yet"),
            (413, "image_too_large", "too many pixels"),
            (415, "image_unsupported_format", "not JPEG, PNG or WebP"),
            (422, "image_invalid", "corrupt or truncated image"),
            *_COMMON,
        ),
        dependencies=[bearer],
    )
    async def line_trigger(
        request: Request,
        recipe: str | None = Query(None, pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$", description="Recipe id."),
        part_id: str | None = Query(None, pattern=_ID_PATTERN, max_length=64, description="The line's part id."),
    ) -> Response:
        trigger = ctx.line_trigger
        if trigger is None:
            raise ApiError(404, "line_disabled", "no line recipes are configured on this agent")
        data = await request.body()  # bounded by http.max_body_bytes (BodyLimit)
        try:
            decision = await run_in_threadpool(
                lambda: trigger(recipe, part_id, data=data or None, source="http")
            )
            settled = await asyncio.wait_for(asyncio.wrap_future(decision), LINE_ANSWER_S)
        except TimeoutError as exc:  # a decision comes by the deadline (at most 60 s); only a stopping agent is late
            raise ApiError(503, "overloaded", "no decision in time", {"Retry-After": str(RETRY_AFTER_S)}) from exc
        except NoFrameError as exc:
            raise ApiError(409, exc.code, exc.message) from exc
        except EdgeAgentError as exc:
            raise from_agent_error(exc) from exc
        return JSONResponse(settled.to_dict())

    # --- reading --------------------------------------------------------------------------------------------------

    @app.get(
        "/v1/results/{result_id}",
        summary="A stored diagnosis, by result id or upload (input) id",
        response_model=DiagnosisResponse,
        responses={
            202: {"model": PendingResponse, "description": "Accepted, not diagnosed yet."},
            **_errors(
                (404, "not_found", "unknown id, or already delivered and pruned"),
                (422, "input_rejected", "the upload was refused (bad image)"),
                *_COMMON,
            ),
        },
        dependencies=[bearer],
    )
    async def get_result(
        request: Request,
        result_id: str = PathParam(pattern=_ID_PATTERN, description="Result id or input id."),
        lang: str | None = Query(None, max_length=64, description="Language of the answer."),
    ) -> Response:
        try:
            stored, state = await run_in_threadpool(_lookup, result_id)
        except EdgeAgentError as exc:
            raise from_agent_error(exc) from exc
        if stored is not None:
            chosen = lang or request.headers.get("accept-language") or default_lang
            return JSONResponse(present(stored, book, chosen).model_dump(mode="json"))
        if state == "pending":
            location = f"/v1/results/{result_id}"
            return JSONResponse(PendingResponse(input_id=result_id, location=location).model_dump(), 202)
        if state == "rejected":
            raise ApiError(422, "input_rejected", "this upload was refused; take a new photo")
        raise ApiError(404, "not_found", "no such result")

    @app.post(
        "/v1/feedback",
        summary="Operator feedback on an inspected part",
        description="Says that a rejected part was good (`false_reject`) or a passed part had a defect "
        "(`missed_defect`). The part's image (kept for the last `inspection.keep_images` parts) is stored under "
        "`<state_dir>/feedback/<pipeline>/<kind>/` with what the agent knew, and an `inspection_feedback` event goes "
        "to the coordinator. The same feedback again is stored once (200, `stored: false`); a different kind "
        "replaces the earlier one. `edge-agent inspect fit --add` refits the model with the confirmed good parts.",
        response_model=FeedbackResponse,
        status_code=201,
        responses={
            200: {"model": FeedbackResponse, "description": "This feedback was stored before; nothing changed."},
            **_errors(
                (404, "feedback_unknown_result", "no inspected part has this result, input or part id"),
                (404, "feedback_unavailable", "no pipeline of this agent keeps images for feedback"),
                (409, "feedback_kind_mismatch", "false_reject on a part that passed, or missed_defect on one that "
                 "failed"),
                (410, "feedback_image_gone", "the part is known but its image is no longer kept"),
                (422, "request_invalid", "bad JSON, unknown kind, id or text out of bounds"),
                (507, "storage_full", "no room to store it; see Retry-After"),
                *_COMMON,
            ),
        },
        dependencies=[bearer],
    )
    async def feedback(body: FeedbackRequest) -> Response:
        if ctx.feedback is None:
            raise ApiError(404, "feedback_unavailable",
                           "no pipeline of this agent keeps images for feedback (inspection.keep_images)")
        store = ctx.feedback
        try:
            outcome = await run_in_threadpool(
                lambda: store(body.result_id, body.kind, operator=body.operator, note=body.note, via="http"))
        except FeedbackError as exc:
            status = (404 if isinstance(exc, FeedbackUnknownError) else 410 if isinstance(exc, FeedbackGoneError)
                      else 409 if isinstance(exc, FeedbackConflictError) else 422)
            raise ApiError(status, exc.code, exc.message) from exc
        except EdgeAgentError as exc:
            raise from_agent_error(exc) from exc
        answer = FeedbackResponse.model_validate(outcome)
        return JSONResponse(answer.model_dump(mode="json"), 201 if outcome["stored"] else 200)

    @app.get(
        "/v1/models",
        summary="Loaded models",
        response_model=ModelsResponse,
        responses=_errors(*_COMMON),
        dependencies=[bearer],
    )
    async def models() -> ModelsResponse:
        return ModelsResponse(
            models=[ModelInfo.model_validate(dict(m)) for m in ctx.models()],
            upload_pipeline=ctx.pipeline,
            languages=list(book.languages),
        )

    @app.get("/healthz", summary="Liveness", response_model=Health)
    async def healthz() -> Health:
        return Health()

    @app.get(
        "/readyz",
        summary="Readiness: models loaded and warmed up",
        response_model=Ready,
        responses=_errors((503, "not_ready", "models are still loading or warming up")),
    )
    async def readyz() -> Response:
        if ctx.is_ready():
            return JSONResponse(Ready(status="ready").model_dump())
        raise ApiError(503, "not_ready", "models are still loading or warming up", {"Retry-After": "2"})

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={
            200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."},
            **_errors(*_COMMON),
        },
        dependencies=[bearer],
    )
    async def prometheus() -> Response:
        data = await run_in_threadpool(generate_latest, registry)
        return Response(data, 200, None, CONTENT_TYPE_LATEST)

    # --- the farmer page ------------------------------------------------------------------------------------------

    page_dir = static_dir()

    worker_js = service_worker(page_dir)

    @app.get("/", summary="The farmer page", response_class=FileResponse, include_in_schema=True)
    async def index() -> FileResponse:
        return FileResponse(page_dir / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/sw.js", summary="The farmer page's service worker (scope /)", include_in_schema=False)
    async def sw() -> Response:
        # no-cache: the browser checks for a new worker on every visit; at the site root its scope is the whole page
        headers = {"Cache-Control": "no-cache", "Service-Worker-Allowed": "/"}
        return Response(worker_js, 200, headers, "text/javascript; charset=utf-8")

    app.mount("/static", StaticFiles(directory=page_dir), name="static")

    # outermost last: Telemetry -> SecurityHeaders -> HostCheck -> RateLimit -> Auth -> BodyLimit -> app
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s, on_refuse=metrics.refuse
    )
    app.add_middleware(Auth, tokens=tokens, public=is_public, on_refuse=metrics.refuse)
    app.add_middleware(
        RateLimit,
        per_minute=settings.rate_limit_per_minute,
        burst=settings.rate_limit_burst,
        applies=is_limited,
        on_refuse=metrics.refuse,
    )
    app.add_middleware(HostCheck, rule=HostRule(allowed_hosts(settings)), on_refuse=metrics.refuse)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(Telemetry, metrics=metrics)
    app.state.advice = book
    app.state.http_metrics = metrics
    return app


def allowed_hosts(settings: HttpConfig) -> tuple[str, ...]:
    """``http.allowed_hosts``, or by default: localhost, this machine's host name and ``<hostname>.local``."""
    if settings.allowed_hosts is not None:
        return settings.allowed_hosts
    name = socket.gethostname().lower().rstrip(".")
    short = name.split(".", 1)[0]
    return tuple(dict.fromkeys(n for n in ("localhost", name, short, f"{short}.local") if n))


def _warn_missing_advice(ctx: ApiContext, book: AdviceBook) -> None:
    """Log (once, at start) crop labels of the loaded models that have no advice: farmers would see the raw label."""
    labels = {str(x) for m in ctx.models() for x in m.get("labels", ()) if "___" in str(x)}
    gaps = [g for g in book.missing(sorted(labels)) if not g.split(": ", 1)[1].startswith("crop ")]
    if gaps:
        log.warning("advice missing for %d label/language pairs, e.g. %s", len(gaps), ", ".join(gaps[:5]))


def _storage_error(exc: OSError) -> ApiError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ApiError(507, "storage_full", "no room to store the photo", {"Retry-After": str(RETRY_AFTER_S)})
    log.error("spool write failed: %s", exc)
    return ApiError(503, "storage_error", "cannot store the photo now", {"Retry-After": str(RETRY_AFTER_S)})


def _spool_cleanup(spool: SpoolFile) -> Callable[[Future[PipelineOutput]], None]:
    """Delete the spooled photo once its result (or its rejection) is journalled; keep it for a retry otherwise."""

    def done(future: Future[PipelineOutput]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None or isinstance(exc, InputError):
            spool.discard()

    return done


__all__ = ["AdviceBook", "ApiContext", "create_app"]
