"""A watched folder: image files dropped in are taken into the spool, processed, then filed.

The life of a file::

    <path>/leaf.jpg  --rename-->  <spool>/<input_id>--leaf.jpg   (accepted: durable, journalled)
                     --result-->  <done_dir>/leaf.jpg            (or deleted with keep_done: false)
                     --bad----->  <rejected_dir>/leaf.jpg + leaf.jpg.reason.json

A file is taken only once it has been unmodified for ``settle_s``; hidden and temporary names
(``.x``, ``*.tmp``, ``*.part``, ``~``) are left alone while they are being written. The move into
the spool is an atomic ``rename`` (copy + fsync + rename when the spool is on another file system),
so a file is never half in and half out. Wrong extensions, oversized files and anything that is
not a regular file (symlinks, devices) are rejected without being read. When the outbox is full
files simply stay in the folder, refused, not lost.

On start the spool is reconciled with the outbox: a file the journal does not know (a crash
between move and journal) is accepted now (or, while the disk is short of space, put back into the
folder), pending ones are submitted again, finished ones filed; a pending input whose spool file is
gone (an outbox rolled back by damage after the file was filed) is run again from ``done_dir`` when its
file is there, else rejected as ``input_lost``: no input stays pending for ever. Partial copies
(``.<name>.incoming``) a crash left behind are deleted; their originals were never removed.
A copy into the spool that fails (ENOSPC on another file system) leaves the file in the folder.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from edge_agent.config import FolderSourceConfig
from edge_agent.delivery.interface import InputJournal, PendingInput
from edge_agent.errors import EdgeAgentError, InputError, OverloadedError, StorageError, StorageFullError
from edge_agent.flow.pipeline import InputItem, PipelineOutput
from edge_agent.flow.sources import Submit
from edge_agent.fsutil import fsync_dir
from edge_agent.metrics import Metrics

log = logging.getLogger(__name__)

_TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", "~")
_SEP = "--"
RETRY_DELAY_S = 5.0




def durable_move(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` atomically: rename, or copy+fsync+rename across file systems."""
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != 18:  # EXDEV: another file system
            raise
        tmp = dst.with_name(f".{dst.name}.incoming")
        try:
            with src.open("rb") as fin, tmp.open("wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                st = os.fstat(fin.fileno())
                os.utime(fout.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))  # the capture time moves with it
                os.fsync(fout.fileno())
        except OSError:  # e.g. ENOSPC: no partial copy is left behind; the source is untouched
            tmp.unlink(missing_ok=True)
            raise
        os.rename(tmp, dst)
        fsync_dir(dst.parent, best_effort=True)
        src.unlink()
        return
    fsync_dir(dst.parent, best_effort=True)


def _move(src: Path, dst: Path) -> None:
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != 18:
            raise
        durable_move(src, dst)


def _free_name(directory: Path, name: str, tag: str) -> Path:
    target = directory / name
    if not target.exists():
        return target
    stem, dot, ext = name.rpartition(".")
    return directory / (f"{stem}-{tag}.{ext}" if dot else f"{name}-{tag}")


class FolderSource:
    """Watches ``cfg.path`` with a polling thread (portable, no inotify dependency)."""

    def __init__(
        self,
        cfg: FolderSourceConfig,
        *,
        spool_dir: Path,
        journal: InputJournal,
        submit: Submit,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.spool_dir = spool_dir
        self.done_dir = cfg.done_dir or cfg.path / "done"
        self.rejected_dir = cfg.rejected_dir or cfg.path / "rejected"
        self._journal = journal
        self._submit = submit
        self._metrics = metrics
        self._clock = clock
        self._extensions = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in cfg.extensions}
        self._lock = threading.RLock()
        self._waiting: deque[tuple[float, InputItem]] = deque()
        self._in_flight = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.accepted = 0
        self.done = 0
        self.rejected = 0
        self.refused_full = 0
        self.last_error: str | None = None
        self._orphans: list[tuple[Path, str, str]] = []  # (spool file, input id, original name) not journalled

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        for d in (self.cfg.path, self.done_dir, self.rejected_dir, self.spool_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._clean_partials()
        self.recover()
        self._thread = threading.Thread(target=self._loop, name=f"folder-{self.name}", daemon=True)
        self._thread.start()
        if self._metrics is not None:
            self._metrics.set_source_up(self.name, True)

    def stop(self, timeout: float = 5.0) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        if self._metrics is not None:
            self._metrics.set_source_up(self.name, False)
        return self._thread is None or not self._thread.is_alive()

    def health(self) -> dict[str, Any]:
        state = "full" if self.last_error == "storage_full" else "watching"
        with self._lock:
            return {
                "type": "folder",
                "state": "stopped" if self._stop.is_set() else state,
                "path": str(self.cfg.path),
                "in_flight": self._in_flight,
                "waiting": len(self._waiting),
                "accepted": self.accepted,
                "done": self.done,
                "rejected": self.rejected,
                "refused_full": self.refused_full,
            }

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.scan_once()
                except Exception:  # a background loop catches, counts, reports, and goes on
                    log.exception("folder %s: scan failed", self.name)
                self._stop.wait(self.cfg.poll_interval_s)
        finally:
            log.debug("folder %s: watcher stopped", self.name)

    # --- recovery -------------------------------------------------------------------------------------------------

    def _clean_partials(self) -> None:
        """Delete partial copies and reason files a crash (or a full disk) left behind; originals are intact."""
        for directory, suffixes in ((self.spool_dir, (".incoming",)),
                                    (self.done_dir, (".incoming",)),
                                    (self.rejected_dir, (".incoming", ".reason.json.tmp"))):
            try:
                entries = list(directory.iterdir())
            except OSError:
                continue
            for path in entries:
                if path.name.startswith(".") and path.name.endswith(suffixes) and path.is_file():
                    log.info("folder %s: deleting the partial file %s", self.name, path)
                    path.unlink(missing_ok=True)

    def recover(self) -> None:
        """Reconcile the spool with the journal after a restart (see the module docstring). Never raises for
        lack of space: a file that cannot be journalled now goes back to the folder (or waits in the spool)."""
        known: set[str] = set()
        for path in sorted(self.spool_dir.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            input_id, sep, original = path.name.partition(_SEP)
            if not sep:
                continue
            known.add(input_id)
            state = self._journal.input_state(input_id)
            if state == "done":
                self._file_done(path, original, input_id)
            elif state == "rejected":
                self._file_rejected(path, original, "rejected", "rejected before the agent restarted")
            elif state is None:
                self._orphans.append((path, input_id, original))
            else:
                with self._lock:
                    self._waiting.append((0.0, self._item(input_id, path)))
                log.info("folder %s: recovered %s from the spool", self.name, original)
        self._adopt_orphans(put_back=True)
        for pending in self._journal.pending_inputs():
            if pending.source == self.name and pending.input_id not in known:
                self._recover_filed(pending)

    def _adopt_orphans(self, *, put_back: bool) -> None:
        """Journal spool files the journal does not know (a crash or a full disk between move and journal).
        While the outbox refuses inputs they go back to the folder (``put_back``) or wait for the next scan."""
        orphans, self._orphans = self._orphans, []
        for path, input_id, original in orphans:
            try:
                self._journal.accept_input(
                    input_id, source=self.name, pipeline=self.cfg.pipeline, spool_path=str(path),
                    meta={"original_name": original, "recovered": True},
                )
            except StorageError as exc:
                self._refused(exc)
                if put_back and self._put_back(path, original, input_id):
                    continue
                self._orphans.append((path, input_id, original))
                continue
            with self._lock:
                self.accepted += 1
                self._waiting.append((0.0, self._item(input_id, path)))
            log.info("folder %s: took %s from the spool (it was never journalled)", self.name, original)

    def _put_back(self, spool: Path, original: str, input_id: str) -> bool:
        try:
            durable_move(spool, _free_name(self.cfg.path, original, input_id[-8:]))
        except OSError as exc:
            log.warning("folder %s: cannot put %s back into the folder: %s", self.name, original, exc.strerror)
            return False
        log.info("folder %s: put %s back into the folder (not journalled, the disk is short of space)",
                 self.name, original)
        return True

    def _recover_filed(self, pending: PendingInput) -> None:
        """A pending input without its spool file: its result was rolled back after the file was filed."""
        original = str(pending.meta.get("original_name") or "")
        candidates = [self.done_dir / original, _free_name(self.done_dir, original, pending.input_id[-8:])]
        source = next((c for c in candidates if original and c.is_file()), None)
        if source is None:
            self._journal.reject_input(pending.input_id, "input_lost", "the spool file is gone and not in done_dir")
            log.warning("folder %s: input %s (%s) is lost: rejected", self.name, pending.input_id, original)
            return
        spool = self.spool_dir / f"{pending.input_id}{_SEP}{original[:120]}"
        try:
            durable_move(source, spool)
        except OSError as exc:
            log.warning("folder %s: cannot re-run %s from %s: %s", self.name, original, source, exc.strerror)
            return  # stays pending: tried again at the next start
        with self._lock:
            self._waiting.append((0.0, self._item(pending.input_id, spool)))
        log.warning("folder %s: re-running %s from %s (its result was lost)", self.name, original, self.done_dir)

    # --- scanning -------------------------------------------------------------------------------------------------

    def _item(self, input_id: str, spool_path: Path) -> InputItem:
        """The file's modification time (kept by the move into the spool) is its capture time (``captured_at``):
        the livestock events' clock, so frames dropped in late or in a burst still get their own times."""
        try:
            hints = {"captured_at": repr(spool_path.stat().st_mtime)}
        except OSError:
            hints = {}
        return InputItem(input_id=input_id, pipeline=self.cfg.pipeline, source=self.name, spool_path=str(spool_path),
                         hints=hints)

    def _room(self) -> int:
        return self.cfg.max_in_flight - self._in_flight - len(self._waiting)

    def scan_once(self) -> int:
        """One pass: resubmit waiting inputs, then take settled files while there is room. Returns files taken."""
        if self._orphans:
            self._adopt_orphans(put_back=False)
        self._drain_waiting()
        now = self._clock()
        try:
            entries = sorted(os.scandir(self.cfg.path), key=lambda e: e.name)
        except OSError as exc:
            self.last_error = f"cannot list folder: {exc.strerror}"
            log.warning("folder %s: %s", self.name, self.last_error)
            return 0
        batch: list[tuple[Path, str, int]] = []
        room = self._room()
        for entry in entries:
            if self._stop.is_set() or len(batch) >= room:
                break
            name = entry.name
            if name.startswith(".") or name.endswith(_TEMP_SUFFIXES):
                continue
            if entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                self._file_rejected(path, name, "input_invalid", "not a regular file (symlinks, devices are refused)")
                continue
            if now - st.st_mtime < self.cfg.settle_s:
                continue  # still being written
            if Path(name).suffix.lower() not in self._extensions:
                allowed = ", ".join(sorted(self._extensions))
                self._file_rejected(path, name, "image_unsupported_format", f"extension not one of {allowed}")
                continue
            if st.st_size > self.cfg.max_file_bytes:
                self._file_rejected(path, name, "image_too_large", f"{st.st_size} bytes > {self.cfg.max_file_bytes}")
                continue
            batch.append((path, name, st.st_size))
        taken = self._take(batch) if batch else 0
        self._drain_waiting()
        return taken

    def _take(self, batch: list[tuple[Path, str, int]]) -> int:
        """Move files into the spool (one directory fsync for the batch), journal them, queue them."""
        try:
            self._journal.check_capacity()
        except StorageError as exc:
            self._refused(exc)
            return 0
        moved: list[tuple[Path, Path, str, str, int]] = []
        short = False  # ran out of space part way: the state stays "full"
        for path, name, size in batch:
            input_id = f"f-{uuid.uuid4().hex}"
            spool_path = self.spool_dir / f"{input_id}{_SEP}{name[:120]}"
            try:
                try:
                    os.rename(path, spool_path)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:  # EXDEV: the spool is on another file system: copy
                        raise
                    durable_move(path, spool_path)
            except FileNotFoundError:
                continue  # someone else took it
            except OSError as exc:  # e.g. ENOSPC copying across file systems: the file stays in the folder
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    short = True
                    self._refused(StorageFullError(f"no space to copy {name} into the spool"))
                else:
                    self.last_error = f"cannot move into the spool: {exc.strerror}"
                    log.warning("folder %s: %s: %s", self.name, name, self.last_error)
                break  # the files already moved are journalled below
            moved.append((path, spool_path, input_id, name, size))
        if not moved:
            return 0
        fsync_dir(self.spool_dir, best_effort=True)  # the renames are durable before any journal row points at them

        def accept(m: tuple[Path, Path, str, str, int]) -> EdgeAgentError | None:
            path, spool_path, input_id, name, size = m
            try:
                self._journal.accept_input(
                    input_id, source=self.name, pipeline=self.cfg.pipeline, spool_path=str(spool_path),
                    meta={"original_name": name, "size": size},
                )
            except StorageError as exc:
                try:
                    durable_move(spool_path, path)  # refused, not lost: back where it was
                except OSError:
                    self._orphans.append((spool_path, input_id, name))  # journalled once space returns
                return exc
            return None

        # concurrent calls share the outbox's group commit: one fsync for the batch, not one per file
        outcomes = list(self._accept_pool().map(accept, moved)) if len(moved) > 1 else [accept(moved[0])]
        taken = 0
        for m, err in zip(moved, outcomes, strict=True):
            if err is not None:
                short = True
                self._refused(err)
                continue
            taken += 1
            with self._lock:
                self.accepted += 1
                self._waiting.append((0.0, self._item(m[2], m[1])))
        if taken and not short:
            self.last_error = None
        return taken

    def _accept_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix=f"folder-{self.name}-accept")
        return self._pool

    def _refused(self, exc: EdgeAgentError) -> None:
        self.refused_full += 1
        if self.last_error != exc.code:
            log.warning("folder %s: not taking files: [%s] %s", self.name, exc.code, exc.message)
        self.last_error = exc.code

    def _drain_waiting(self) -> None:
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._waiting or self._waiting[0][0] > now or self._stop.is_set():
                    return
                _, item = self._waiting.popleft()
                self._in_flight += 1
            try:
                fut = self._submit(item)
            except OverloadedError:
                with self._lock:
                    self._in_flight -= 1
                    self._waiting.appendleft((0.0, item))
                return
            except Exception:
                log.exception("folder %s: submit failed", self.name)
                with self._lock:
                    self._in_flight -= 1
                    self._waiting.append((now + RETRY_DELAY_S, item))
                return
            fut.add_done_callback(functools.partial(self._finished, item))

    # --- filing ---------------------------------------------------------------------------------------------------

    def _finished(self, item: InputItem, fut: Future[PipelineOutput]) -> None:
        with self._lock:
            self._in_flight -= 1
        assert item.spool_path is not None
        spool = Path(item.spool_path)
        original = spool.name.partition(_SEP)[2] or spool.name
        exc = fut.exception() if not fut.cancelled() else OverloadedError("cancelled")
        try:
            if exc is None:
                self._file_done(spool, original, item.input_id)
            elif isinstance(exc, InputError):
                self._file_rejected(spool, original, exc.code, exc.message, item.input_id)
            elif not self._stop.is_set() and not isinstance(exc, OverloadedError):
                log.warning("folder %s: %s failed (%s); retrying in %.0f s", self.name, original, exc, RETRY_DELAY_S)
                with self._lock:
                    self._waiting.append((time.monotonic() + RETRY_DELAY_S, item))
            else:
                with self._lock:  # pipeline stopping: stays pending, picked up after restart
                    self._waiting.append((0.0, item))
        except OSError:
            log.exception("folder %s: cannot file %s", self.name, original)

    def _file_done(self, spool: Path, original: str, input_id: str) -> None:
        if self.cfg.keep_done:  # no fsync: the result is durable; a lost rename is filed again by recover()
            _move(spool, _free_name(self.done_dir, original, input_id[-8:]))
        else:
            spool.unlink(missing_ok=True)
        with self._lock:
            self.done += 1

    def _file_rejected(self, path: Path, original: str, code: str, message: str, input_id: str | None = None) -> None:
        target = _free_name(self.rejected_dir, original, (input_id or uuid.uuid4().hex)[-8:])
        reason = {
            "file": original,
            "input_id": input_id,
            "code": code,
            "message": message,
            "source": self.name,
            "rejected_at": self._clock(),
        }
        tmp = self.rejected_dir / f".{target.name}.reason.json.tmp"
        tmp.write_bytes(orjson.dumps(reason, option=orjson.OPT_INDENT_2))
        try:
            durable_move(path, target)
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            return
        os.replace(tmp, target.with_name(f"{target.name}.reason.json"))
        with self._lock:
            self.rejected += 1
        log.info("folder %s: rejected %s: [%s] %s", self.name, original, code, message)
