"""API tokens: parsed from a file, compared in constant time.

File format, one token per line, ``#`` starts a comment::

    3f9c...e1            # never expires
    77ab...90  2027-01-31T00:00:00Z   # expires then (ISO 8601; a bare date means 00:00 UTC)

Tokens must be at least 16 characters. Only their SHA-256 digests are kept in memory, and a
presented token is compared against every digest with :func:`hmac.compare_digest` (no early exit).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from edge_agent.config import is_loopback
from edge_agent.errors import ConfigError

MIN_TOKEN_CHARS = 16
Verdict = Literal["ok", "missing", "invalid", "expired"]


@dataclass(frozen=True)
class _Token:
    digest: bytes
    expires_at: float | None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _parse_expiry(text: str, where: str) -> float:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"{where}: bad expiry {text!r} (use ISO 8601, e.g. 2027-01-31T00:00:00Z)") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


@dataclass(frozen=True)
class TokenSet:
    """The accepted bearer tokens (possibly none: then auth is off)."""

    tokens: tuple[_Token, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    @classmethod
    def parse(cls, text: str, source: str = "tokens") -> TokenSet:
        out: list[_Token] = []
        for n, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            where = f"{source}: line {n}"
            if len(parts) > 2:
                raise ConfigError(f"{where}: expected '<token> [expiry]'")
            if len(parts[0]) < MIN_TOKEN_CHARS:
                raise ConfigError(f"{where}: token shorter than {MIN_TOKEN_CHARS} characters")
            expires = _parse_expiry(parts[1], where) if len(parts) == 2 else None
            out.append(_Token(_digest(parts[0]), expires))
        if not out:
            raise ConfigError(f"{source}: no tokens")
        return cls(tuple(out))

    @classmethod
    def load(cls, path: Path) -> TokenSet:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read tokens file: {exc}") from exc
        return cls.parse(text, str(path))

    def check(self, authorization: str | None, now: float) -> Verdict:
        """Verdict for an ``Authorization`` header value (``Bearer <token>``)."""
        if not authorization:
            return "missing"
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return "invalid"
        digest = _digest(presented.strip())
        match: _Token | None = None
        for token in self.tokens:  # every digest is compared: timing does not depend on which one matches
            if hmac.compare_digest(digest, token.digest):
                match = token
        if match is None:
            return "invalid"
        if match.expires_at is not None and now >= match.expires_at:
            return "expired"
        return "ok"


__all__ = ["MIN_TOKEN_CHARS", "TokenSet", "Verdict", "is_loopback"]
