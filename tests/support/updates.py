"""Real model updates for tests: a copy of a shipped bundle with a bumped version, keys, and hand-made archives
(including malformed ones the signing tool would never write)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image as PILImage

from edge_agent.updates.format import FileEntry, Golden, Statement, sign_statement
from edge_agent.updates.keys import generate_keys, load_private_key

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "steel_defects"
NAME = "steel_defects"


def copy_bundle(dest: Path, version: str = "1.0.0", **manifest_changes: Any) -> Path:
    """``models/steel_defects`` (small INT8 classifier) copied to ``dest`` with ``version`` and other changes."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("steel_defects.onnx", "manifest.json"):
        shutil.copyfile(SHIPPED / name, dest / name)
    doc = json.loads((dest / "manifest.json").read_text())
    doc.update(version=version, **manifest_changes)
    (dest / "manifest.json").write_text(json.dumps(doc, indent=2))
    return dest


def keys(directory: Path, name: str = "edge-update") -> tuple[Ed25519PrivateKey, Path]:
    private, public = generate_keys(directory, name)
    return load_private_key(private), public


def png(seed: int, size: int = 224) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def bundle_members(bundle_dir: Path) -> dict[str, bytes]:
    return {f"bundle/{p.name}": p.read_bytes() for p in sorted(bundle_dir.iterdir()) if p.is_file()}


def statement_for(
    members: dict[str, bytes], name: str = NAME, version: str = "1.1.0", golden: Golden | None = None
) -> Statement:
    files = {k: FileEntry(hashlib.sha256(v).hexdigest(), len(v)) for k, v in members.items()}
    return Statement(name=name, version=version, files=files, golden=golden)


def craft(
    out: Path,
    members: dict[str, bytes],
    key: Ed25519PrivateKey | None,
    *,
    statement: Statement | None = None,
    statement_bytes: bytes | None = None,
    extra: list[tarfile.TarInfo] | None = None,
    payload_override: dict[str, bytes] | None = None,
) -> Path:
    """An update archive: statement (signed by ``key``; none when ``key`` is None), then ``members``.

    ``statement_bytes`` replaces the signed statement after signing (a tampered statement); ``payload_override``
    replaces a member's bytes after the statement was made (a tampered file); ``extra`` adds raw tar entries
    (links, devices) after the members.
    """
    st = statement or statement_for(members)
    body, sig = sign_statement(st, key) if key is not None else (b"", b"")
    if key is None:
        from edge_agent.updates.format import canonical_json

        body = canonical_json(st.to_dict())
    if statement_bytes is not None:
        body = statement_bytes
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

        add("update.json", body)
        if key is not None:
            add("update.sig", sig)
        for name, data in members.items():
            add(name, (payload_override or {}).get(name, data))
        for info in extra or []:
            tf.addfile(info)
    return out
