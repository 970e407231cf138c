"""The signed model-update format, as pure functions: statement, signature, member names, versions. No I/O.

An update file is an uncompressed POSIX tar archive whose members come in this order::

    update.json        the statement: canonical JSON (sorted keys, no spaces, ASCII), signed as these exact bytes
    update.sig         {"algorithm": "ed25519", "key_id": "<16 hex>", "signature": "<base64>"}
    bundle/<file>...   the bundle (manifest.json, the ONNX file, licence, model card)
    golden/<file>      optional: one image with the label the new model must give it (smoke test)

The statement::

    {"format": "edge-agent-update/1", "name": "<manifest name>", "version": "<manifest version>",
     "files": {"bundle/manifest.json": {"sha256": "<hex>", "size": <bytes>}, ...},
     "golden": {"file": "golden/<file>", "label": "<label>"} | null}

``updates.py`` reads and writes the archive; this module decides what is acceptable.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edge_agent.errors import (
    UpdateBadSignatureError,
    UpdateCorruptError,
    UpdateError,
    UpdateNotNewerError,
    UpdateUnknownModelError,
    UpdateUnsafePathError,
    UpdateUnsignedError,
    UpdateUntrustedKeyError,
)

FORMAT = "edge-agent-update/1"
STATEMENT_NAME = "update.json"
SIGNATURE_NAME = "update.sig"
BUNDLE_PREFIX = "bundle/"
GOLDEN_PREFIX = "golden/"
MAX_STATEMENT_BYTES = 64 * 1024
MAX_FILES = 256

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,8})(\.(0|[1-9][0-9]{0,8})){0,3}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Golden:
    file: str
    label: str


@dataclass(frozen=True)
class Statement:
    """What the signer vouches for: which model, which version, and the exact bytes of every file."""

    name: str
    version: str
    files: Mapping[str, FileEntry]
    golden: Golden | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "files": {k: {"sha256": v.sha256, "size": v.size} for k, v in sorted(self.files.items())},
            "golden": {"file": self.golden.file, "label": self.golden.label} if self.golden else None,
        }


def canonical_json(value: Any) -> bytes:
    """The one byte form of a JSON document that is signed: sorted keys, no whitespace, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable id of a public key: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# --- versions ---------------------------------------------------------------------------------------------------------


def parse_version(text: str) -> tuple[int, int, int, int]:
    """``MAJOR[.MINOR[.PATCH[.BUILD]]]``, digits only, no leading zeros; missing parts count as 0.

    Raises ValueError for anything else (``1.0-beta``, ``v2``, ``01.2``): an update must never be
    ordered by a guess.
    """
    if not _VERSION_RE.match(text):
        raise ValueError(f"version {text!r} is not MAJOR[.MINOR[.PATCH[.BUILD]]] with digits only")
    parts = [int(p) for p in text.split(".")]
    parts += [0] * (4 - len(parts))
    return (parts[0], parts[1], parts[2], parts[3])


def is_newer(candidate: str, installed: str) -> bool:
    """True when ``candidate`` is strictly newer than ``installed`` (both parsed with :func:`parse_version`)."""
    return parse_version(candidate) > parse_version(installed)


# --- member names -----------------------------------------------------------------------------------------------------


def check_member_name(name: str) -> str:
    """A member path that stays inside the staging folder: relative, ``/``-separated, no ``..``, no odd characters.

    Only ``bundle/...`` and ``golden/<file>`` may carry files. Raises UpdateUnsafePathError.
    """
    if not name or len(name) > 512 or "\\" in name or "\x00" in name or name.startswith("/"):
        raise UpdateUnsafePathError(f"archive member {name[:80]!r}: absolute or malformed path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts) or not all(_PART_RE.match(p) for p in parts):
        raise UpdateUnsafePathError(f"archive member {name[:80]!r}: path leaves the bundle or has odd characters")
    if name.startswith(BUNDLE_PREFIX) and len(parts) >= 2:
        return name
    if name.startswith(GOLDEN_PREFIX) and len(parts) == 2:
        return name
    raise UpdateUnsafePathError(f"archive member {name[:80]!r}: only bundle/... and golden/<file> are allowed")


# --- statement and signature ------------------------------------------------------------------------------------------


def parse_statement(data: bytes) -> Statement:
    """Validate the (already signature-checked) statement bytes. Raises UpdateCorruptError / UpdateUnsafePathError."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise UpdateCorruptError(f"{STATEMENT_NAME}: not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UpdateCorruptError(f"{STATEMENT_NAME}: not an {FORMAT} statement")
    extra = set(doc) - {"format", "name", "version", "files", "golden"}
    if extra:
        raise UpdateCorruptError(f"{STATEMENT_NAME}: unexpected fields {sorted(extra)}")
    name, version, files, golden = doc.get("name"), doc.get("version"), doc.get("files"), doc.get("golden")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UpdateCorruptError(f"{STATEMENT_NAME}: field name must be a model name")
    if not isinstance(version, str):
        raise UpdateCorruptError(f"{STATEMENT_NAME}: field version must be a string")
    try:
        parse_version(version)
    except ValueError as exc:
        raise UpdateCorruptError(f"{STATEMENT_NAME}: field version: {exc}") from exc
    if not isinstance(files, dict) or not files or len(files) > MAX_FILES:
        raise UpdateCorruptError(f"{STATEMENT_NAME}: field files must list 1..{MAX_FILES} files")
    entries: dict[str, FileEntry] = {}
    for path, entry in files.items():
        check_member_name(path)
        if (
            not isinstance(entry, dict)
            or set(entry) != {"sha256", "size"}
            or not isinstance(entry["sha256"], str)
            or not _SHA_RE.match(entry["sha256"])
            or not isinstance(entry["size"], int)
            or isinstance(entry["size"], bool)
            or entry["size"] < 0
        ):
            raise UpdateCorruptError(f"{STATEMENT_NAME}: files[{path!r}] must be {{sha256: hex, size: bytes}}")
        entries[path] = FileEntry(entry["sha256"], entry["size"])
    if BUNDLE_PREFIX + "manifest.json" not in entries:
        raise UpdateCorruptError(f"{STATEMENT_NAME}: the bundle has no manifest.json")
    gold: Golden | None = None
    if golden is not None:
        if (
            not isinstance(golden, dict)
            or set(golden) != {"file", "label"}
            or golden["file"] not in entries
            or not str(golden["file"]).startswith(GOLDEN_PREFIX)
            or not isinstance(golden["label"], str)
            or not golden["label"]
        ):
            raise UpdateCorruptError(f"{STATEMENT_NAME}: field golden must be {{file: golden/<listed file>, label}}")
        gold = Golden(golden["file"], golden["label"])
    if any(p.startswith(GOLDEN_PREFIX) for p in entries) and gold is None:
        raise UpdateCorruptError(f"{STATEMENT_NAME}: golden/ files without a golden entry")
    return Statement(name=name, version=version, files=entries, golden=gold)


def sign_statement(statement: Statement, private_key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """The statement's canonical bytes and the signature document that goes beside them."""
    body = canonical_json(statement.to_dict())
    sig = {
        "algorithm": "ed25519",
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(body)).decode("ascii"),
    }
    return body, canonical_json(sig)


def verify_statement(
    statement_bytes: bytes, signature_bytes: bytes | None, trusted: Mapping[str, Ed25519PublicKey]
) -> Statement:
    """Check the signature over the exact statement bytes with a trusted key, then parse the statement.

    Raises UpdateUnsignedError (no signature), UpdateUntrustedKeyError (signed by a key not in ``trusted``),
    UpdateBadSignatureError (malformed or not matching), then whatever :func:`parse_statement` raises.
    """
    if signature_bytes is None:
        raise UpdateUnsignedError(f"the update carries no {SIGNATURE_NAME}: unsigned updates are never installed")
    try:
        sig = json.loads(signature_bytes.decode("utf-8"))
        if not isinstance(sig, dict) or sig.get("algorithm") != "ed25519":
            raise ValueError("not an ed25519 signature document")
        kid, signature = sig["key_id"], base64.b64decode(sig["signature"], validate=True)
        if not isinstance(kid, str):
            raise ValueError("key_id must be a string")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise UpdateBadSignatureError(f"{SIGNATURE_NAME}: malformed: {exc}") from exc
    key = trusted.get(kid)
    if key is None:
        raise UpdateUntrustedKeyError(
            f"signed by key {kid[:16]!r}, which is not among the {len(trusted)} trusted keys of this agent"
        )
    try:
        key.verify(signature, statement_bytes)
    except InvalidSignature as exc:
        raise UpdateBadSignatureError(f"the signature of key {kid} does not match {STATEMENT_NAME}") from exc
    return parse_statement(statement_bytes)


def check_applicable(statement: Statement, configured: Collection[str], installed: Mapping[str, str]) -> None:
    """Refuse a model this agent does not run, or a version that is not strictly newer than the installed one."""
    if statement.name not in configured:
        raise UpdateUnknownModelError(
            f"model {statement.name!r} is not configured on this agent (configured: {', '.join(sorted(configured))})"
        )
    current = installed.get(statement.name)
    if current is None:
        return
    try:
        newer = is_newer(statement.version, current)
    except ValueError as exc:
        raise UpdateNotNewerError(f"cannot order {statement.version!r} after installed {current!r}: {exc}") from exc
    if not newer:
        raise UpdateNotNewerError(
            f"{statement.name} {statement.version} is not newer than the installed version {current}"
        )


def tag_model(exc: UpdateError, name: str | None) -> UpdateError:
    """Attach the model name (when known) to a refusal, for logs, metrics and events."""
    exc.model = name
    return exc
