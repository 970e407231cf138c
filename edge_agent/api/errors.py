"""HTTP face of edge-agent errors: status codes and the stable JSON error body.

Every error response of the API has the body ``{"error": {"code": "<stable code>", "message": "..."}}``.
This module is pure (no web framework import) so the pure-ASGI middleware can use it too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from edge_agent.errors import (
    EdgeAgentError,
    ImageEmptyError,
    ImageError,
    ImageTooLargeError,
    InputError,
    InputNotFoundError,
    OverloadedError,
    StorageError,
    StorageFullError,
    UnsupportedFormatError,
)

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Scope = MutableMapping[str, Any]

RETRY_AFTER_S = 5
"""Retry-After (seconds) on 503/507 answers."""


class ApiError(Exception):
    """An HTTP error with a stable code, raised inside the API."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


def from_agent_error(exc: EdgeAgentError) -> ApiError:
    """Map an EdgeAgentError to its HTTP status; the code is the error's own stable code."""
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(exc, ImageEmptyError):
        return ApiError(400, exc.code, exc.message)
    if isinstance(exc, UnsupportedFormatError):
        return ApiError(415, exc.code, exc.message)
    if isinstance(exc, ImageTooLargeError):
        return ApiError(413, exc.code, exc.message)
    if isinstance(exc, ImageError):
        return ApiError(422, exc.code, exc.message)
    if isinstance(exc, InputNotFoundError):
        return ApiError(410, exc.code, exc.message)
    if isinstance(exc, InputError):
        return ApiError(400, exc.code, exc.message)
    if isinstance(exc, StorageFullError):
        return ApiError(507, exc.code, exc.message, retry)
    if isinstance(exc, (StorageError, OverloadedError)):
        return ApiError(503, exc.code, exc.message, retry)
    return ApiError(500, exc.code, "internal error")


async def send_error(send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
    """Send a complete JSON error response on a raw ASGI ``send`` (used by middleware)."""
    body = error_body(code, message)
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    for key, value in (headers or {}).items():
        raw.append((key.lower().encode("latin-1"), value.encode("latin-1")))
    if status in (408, 413):  # the rest of the body will not be read: ask the server to close
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})
