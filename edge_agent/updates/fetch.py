"""Fetch an update file from the coordinator over the local network (the ``model_update`` command with ``url``).

The signed command names the file's sha256 and size; the bytes go to ``<drop_dir>/.fetch/<name>.<sha>.part``
(ignored by the drop-folder scan), at most ``size`` of them, resumed with an HTTP ``Range`` request after a broken
connection or a restart of the agent, then hashed: only a file with the announced sha256 is renamed into the drop
folder, where the usual path (signature, staging, smoke test, probation) takes it. A mismatch deletes the part file.
Stdlib HTTP (``urllib``): no new dependency.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import UpdateChecksumError, UpdateFetchError, UpdateTooLargeError
from edge_agent.fsutil import fsync_dir

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class FetchSpec:
    """What a ``model_update`` command asks for: save ``url``'s bytes as ``name`` if they hash to ``sha256``."""

    name: str
    url: str
    sha256: str
    size: int


def resolve_url(url: str, base: str | None) -> str:
    """``url`` itself when absolute, else resolved below ``base`` (UpdateFetchError without one). With a ``base``,
    an absolute URL must lie below it: a board configured for its coordinator fetches from nowhere else."""
    if urllib.parse.urlsplit(url).scheme in ("http", "https"):
        if base is not None and not url.startswith(base if base.endswith("/") else base + "/"):
            raise UpdateFetchError(f"update url {url!r} is not below updates.fetch_base_url {base!r}")
        return url
    if base is None:
        raise UpdateFetchError(f"relative update url {url!r} but no updates.fetch_base_url is configured")
    return urllib.parse.urljoin(base if base.endswith("/") else base + "/", url)


def fetch(spec: FetchSpec, drop_dir: Path, *, base_url: str | None, max_bytes: int, timeout_s: float = 30.0,
          attempts: int = 3, backoff_s: float = 1.0) -> Path:
    """Download ``spec`` into ``drop_dir/spec.name`` (verified); returns that path. Raises UpdateError codes
    ``update_fetch_failed``, ``update_too_large``, ``update_checksum_mismatch``; nothing lands in the drop folder then.
    """
    if spec.size > max_bytes:
        raise UpdateTooLargeError(f"update of {spec.size} bytes exceeds updates.max_update_bytes ({max_bytes})")
    url = resolve_url(spec.url, base_url)
    part_dir = drop_dir / ".fetch"
    part_dir.mkdir(parents=True, exist_ok=True)
    part = part_dir / f"{spec.name}.{spec.sha256[:16]}.part"
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            _download(url, part, spec.size, timeout_s)
            break
        except UpdateTooLargeError:
            part.unlink(missing_ok=True)
            raise
        except (OSError, http.client.HTTPException, UpdateFetchError) as exc:  # URLError is an OSError
            last = exc
            log.warning("model updates: fetch of %s failed (attempt %d of %d): %s", url, attempt, attempts, exc)
            if attempt < attempts:
                time.sleep(backoff_s * attempt)  # the fetch thread's retry pause (1 s, 2 s): the link may come back
    else:
        raise UpdateFetchError(f"cannot fetch {url}: {last}")
    digest = _sha256_of(part)
    if digest != spec.sha256:
        part.unlink(missing_ok=True)
        raise UpdateChecksumError(f"fetched {spec.name} has sha256 {digest}, the command says {spec.sha256}")
    dest = drop_dir / spec.name
    os.replace(part, dest)
    fsync_dir(drop_dir)
    log.info("model updates: fetched %s (%d bytes) from %s", spec.name, spec.size, url)
    return dest


def _download(url: str, part: Path, size: int, timeout_s: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have == size:
        return
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})  # noqa: S310
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)  # noqa: S310 - http(s) only (checked)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # our part is stale: start over next attempt
            part.unlink(missing_ok=True)
        raise UpdateFetchError(f"HTTP {exc.code} from {url}") from exc
    with response:
        start = 0
        if response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != have:
                raise UpdateFetchError(f"{url} answered a range we did not ask for")
            start = have
        elif response.status != 200:
            raise UpdateFetchError(f"HTTP {response.status} from {url}")
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and start + int(length) > size:
            raise UpdateTooLargeError(f"{url} is {start + int(length)} bytes, the command says {size}")
        with part.open("r+b" if start and part.exists() else "wb") as out:
            out.seek(start)
            out.truncate()
            written = start
            while written < size:
                chunk = response.read(min(CHUNK, size - written))
                if not chunk:
                    break
                out.write(chunk)
                written += len(chunk)
            if written == size and response.read(1):
                raise UpdateTooLargeError(f"{url} sends more than the {size} bytes the command says")
            out.flush()
            os.fsync(out.fileno())
        if written < size:
            raise UpdateFetchError(f"{url} ended after {written} of {size} bytes")


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
