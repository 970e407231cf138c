"""The installed-model store: ``<state_dir>/models/<name>/versions/<version>/`` plus ``current.json``, the pointer
that says which version runs. Switching is ``os.replace`` of the pointer after fsyncs, so a power cut at any moment
leaves either the old or the new version in force, each complete on disk."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from edge_agent.errors import (
    UpdateCorruptError,
    UpdateError,
)
from edge_agent.fsutil import fsync_dir
from edge_agent.updates.archive import StagedUpdate
from edge_agent.updates.format import (
    parse_version,
)

log = logging.getLogger(__name__)

POINTER_NAME = "current.json"
STAGING_NAME = ".staging"


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
            fsync_dir(d)  # the files' directory entries are on disk before the rename
        os.rename(staged.bundle_dir, target)
        fsync_dir(target.parent)
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
        fsync_dir(d)

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


