"""Pure-ASGI middleware that runs before any body is parsed (FastAPI parses multipart bodies before
route dependencies run, so limits and authentication belong here).

Order, outermost first: :class:`SecurityHeaders` -> :class:`HostCheck` -> :class:`RateLimit` ->
:class:`Auth` -> :class:`BodyLimit` -> the application. No web framework is imported here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from edge_agent.api.errors import Message, Receive, Scope, Send, send_error
from edge_agent.auth.tokens import TokenSet

log = logging.getLogger(__name__)

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
PathRule = Callable[[str], bool]
Refusal = Callable[[str], None]
"""Called with a refusal reason (``rate_limited``, ``unauthorized``, ``body_too_large``...), for metrics."""


def _header(scope: Scope, name: bytes) -> list[bytes]:
    return [v for k, v in scope.get("headers", []) if k.lower() == name]


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _ignore(reason: str) -> None:
    return None


class HostRule:
    """Which Host header values are served. IP literals always (a page that reached the board by its address
    is no DNS-rebinding page); names when listed exactly or under a ``*.domain`` pattern; ``*``: any."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.any = "*" in names
        self.exact = frozenset(n.lower().rstrip(".") for n in names if not n.startswith("*."))
        self.suffixes = tuple(n[1:].lower().rstrip(".") for n in names if n.startswith("*."))

    @staticmethod
    def hostname(value: str) -> str:
        """The name or address of a Host header value, without port, brackets or trailing dot, lower case."""
        value = value.strip()
        if value.startswith("["):
            return value[1 : value.find("]")] if "]" in value else value[1:]
        if value.count(":") == 1:
            value = value.split(":", 1)[0]
        return value.rstrip(".").lower()

    def allows(self, value: str) -> bool:
        host = self.hostname(value)
        if self.any:
            return True
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            pass
        return host in self.exact or any(host.endswith(s) and len(host) > len(s) for s in self.suffixes)


class HostCheck:
    """Refuses a request whose Host header names a host this agent is not (DNS rebinding: a web page on
    another site re-pointing its own name at the board): 421 ``host_not_allowed``. No Host (HTTP/1.0) passes;
    two Host headers get 400."""

    def __init__(self, app: ASGIApp, *, rule: HostRule, on_refuse: Refusal = _ignore) -> None:
        self.app = app
        self.rule = rule
        self.on_refuse = on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            hosts = _header(scope, b"host")
            if len(hosts) > 1:
                await send_error(send, 400, "bad_request", "more than one Host header")
                return
            if hosts and not self.rule.allows(hosts[0].decode("latin-1")):
                self.on_refuse("host_not_allowed")
                await send_error(send, 421, "host_not_allowed", "this server does not answer for that host name")
                return
        await self.app(scope, receive, send)


CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class SecurityHeaders:
    """Adds nosniff, a strict CSP (the page needs nothing from elsewhere) and no-referrer to every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for key, value in (
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                    (b"content-security-policy", CSP.encode()),
                ):
                    if key not in present:
                        headers.append((key, value))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, add_headers)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimit:
    """Token bucket per client address on the paths ``applies`` selects: 429 with Retry-After when empty.

    ``per_minute`` tokens are added per minute up to ``burst``. At most ``max_clients`` buckets are
    kept (least recently used dropped), so memory stays bounded under address spoofing.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        per_minute: int,
        burst: int,
        applies: PathRule,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
        on_refuse: Refusal = _ignore,
    ) -> None:
        self.app = app
        self.rate = per_minute / 60.0
        self.burst = float(max(1, burst))
        self.applies = applies
        self.clock = clock
        self.max_clients = max_clients
        self.on_refuse = on_refuse
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, client: str) -> float:
        """Take one token for ``client``; 0.0 when allowed, else seconds until one is available."""
        now = self.clock()
        bucket = self._buckets.pop(client, None)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        self._buckets[client] = bucket
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.applies(scope["path"]):
            wait = self.take(_client(scope))
            if wait > 0.0:
                self.on_refuse("rate_limited")
                await send_error(
                    send, 429, "rate_limited", "too many requests; slow down",
                    {"Retry-After": str(max(1, math.ceil(wait)))},
                )
                return
        await self.app(scope, receive, send)


class Auth:
    """Bearer-token check before the body is read: 401 with ``WWW-Authenticate: Bearer`` on failure."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        tokens: TokenSet,
        public: PathRule,
        clock: Callable[[], float] = time.time,
        on_refuse: Refusal = _ignore,
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.public = public
        self.clock = clock
        self.on_refuse = on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.tokens.enabled and not self.public(scope["path"]):
            values = _header(scope, b"authorization")
            value = values[0].decode("latin-1") if len(values) == 1 else None
            verdict = self.tokens.check(value, self.clock()) if len(values) <= 1 else "invalid"
            if verdict != "ok":
                code, message = {
                    "missing": ("unauthorized", "missing bearer token"),
                    "invalid": ("unauthorized", "invalid bearer token"),
                    "expired": ("token_expired", "bearer token expired"),
                }[verdict]
                self.on_refuse(code)
                await send_error(
                    send, 401, code, message, {"WWW-Authenticate": 'Bearer realm="edge-agent"'}
                )
                return
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class BodyLimit:
    """Caps request bodies at ``max_bytes`` and their transfer time at ``timeout_s``.

    A declared Content-Length over the cap gets 413 before a byte of the body is read; a chunked
    body is counted as it streams and aborted (413, connection closed) as soon as it passes the
    cap; a body still arriving after ``timeout_s`` (slow-loris) gets 408.
    """

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, timeout_s: float, on_refuse: Refusal = _ignore
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.on_refuse = on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lengths = _header(scope, b"content-length")
        if lengths:
            if len(set(lengths)) != 1 or not lengths[0].strip().isdigit():
                await send_error(send, 400, "bad_request", "invalid Content-Length")
                return
            if int(lengths[0]) > self.max_bytes:
                self.on_refuse("body_too_large")
                await send_error(send, 413, "body_too_large", f"request body over {self.max_bytes} bytes")
                return
        received = 0
        done = False
        started = False
        deadline = time.monotonic() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, done
            if done:
                return await receive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _BodyTimeout
            try:
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError as exc:
                raise _BodyTimeout from exc
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
                if not message.get("more_body", False):
                    done = True
            else:
                done = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            self.on_refuse("body_too_large")
            log.info("request body from %s over %d bytes: aborted", _client(scope), self.max_bytes)
            if not started:
                await send_error(send, 413, "body_too_large", f"request body over {self.max_bytes} bytes")
        except _BodyTimeout:
            self.on_refuse("body_timeout")
            log.info("request body from %s not complete after %.1f s: aborted", _client(scope), self.timeout_s)
            if not started:
                await send_error(send, 408, "body_timeout", f"request body not received within {self.timeout_s:g} s")
