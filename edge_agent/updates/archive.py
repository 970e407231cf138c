"""Update archives: a bundle folder (+ optional golden image) signed into one tar file, written atomically; and an
update file verified and unpacked into a staging folder. Streams the archive once: the statement and its signature
come first and are checked before any bundle byte is written; every member is checked for its name, type (regular
files only) and size, and hashed while it is written."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.bundles.bundle import Bundle, load_bundle
from edge_agent.errors import (
    ChecksumError,
    ConfigError,
    ManifestError,
    UpdateChecksumError,
    UpdateCorruptError,
    UpdateError,
    UpdateManifestError,
    UpdateTooLargeError,
    UpdateUnsafePathError,
)
from edge_agent.fsutil import sha256_file
from edge_agent.updates.format import (
    BUNDLE_PREFIX,
    MAX_FILES,
    MAX_STATEMENT_BYTES,
    SIGNATURE_NAME,
    STATEMENT_NAME,
    FileEntry,
    Golden,
    Statement,
    check_member_name,
    parse_version,
    sign_statement,
    tag_model,
    verify_statement,
)

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


# --- signing ----------------------------------------------------------------------------------------------------------






def _tar_add(tf: tarfile.TarFile, name: str, data: BinaryIO | None, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = size, 0o644, 0, tarfile.REGTYPE
    tf.addfile(info, data)


def sign_bundle(
    bundle_dir: Path,
    private_key: Ed25519PrivateKey,
    out: Path,
    *,
    golden: Path | None = None,
    golden_label: str | None = None,
) -> Statement:
    """Pack ``bundle_dir`` (checked with ``load_bundle``) into a signed update file at ``out``."""
    bundle = load_bundle(bundle_dir)
    files: dict[Path, str] = {}
    for p in sorted(bundle_dir.rglob("*")):
        if p.is_symlink():
            raise UpdateUnsafePathError(f"{p}: links are not allowed in a bundle")
        if p.is_file():
            files[p] = check_member_name(BUNDLE_PREFIX + p.relative_to(bundle_dir).as_posix())
    gold: Golden | None = None
    if golden is not None:
        if not golden_label:
            raise ConfigError("--golden needs --golden-label")
        if golden_label not in bundle.manifest.labels:
            raise ConfigError(f"--golden-label {golden_label!r} is not a label of {bundle.name}")
        gold = Golden(check_member_name("golden/" + golden.name), golden_label)
        files[golden] = gold.file
    statement = Statement(
        name=bundle.manifest.name,
        version=bundle.manifest.version,
        files={member: FileEntry(sha256_file(p), p.stat().st_size) for p, member in files.items()},
        golden=gold,
    )
    parse_version(statement.version)  # refuse to sign what no agent would install
    body, sig = sign_statement(statement, private_key)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    try:
        with tmp.open("wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
                _tar_add(tf, STATEMENT_NAME, io.BytesIO(body), len(body))
                _tar_add(tf, SIGNATURE_NAME, io.BytesIO(sig), len(sig))
                for p, member in files.items():
                    with p.open("rb") as f:
                        _tar_add(tf, member, f, statement.files[member].size)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return statement


# --- verified unpacking -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 512 * 1024 * 1024
    """Largest update file, and the most bytes its members may unpack to."""
    max_files: int = MAX_FILES


@dataclass(frozen=True)
class StagedUpdate:
    """A verified update unpacked under the store's staging folder (same file system as the versions)."""

    statement: Statement
    root: Path

    @property
    def bundle_dir(self) -> Path:
        return self.root / "bundle"

    def golden(self) -> tuple[bytes, str] | None:
        g = self.statement.golden
        return ((self.root / g.file).read_bytes(), g.label) if g is not None else None


Check = Callable[[Statement], None]


def _read_small(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > MAX_STATEMENT_BYTES:
        raise UpdateTooLargeError(f"{member.name}: {member.size} bytes is more than {MAX_STATEMENT_BYTES}")
    f = tf.extractfile(member)
    data = f.read() if f is not None else b""
    if len(data) != member.size:
        raise UpdateCorruptError(f"{member.name}: truncated")
    return data


def _check_type(member: tarfile.TarInfo) -> None:
    if member.issym() or member.islnk():
        raise UpdateUnsafePathError(f"archive member {member.name[:80]!r}: links are never unpacked")
    if not member.isreg():
        raise UpdateUnsafePathError(f"archive member {member.name[:80]!r}: only regular files are allowed")


def stage_update(
    path: Path,
    staging_root: Path,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    limits: Limits = Limits(),
    check: Check | None = None,
) -> StagedUpdate:
    """Verify ``path`` and unpack its bundle into a new folder under ``staging_root``.

    Order: size of the file; statement + signature (trusted key, valid signature); ``check(statement)`` (model
    configured here, version newer); each member's name, type, size and sha256 while it is written; every listed
    file present; the manifest validates, names the same model and version, and its ONNX sha256 matches.
    Raises an UpdateError subclass and leaves nothing behind.
    """
    try:
        size = path.lstat().st_size
    except OSError as exc:
        raise UpdateCorruptError(f"{path.name}: cannot read: {exc.strerror}") from exc
    if path.is_symlink() or not path.is_file():
        raise UpdateUnsafePathError(f"{path.name}: not a regular file")
    if size > limits.max_bytes:
        raise UpdateTooLargeError(f"{path.name}: {size} bytes is more than the limit of {limits.max_bytes}")
    staging_root.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="update-", dir=staging_root))
    statement: Statement | None = None
    try:
        statement = _unpack(path, root, trusted, limits, check)
        _check_bundle(root / "bundle", statement)
        return StagedUpdate(statement, root)
    except UpdateError as exc:
        shutil.rmtree(root, ignore_errors=True)
        tag_model(exc, exc.model or (statement.name if statement else None))
        raise
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _unpack(
    path: Path, root: Path, trusted: Mapping[str, Ed25519PublicKey], limits: Limits, check: Check | None
) -> Statement:
    try:
        with tarfile.open(path, mode="r:") as tf:
            first = tf.next()
            if first is None or first.name != STATEMENT_NAME:
                raise UpdateCorruptError(f"{path.name}: not an edge-agent update ({STATEMENT_NAME} must come first)")
            _check_type(first)
            statement_bytes = _read_small(tf, first)
            second = tf.next()
            sig: bytes | None = None
            if second is not None and second.name == SIGNATURE_NAME:
                _check_type(second)
                sig = _read_small(tf, second)
                member = tf.next()
            else:
                member = second
            statement = verify_statement(statement_bytes, sig, trusted)
            try:
                if check is not None:
                    check(statement)
                _unpack_members(tf, member, root, statement, limits)
            except UpdateError as exc:
                tag_model(exc, statement.name)
                raise
            return statement
    except tarfile.TarError as exc:  # garbage, a truncated header, a bad checksum
        raise UpdateCorruptError(f"{path.name}: not a readable update archive: {exc}") from exc
    except EOFError as exc:
        raise UpdateCorruptError(f"{path.name}: truncated") from exc


def _unpack_members(
    tf: tarfile.TarFile, member: tarfile.TarInfo | None, root: Path, statement: Statement, limits: Limits
) -> None:
    seen: set[str] = set()
    total = 0
    count = 0
    while member is not None:
        count += 1
        if count > limits.max_files:
            raise UpdateTooLargeError(f"more than {limits.max_files} files in the update")
        name = check_member_name(member.name)
        _check_type(member)
        if name in (STATEMENT_NAME, SIGNATURE_NAME) or name in seen:
            raise UpdateCorruptError(f"archive member {name!r} appears twice")
        entry = statement.files.get(name)
        if entry is None:
            raise UpdateCorruptError(f"archive member {name!r} is not listed in the signed statement")
        total += member.size
        if total > limits.max_bytes:
            raise UpdateTooLargeError(f"the update unpacks to more than {limits.max_bytes} bytes")
        if member.size != entry.size:
            raise UpdateChecksumError(f"{name}: {member.size} bytes, the signed statement says {entry.size}")
        _write_member(tf, member, root / name, entry, name)
        seen.add(name)
        member = tf.next()
    missing = sorted(set(statement.files) - seen)
    if missing:
        raise UpdateCorruptError(f"files listed in the statement are missing from the archive: {missing}")


def _write_member(tf: tarfile.TarFile, member: tarfile.TarInfo, target: Path, entry: FileEntry, name: str) -> None:
    src = tf.extractfile(member)
    if src is None:
        raise UpdateCorruptError(f"{name}: unreadable")
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    written = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as out:
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            out.write(chunk)
            written += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    if written != entry.size:
        raise UpdateCorruptError(f"{name}: truncated ({written} of {entry.size} bytes)")
    if h.hexdigest() != entry.sha256:
        raise UpdateChecksumError(f"{name}: sha256 {h.hexdigest()} does not match the signed {entry.sha256}")


def _check_bundle(bundle_dir: Path, statement: Statement) -> Bundle:
    try:
        bundle = load_bundle(bundle_dir)
    except ChecksumError as exc:
        raise UpdateChecksumError(f"bundle: {exc.message}") from exc
    except ManifestError as exc:
        raise UpdateManifestError(f"bundle: {exc.message}") from exc
    m = bundle.manifest
    if (m.name, m.version) != (statement.name, statement.version):
        raise UpdateManifestError(
            f"bundle: manifest says {m.name} {m.version}, the signed statement {statement.name} {statement.version}"
        )
    return bundle


def bundle_from(directory: Path) -> Bundle:
    """Load an installed version; a damaged one reads as an UpdateError."""
    try:
        return load_bundle(directory)
    except ChecksumError as exc:
        raise UpdateChecksumError(exc.message) from exc
    except ManifestError as exc:
        raise UpdateManifestError(exc.message) from exc


