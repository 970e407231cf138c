"""Signed control messages: Ed25519 over canonical JSON, for acks, commands and results. Pure: no I/O.

A signed payload is the ordinary JSON object with one more field::

    "sig": {"algorithm": "ed25519", "key_id": "<16 hex>", "signature": "<base64 of 64 bytes>"}

The signature covers every other field: the canonical JSON (``updates.format.canonical_json``: sorted keys, no
whitespace, ASCII) of the object as the receiver decodes it from the wire (so NaN, which goes out as ``null``,
is signed as ``null``). Acks and commands also carry ``ts`` and ``exp`` (seconds since the Unix epoch, UTC): a
signed one is refused once ``exp`` has passed, or while ``ts`` lies in the future, each by more than the allowed
clock skew.

Keys are the PEM files of signed model updates (``edge-agent models keygen``), loaded by ``updates.keys``; key ids
are ``updates.format.key_id``. Who signs what (docs/mqtt.md): the coordinator signs acks, an operator signs
commands, a device may sign its results.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.errors import EdgeAgentError
from edge_agent.updates.format import canonical_json, key_id

SIG_FIELD = "sig"
_KEY_ID_LEN = 16


class AuthError(EdgeAgentError):
    """A control message that may not be trusted. ``reason``: unsigned | untrusted_key | bad_signature | expired |
    from_future | too_long; callers prefix it with what was refused (``ack_expired``, ``command_unsigned``...)."""

    code = "auth_failed"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def signing_bytes(payload: Mapping[str, Any]) -> bytes:
    """The exact bytes a signature covers: every field but ``sig``, as canonical JSON of the wire form."""
    body = {k: v for k, v in payload.items() if k != SIG_FIELD}
    return canonical_json(orjson.loads(orjson.dumps(body)))


def sign(payload: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """``payload`` plus its ``sig`` field (any previous ``sig`` is replaced)."""
    signature = key.sign(signing_bytes(payload))
    body = {k: v for k, v in payload.items() if k != SIG_FIELD}
    body[SIG_FIELD] = {
        "algorithm": "ed25519",
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    return body


def verify(payload: Mapping[str, Any], trusted: Mapping[str, Ed25519PublicKey]) -> str:
    """Check ``payload``'s signature against the trusted keys (by key id); returns the key id.

    Raises AuthError ``unsigned`` (no ``sig``), ``untrusted_key`` (a key not in ``trusted``) or ``bad_signature``
    (malformed, or not matching the payload).
    """
    sig = payload.get(SIG_FIELD)
    if sig is None:
        raise AuthError("unsigned", "not signed")
    if (
        not isinstance(sig, dict)
        or sig.get("algorithm") != "ed25519"
        or not isinstance(sig.get("key_id"), str)
        or not isinstance(sig.get("signature"), str)
        or set(sig) != {"algorithm", "key_id", "signature"}
    ):
        raise AuthError("bad_signature", "malformed sig: expected {algorithm: ed25519, key_id, signature}")
    kid: str = sig["key_id"][:_KEY_ID_LEN]
    try:
        signature = base64.b64decode(sig["signature"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AuthError("bad_signature", "sig.signature is not base64") from exc
    key = trusted.get(kid)
    if key is None:
        raise AuthError("untrusted_key", f"signed by key {kid!r}, which is not among the {len(trusted)} trusted keys")
    try:
        key.verify(signature, signing_bytes(payload))
    except InvalidSignature as exc:
        raise AuthError("bad_signature", f"the signature of key {kid} does not match the payload") from exc
    return kid


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def check_lifetime(payload: Mapping[str, Any], *, now: float, skew_s: float, max_ttl_s: float | None = None) -> None:
    """Refuse a signed payload outside its ``ts``..``exp`` window (with ``skew_s`` of slack either side).

    Raises AuthError ``expired`` (``exp`` missing or past), ``from_future`` (``ts`` missing or ahead of ``now``) or
    ``too_long`` (``exp - ts`` above ``max_ttl_s``).
    """
    ts, exp = _seconds(payload.get("ts")), _seconds(payload.get("exp"))
    if exp is None or now > exp + skew_s:
        raise AuthError("expired", f"expired (exp {payload.get('exp')!r}, now {now:.0f}); check both clocks")
    if ts is None or ts > now + skew_s:
        raise AuthError("from_future", f"ts {payload.get('ts')!r} is ahead of this clock ({now:.0f}): check both")
    if max_ttl_s is not None and exp - ts > max_ttl_s:
        raise AuthError("too_long", f"valid for {exp - ts:.0f} s, more than the {max_ttl_s:.0f} s allowed")


@dataclass(frozen=True)
class AgentAuth:
    """What the agent trusts and holds: public keys of coordinators (acks) and operators (commands), and optionally
    its own private key to sign results. Empty key maps mean unauthenticated (the loopback demo)."""

    ack_keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    command_keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    result_key: Ed25519PrivateKey | None = None
    max_clock_skew_s: float = 300.0
    command_max_ttl_s: float = 3600.0


@dataclass(frozen=True)
class CoordinatorAuth:
    """The coordinator's private key for acks, and each device's public key for its results."""

    ack_key: Ed25519PrivateKey | None = None
    ack_ttl_s: float = 300.0
    device_keys: Mapping[str, Mapping[str, Ed25519PublicKey]] = field(default_factory=dict)
    require_device_keys: bool = False

    def check_result(self, device: str, payload: Mapping[str, Any]) -> None:
        """Raise AuthError when ``device`` has a key and the result is not signed by it (or when a key is required)."""
        keys = self.device_keys.get(device)
        if keys is None:
            if self.require_device_keys:
                raise AuthError("untrusted_key", f"device {device!r} has no key configured (device_keys)")
            return
        verify(payload, keys)


class Refusals:
    """Counts refusals by code and says when to log one: the first of each code, then at most once a minute."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.counts: dict[str, int] = {}
        self._logged: dict[str, tuple[float, int]] = {}
        self.every_s = every_s

    def note(self, code: str, now: float) -> int | None:
        """Count one; returns how many were not logged since the last log line (None: do not log now)."""
        self.counts[code] = self.counts.get(code, 0) + 1
        last = self._logged.get(code)
        if last is not None and now - last[0] < self.every_s:
            return None
        self._logged[code] = (now, self.counts[code])
        return self.counts[code] - (last[1] if last is not None else 0) - 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())
