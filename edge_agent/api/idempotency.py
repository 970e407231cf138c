"""``Idempotency-Key`` on ``POST /v1/diagnose``: a retried upload is stored once and answered with the same result.

A phone that loses the connection after sending a photo cannot know whether the agent stored it. It
sends the photo again with the same key (the farmer page makes one random key per photo and keeps it
with the photo until the photo is answered). The key is journalled in the outbox with the input, in
the same transaction (``accept_input(..., idempotency_key=)``), so it survives restarts; an upload
whose key is already journalled is not read or stored again: it is answered from the first upload
(its result, or 202 while it is being diagnosed). Two uploads with one key at the same time: the
second waits for the first (at most ``wait_s``), then answers from it, or 409 ``idempotency_key_in_use``.

Keys: 1-128 characters ``[A-Za-z0-9_.:-]`` (a UUID or 32 hex digits); anything else is 400
``idempotency_key_invalid``. A key is remembered as long as its input is (``outbox`` input retention).
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import Future

from edge_agent.api.errors import RETRY_AFTER_S, ApiError
from edge_agent.flow.pipeline import PipelineOutput

HEADER = "idempotency-key"
_KEY = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")


def parse_key(value: str | None) -> str | None:
    """The key of an ``Idempotency-Key`` header value (None when absent); 400 when malformed."""
    if value is None:
        return None
    key = value.strip()
    if not _KEY.match(key):
        raise ApiError(400, "idempotency_key_invalid", "Idempotency-Key must be 1-128 characters A-Z a-z 0-9 _ . : -")
    return key


class KeyRegistry:
    """Keys whose upload is in progress in this process, and the futures of inputs still being diagnosed.

    Keys are claimed and released on the event loop only; a finished diagnosis drops its future from the
    pipeline's thread (one dict operation)."""

    def __init__(self) -> None:
        self._busy: dict[str, asyncio.Event] = {}
        self._running: dict[str, Future[PipelineOutput]] = {}

    async def claim(self, key: str, wait_s: float) -> None:
        """Wait until no other upload in this process holds ``key``, then hold it (release with :meth:`release`)."""
        while key in self._busy:
            try:
                await asyncio.wait_for(self._busy[key].wait(), wait_s)
            except asyncio.TimeoutError:
                raise ApiError(
                    409, "idempotency_key_in_use", "an upload with this Idempotency-Key is still in progress",
                    {"Retry-After": str(RETRY_AFTER_S)},
                ) from None
        self._busy[key] = asyncio.Event()

    def release(self, key: str) -> None:
        event = self._busy.pop(key, None)
        if event is not None:
            event.set()

    def track(self, input_id: str, future: Future[PipelineOutput]) -> None:
        """Remember the diagnosis of ``input_id`` until it is done, for retries that arrive meanwhile."""
        self._running[input_id] = future
        future.add_done_callback(lambda _f: self._running.pop(input_id, None))

    def running(self, input_id: str) -> Future[PipelineOutput] | None:
        return self._running.get(input_id)
