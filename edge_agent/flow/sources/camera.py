"""A camera or stream source with a reconnect state machine and a latest-frame-wins drop policy.

States::

    connecting --open ok--> streaming --N failed reads--> backoff --delay--> connecting
        \\--open failed--> backoff (delay = initial * multiplier^(failures-1), capped at max)

One reader thread reads frames as fast as the camera delivers them (so no stale frames pile up in
the capture's buffer). A frame is submitted only when the pipeline has room for this source
(``max_in_flight``) and ``max_fps`` allows; every other frame is dropped and counted: the next
frame submitted is always the newest one. Camera frames are lossy by policy and not journalled.

The capture itself is behind the tiny :class:`Capture` protocol: ``sources.opencv.OpenCvCapture``
in production, :class:`SyntheticCapture` (moving shapes, scripted failures) in tests and demos.
Credentials never reach a log line: URLs are logged through :func:`redact_url`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import numpy as np

from edge_agent.config import CameraSourceConfig
from edge_agent.errors import OverloadedError
from edge_agent.flow.pipeline import InputItem, PipelineOutput
from edge_agent.flow.sources import Submit
from edge_agent.metrics import Metrics
from edge_agent.types import Image, U8Image

log = logging.getLogger(__name__)


class Capture(Protocol):
    def open(self) -> bool: ...
    def read(self) -> tuple[bool, U8Image | None]: ...
    def release(self) -> None: ...


CaptureFactory = Callable[[str], Capture]


def with_credentials(url: str, username: str | None, password: str | None) -> str:
    """Insert user name and password into a stream URL (percent-encoded)."""
    if username is None and password is None:
        return url
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = quote(username or parts.username or "", safe="")
    cred = user if password is None else f"{user}:{quote(password, safe='')}"
    return urlunsplit((parts.scheme, f"{cred}@{host}", parts.path, parts.query, parts.fragment))


def redact_url(url: str) -> str:
    """``rtsp://user:secret@host/x`` -> ``rtsp://user:***@host/x``; query values named like secrets too."""
    parts = urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        netloc = parts.netloc
    else:
        cred, _, host = parts.netloc.rpartition("@")
        user = cred.partition(":")[0]
        netloc = f"{user}:***@{host}" if ":" in cred else f"{user}@{host}"
    query = parts.query
    if query:
        pairs = []
        for pair in query.split("&"):
            key, eq, _value = pair.partition("=")
            secret = any(s in key.lower() for s in ("pass", "pwd", "token", "key", "secret", "auth"))
            pairs.append(f"{key}=***" if eq and secret else pair)
        query = "&".join(pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def backoff_delay(failures: int, initial: float, maximum: float, multiplier: float) -> float:
    """Delay before reconnect attempt number ``failures`` (1-based)."""
    return float(min(maximum, initial * multiplier ** max(failures - 1, 0)))


class CameraSource:
    """Reads one camera in a thread and feeds a pipeline with the newest frames."""

    def __init__(
        self,
        cfg: CameraSourceConfig,
        *,
        submit: Submit,
        capture_factory: CaptureFactory,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_frame: Callable[[str, U8Image], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self._on_frame = on_frame
        self.name = cfg.name
        password = cfg.password.get_secret_value() if cfg.password is not None else None
        self._url = with_credentials(cfg.url, cfg.username, password)
        self.safe_url = redact_url(self._url)
        self._submit = submit
        self._factory = capture_factory
        self._metrics = metrics
        self._clock = clock
        self._session = uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._min_interval = 1.0 / cfg.max_fps
        self._last_submit = -1e18
        self._in_flight = 0
        self.state = "stopped"
        self.frames = 0
        self.submitted = 0
        self.dropped = 0
        self.reconnects = 0
        self.failures = 0
        self.last_frame_at: float | None = None
        self.last_error: str | None = None
        self.next_retry_s: float = 0.0

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self.state = "connecting"
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def health(self) -> dict[str, Any]:
        age = None if self.last_frame_at is None else round(self._clock() - self.last_frame_at, 3)
        return {
            "type": "camera",
            "url": self.safe_url,
            "state": self.state,
            "connected": self.state == "streaming",
            "frames": self.frames,
            "submitted": self.submitted,
            "dropped": self.dropped,
            "reconnects": self.reconnects,
            "last_frame_age_s": age,
            "last_error": self.last_error,
            "next_retry_s": round(self.next_retry_s, 3) if self.state == "backoff" else None,
        }

    # --- the state machine ----------------------------------------------------------------------------------------

    def _set_up(self, up: bool) -> None:
        if self._metrics is not None:
            self._metrics.set_source_up(self.name, up)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.state = "connecting"
                try:
                    cap = self._factory(self._url)
                    opened = cap.open()
                except Exception as exc:  # adapters translate; this guards the loop whatever happens
                    opened, cap = False, None
                    self.last_error = f"open raised {type(exc).__name__}"
                if not opened or cap is None:
                    self.last_error = self.last_error or "cannot open stream"
                    self._backoff()
                    continue
                log.info("camera %s: streaming from %s", self.name, self.safe_url)
                self.state = "streaming"
                self._set_up(True)
                try:
                    self._stream(cap)
                finally:
                    self._set_up(False)
                    try:
                        cap.release()
                    except Exception:
                        log.debug("camera %s: release failed", self.name, exc_info=True)
                if not self._stop.is_set():
                    self._backoff()
        finally:
            self.state = "stopped"
            self._set_up(False)

    def _backoff(self) -> None:
        self.failures += 1
        self.reconnects += 1
        if self._metrics is not None:
            self._metrics.source_reconnect(self.name)
        delay = backoff_delay(self.failures, self.cfg.reconnect.initial_s, self.cfg.reconnect.max_s,
                              self.cfg.reconnect.multiplier)
        self.next_retry_s = delay
        self.state = "backoff"
        log.warning("camera %s: %s (%s); retry %d in %.1f s", self.name, self.last_error, self.safe_url,
                    self.failures, delay)
        self._stop.wait(delay)

    def _stream(self, cap: Capture) -> None:
        bad_reads = 0
        while not self._stop.is_set():
            try:
                ok, frame = cap.read()
            except Exception as exc:
                ok, frame = False, None
                self.last_error = f"read raised {type(exc).__name__}"
            if not ok or frame is None:
                bad_reads += 1
                if bad_reads >= self.cfg.read_failures:
                    self.last_error = self.last_error or f"{bad_reads} failed reads"
                    return
                continue
            bad_reads = 0
            self.failures = 0
            self.last_error = None
            self.frames += 1
            self.last_frame_at = self._clock()
            if self._metrics is not None:
                self._metrics.frame_read(self.name)
            if self._on_frame is not None:  # the line: newest frame for triggers, part-present detection
                try:
                    self._on_frame(self.name, frame)
                except Exception:
                    log.exception("camera %s: frame listener failed", self.name)
            if self.cfg.submit_frames:
                self._offer(frame)

    def _offer(self, frame: U8Image) -> None:
        """Submit the newest frame when allowed, otherwise drop it (counted)."""
        now = self._clock()
        with self._lock:
            room = self._in_flight < self.cfg.max_in_flight
            due = now - self._last_submit >= self._min_interval
            if not (room and due):
                self._drop("superseded")
                return
            self._in_flight += 1
            self._last_submit = now
        item = InputItem(
            input_id=f"c-{self.name}-{self._session}-{self.frames}",
            pipeline=self.cfg.pipeline,
            source=self.name,
            image=Image.from_array(frame, "BGR"),
            hints={"frame": str(self.frames), "captured_at": repr(time.time())},  # read just now: its capture time
        )
        try:
            fut = self._submit(item)
        except OverloadedError:
            with self._lock:
                self._in_flight -= 1
                self._drop("overloaded")
            return
        self.submitted += 1
        fut.add_done_callback(self._done)

    def _done(self, fut: Future[PipelineOutput]) -> None:
        with self._lock:
            self._in_flight -= 1

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        if self._metrics is not None:
            self._metrics.frame_dropped(self.name, reason)


class SyntheticCapture:
    """A fake camera: frames with a square moving left to right; scripted open and read failures.

    ``opens``: results of successive ``open()`` calls (then True forever); ``fail_reads_after``:
    after this many good frames of one connection, every read fails (the stream "dies").
    ``fps``: when set, ``read`` paces itself like a real camera does.
    """

    def __init__(
        self,
        width: int = 320,
        height: int = 240,
        *,
        opens: Sequence[bool] = (),
        fail_reads_after: int | None = None,
        fps: float | None = None,
    ) -> None:
        self.width, self.height = width, height
        self._opens = list(opens)
        self.fail_reads_after = fail_reads_after
        self.period = 1.0 / fps if fps else 0.0
        self.open_calls = 0
        self.frames_this_connection = 0
        self.total_frames = 0
        self.is_open = False

    def open(self) -> bool:
        self.open_calls += 1
        ok = self._opens.pop(0) if self._opens else True
        self.is_open = ok
        self.frames_this_connection = 0
        return ok

    def read(self) -> tuple[bool, U8Image | None]:
        if self.period:
            time.sleep(self.period)  # a camera delivers frames at its own pace
        if not self.is_open:
            return False, None
        if self.fail_reads_after is not None and self.frames_this_connection >= self.fail_reads_after:
            return False, None
        frame = np.zeros((self.height, self.width, 3), np.uint8)
        x = (self.total_frames * 8) % max(self.width - 40, 1)
        frame[100:140, x : x + 40] = (40, 160, 220)
        self.frames_this_connection += 1
        self.total_frames += 1
        return True, frame

    def release(self) -> None:
        self.is_open = False
