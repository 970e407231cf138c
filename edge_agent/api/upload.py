"""Receive an uploaded photo straight into the spool, durably, under a generated name.

The body (raw ``image/*`` or ``multipart/form-data``) is streamed chunk by chunk into
``<spool>/<input_id>.part``; the format is decided from the first bytes (JPEG, PNG or WebP
magic, via :func:`edge_agent.vision.decode.sniff_format`) and anything else is refused before it is
stored. :meth:`SpoolFile.commit` fsyncs the file, renames it to ``<input_id>.<ext>`` and fsyncs
the folder. Client file names are never used for anything. Pure of any web framework.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from edge_agent.api.errors import ApiError
from edge_agent.vision.decode import sniff_format

SNIFF_BYTES = 12
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
HINT_FIELDS = ("lang", "crop")
MAX_HINT_BYTES = 64
MAX_PARTS = 8
_BOUNDARY_RE = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
_HINT_RE = re.compile(r"^[\w \-]{0,64}$")


def new_input_id(prefix: str = "http") -> str:
    """A fresh, unguessable, time-ordered input id such as ``http-0192f3a1c2d4-5f1e9a0b7c3d2e11``."""
    return f"{prefix}-{time.time_ns() // 1_000_000:012x}-{secrets.token_hex(8)}"


def clean_hint(value: str | None) -> str | None:
    """A hint (``lang``, ``crop``) if it is short plain text, else None (ignored, never an error)."""
    if value is None:
        return None
    value = value.strip()
    return value if value and _HINT_RE.match(value) else None


class SpoolFile:
    """One upload being written to the spool."""

    def __init__(self, spool_dir: Path, input_id: str) -> None:
        self.spool_dir = spool_dir
        self.input_id = input_id
        self.part_path = spool_dir / f"{input_id}.part"
        self.size = 0
        self.format: str | None = None
        self._head = b""
        self._fd: int | None = os.open(self.part_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.final_path: Path | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.format is None:
            self._head += data[: SNIFF_BYTES - len(self._head)]
            if len(self._head) >= SNIFF_BYTES:
                self._decide()
        assert self._fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.size += len(data)

    def _decide(self) -> None:
        fmt = sniff_format(self._head)
        if fmt is None:
            raise ApiError(415, "image_unsupported_format", "only JPEG, PNG and WebP photos are accepted")
        self.format = fmt

    def finish(self) -> None:
        """Check the upload is a non-empty image of an allowed format (call when the body is complete)."""
        if self.size == 0:
            raise ApiError(400, "image_empty", "the photo is empty")
        if self.format is None:
            self._decide()

    def commit(self) -> Path:
        """fsync, rename to the final name and fsync the folder (blocking: run in a worker thread)."""
        assert self._fd is not None and self.format is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        final = self.spool_dir / f"{self.input_id}{EXTENSIONS[self.format]}"
        os.replace(self.part_path, final)
        dir_fd = os.open(self.spool_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.final_path = final
        return final

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for path in (self.part_path, self.final_path):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type; 400 when missing or not RFC 2046."""
    _, params = parse_options_header(content_type)
    raw = params.get(b"boundary")
    text = raw.decode("latin-1") if raw else ""
    if not _BOUNDARY_RE.match(text):
        raise ApiError(400, "multipart_invalid", "missing or invalid multipart boundary")
    return text.encode("latin-1")


class MultipartUpload:
    """Streams a ``multipart/form-data`` body: the ``image`` file part goes to ``spool``, the
    ``lang`` and ``crop`` fields are kept (64 bytes max); other parts are skipped, at most
    ``max_parts`` parts in all, exactly one ``image``."""

    def __init__(self, boundary: bytes, spool: SpoolFile, max_parts: int = MAX_PARTS) -> None:
        self.spool = spool
        self.max_parts = max_parts
        self.fields: dict[str, str] = {}
        self.parts = 0
        self.images = 0
        self.ended = False
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._target: str | None = None
        self._value = bytearray()
        callbacks: dict[str, Callable[..., None]] = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_cb,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise ApiError(400, "multipart_invalid", f"malformed multipart body: {exc}") from exc

    def finish(self) -> None:
        try:
            self._parser.finalize()
        except MultipartParseError as exc:
            raise ApiError(400, "multipart_invalid", f"malformed multipart body: {exc}") from exc
        if not self.ended:
            raise ApiError(400, "multipart_invalid", "multipart body ended early")
        if self.images != 1:
            raise ApiError(400, "image_missing", "send the photo in a multipart field named 'image'")
        self.spool.finish()

    # --- parser callbacks ---------------------------------------------------------------------------------------

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise ApiError(400, "multipart_invalid", f"more than {self.max_parts} multipart parts")
        self._headers = {}
        self._target = None
        self._value = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name = b""
        self._header_value = b""

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data":
            raise ApiError(400, "multipart_invalid", "multipart part without form-data disposition")
        name = params.get(b"name", b"").decode("latin-1")
        if name == "image":
            self.images += 1
            if self.images > 1:
                raise ApiError(400, "multipart_invalid", "more than one 'image' part")
            self._target = "image"
        elif name in HINT_FIELDS and b"filename" not in params:
            self._target = name
        else:
            self._target = None  # skipped

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._target == "image":
            self.spool.write(data[start:end])
        elif self._target is not None:
            self._value += data[start:end]
            if len(self._value) > MAX_HINT_BYTES:
                raise ApiError(400, "multipart_invalid", f"field {self._target!r} over {MAX_HINT_BYTES} bytes")

    def _part_end(self) -> None:
        if self._target in HINT_FIELDS:
            self.fields[self._target] = bytes(self._value).decode("utf-8", "replace")
        self._target = None

    def _end(self) -> None:
        self.ended = True
