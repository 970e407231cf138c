"""Signed model updates on disk: keys, signing, verified unpacking, and the installed-model store.

The format and every acceptance rule live in ``update_format.py`` (pure); this module does the file side:

* ``generate_keys`` / ``load_private_key`` / ``load_trusted_keys``: Ed25519 keys as PEM files.
* ``sign_bundle``: a bundle folder (+ optional golden image) -> one update file (tar), written atomically.
* ``stage_update``: an update file -> a verified bundle in a staging folder. Streams the archive once: the
  statement and its signature come first and are checked before any bundle byte is written; every member is
  checked for its name, type (regular files only) and size, and hashed while it is written.
* ``ModelStore``: ``<state_dir>/models/<name>/versions/<version>/`` plus ``current.json``, the pointer that
  says which version runs. Switching is ``os.replace`` of the pointer after fsyncs, so a power cut at any
  moment leaves either the old or the new version in force, each complete on disk.
* ``smoke_test``: a freshly loaded model must run on a blank image with outputs of the right shape (and give the
  golden image its label, when the update ships one).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from edge_agent.bundles.bundle import Bundle, load_bundle
from edge_agent.bundles.manifest import AnomalyDecoder, SoftmaxDecoder, decoder_feeds
from edge_agent.errors import (
    ChecksumError,
    ConfigError,
    EdgeAgentError,
    ManifestError,
    UpdateChecksumError,
    UpdateCorruptError,
    UpdateError,
    UpdateManifestError,
    UpdateSmokeTestError,
    UpdateTooLargeError,
    UpdateUnsafePathError,
)
from edge_agent.types import Image
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
    key_id,
    parse_version,
    sign_statement,
    tag_model,
    verify_statement,
)

log = logging.getLogger(__name__)

POINTER_NAME = "current.json"
STAGING_NAME = ".staging"
_CHUNK = 1 << 20


# --- keys -------------------------------------------------------------------------------------------------------------


def generate_keys(out_dir: Path, name: str = "edge-update") -> tuple[Path, Path]:
    """Write ``<name>.key`` (PKCS#8 PEM, mode 0600) and ``<name>.pub`` into ``out_dir``; never overwrites."""
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for p in (private_path, public_path):
        if p.exists():
            raise ConfigError(f"{p}: exists already; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(private_path, 0o600)  # whatever the umask said
    public_path.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: private key not found") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = load_pem_public_key(path.read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: public key not found") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key")
    return key


def load_trusted_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """Trusted public keys by key id."""
    return {key_id(k): k for k in (load_public_key(p) for p in paths)}


# --- signing ----------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        files={member: FileEntry(_sha256(p), p.stat().st_size) for p, member in files.items()},
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


# --- the store of installed versions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pointer:
    """``current``/``previous``: an installed version, or None for the bundle named in the agent config."""

    current: str | None = None
    previous: str | None = None
    rolled_back: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"current": self.current, "previous": self.previous, "rolled_back": self.rolled_back}


class ModelStore:
    """Installed model versions under ``root`` (``<state_dir>/models``). One writer: the agent or the CLI."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def staging_root(self) -> Path:
        return self.root / STAGING_NAME

    def model_dir(self, name: str) -> Path:
        return self.root / name

    def version_dir(self, name: str, version: str) -> Path:
        parse_version(version)  # only digits and dots ever become a folder name
        return self.root / name / "versions" / version

    def pointer(self, name: str) -> Pointer:
        path = self.model_dir(name) / POINTER_NAME
        try:
            doc = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return Pointer()
        except (OSError, orjson.JSONDecodeError) as exc:
            log.error("model store: %s unreadable (%s); using the configured bundle", path, exc)
            return Pointer()
        cur, prev, rb = doc.get("current"), doc.get("previous"), doc.get("rolled_back")
        return Pointer(
            current=cur if isinstance(cur, str) else None,
            previous=prev if isinstance(prev, str) else None,
            rolled_back=rb if isinstance(rb, dict) else None,
        )

    def installed(self, name: str) -> Path | None:
        """The folder of the version the pointer says runs, or None (the configured bundle)."""
        cur = self.pointer(name).current
        return self.version_dir(name, cur) if cur is not None else None

    def clean(self) -> None:
        """Remove staging leftovers and versions no pointer names (a crash between unpacking and switching)."""
        shutil.rmtree(self.staging_root, ignore_errors=True)
        if not self.root.is_dir():
            return
        for model_dir in self.root.iterdir():
            versions = model_dir / "versions"
            if model_dir.name == STAGING_NAME or not versions.is_dir():
                continue
            p = self.pointer(model_dir.name)
            keep = {v for v in (p.current, p.previous) if v is not None}
            for d in versions.iterdir():
                if d.name not in keep:
                    log.info("model store: removing %s (not installed)", d)
                    shutil.rmtree(d, ignore_errors=True)

    def promote(self, staged: StagedUpdate) -> Path:
        """Move a staged bundle to ``versions/<version>`` (a rename on one file system); not yet in force."""
        s = staged.statement
        target = self.version_dir(s.name, s.version)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            if self.pointer(s.name).current == s.version:
                raise UpdateCorruptError(f"{s.name} {s.version} is the version in force")
            shutil.rmtree(target)
        for d in [staged.bundle_dir, *(p for p in staged.bundle_dir.rglob("*") if p.is_dir())]:
            _fsync_dir(d)  # the files' directory entries are on disk before the rename
        os.rename(staged.bundle_dir, target)
        _fsync_dir(target.parent)
        shutil.rmtree(staged.root, ignore_errors=True)
        return target

    def discard(self, name: str, version: str) -> None:
        """Remove a promoted version that never came into force."""
        p = self.pointer(name)
        if version not in (p.current, p.previous):
            shutil.rmtree(self.version_dir(name, version), ignore_errors=True)

    def write_pointer(self, name: str, pointer: Pointer) -> None:
        """The switch: write ``current.json.tmp``, fsync, ``os.replace``, fsync the folder."""
        d = self.model_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (POINTER_NAME + ".tmp")
        with tmp.open("wb") as f:
            f.write(orjson.dumps(pointer.to_dict(), option=orjson.OPT_INDENT_2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / POINTER_NAME)
        _fsync_dir(d)

    def switch(self, name: str, version: str, from_version: str | None) -> Pointer:
        """Put ``version`` in force, keep what ran before (``from_version``; None: the configured bundle)."""
        old = self.pointer(name)
        new = Pointer(current=version, previous=from_version if from_version != version else old.previous)
        self.write_pointer(name, new)
        self._prune(name, new)
        return new

    def rollback(self, name: str, reason: str) -> Pointer:
        """Put the previous version (or the configured bundle) back in force and record why."""
        old = self.pointer(name)
        if old.current is None:
            raise UpdateError(f"{name}: no installed update to roll back from")
        new = Pointer(
            current=old.previous,
            previous=None,
            rolled_back={"version": old.current, "reason": reason, "at": time.time()},
        )
        self.write_pointer(name, new)
        self._prune(name, new)
        return new

    def _prune(self, name: str, p: Pointer) -> None:
        versions = self.model_dir(name) / "versions"
        if not versions.is_dir():
            return
        keep = {v for v in (p.current, p.previous) if v is not None}
        for d in versions.iterdir():
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)


# --- smoke test -------------------------------------------------------------------------------------------------------


class Smokeable(Protocol):
    def predict(self, image: Any) -> Any: ...
    def predict_bytes(self, data: bytes) -> Any: ...


def smoke_test(model: Smokeable, bundle: Bundle, golden: tuple[bytes, str] | None = None) -> dict[str, Any]:
    """Run a freshly loaded model on a blank image (and the golden image); raises UpdateSmokeTestError."""
    m = bundle.manifest
    spec = m.input
    blank = Image.from_array(np.full((spec.height, spec.width, 3), 127, np.uint8), "RGB")
    try:
        result = model.predict(blank)
        _check_outputs(model, bundle, blank)
    except UpdateSmokeTestError:
        raise
    except Exception as exc:
        msg = exc.message if isinstance(exc, EdgeAgentError) else f"{type(exc).__name__}: {exc}"
        raise UpdateSmokeTestError(f"{m.name} {m.version} fails on a blank image: {msg}") from exc
    if (result.model, result.model_version) != (m.name, m.version):
        raise UpdateSmokeTestError(f"{m.name} {m.version}: the loaded model reports {result.model} "
                                   f"{result.model_version}")
    report: dict[str, Any] = {"blank": [p.to_dict() for p in result.predictions][:3]}
    if golden is not None:
        data, label = golden
        try:
            top = model.predict_bytes(data).predictions
        except Exception as exc:
            raise UpdateSmokeTestError(f"{m.name} {m.version} fails on the golden image: {exc}") from exc
        got = getattr(top[0], "label", None) if top else None
        if got != label:
            raise UpdateSmokeTestError(f"{m.name} {m.version} labels the golden image {got!r}, expected {label!r}")
        report["golden"] = label
    return report


def _check_outputs(model: Smokeable, bundle: Bundle, blank: Any) -> None:
    """Raw output shapes against the manifest, when the model exposes its runtime (``vision.model.Model`` does)."""
    runtime, pre = getattr(model, "runtime", None), getattr(model, "preprocessor", None)
    if runtime is None or pre is None:
        return
    m = bundle.manifest
    tensor, _meta = pre.run(blank)
    outputs = runtime.run({m.input.name: tensor, **decoder_feeds(m)})
    for name, value in outputs.items():
        if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.all(np.isfinite(value)):
            raise UpdateSmokeTestError(f"{m.name} {m.version}: output {name} is not finite on a blank image")
    dec = m.decoder
    if isinstance(dec, SoftmaxDecoder):
        n = int(np.asarray(outputs[dec.output]).size)
        if n != len(m.labels):
            raise UpdateSmokeTestError(
                f"{m.name} {m.version}: output {dec.output} has {n} classes, the manifest {len(m.labels)} labels"
            )
    elif isinstance(dec, AnomalyDecoder) and np.asarray(outputs[dec.score_output]).size < 1:
        raise UpdateSmokeTestError(f"{m.name} {m.version}: output {dec.score_output} is empty")
