"""Model updates in the running agent: the drop folder, the swap into pipelines, probation and rollback.

One thread (``ModelUpdater``) does every install and rollback, one at a time:

    drop folder file | model_update command (with a url: fetched first, fetch.py) -> stage_update (verify, unpack)
      -> promote to versions/<v>
      -> load one model per pipeline worker -> smoke test each -> switch the pointer (fsync, os.replace)
      -> Pipeline.replace_models with probation wrappers (in-flight inputs finish on the old model)
      -> probation: the first ``probation_inputs`` inputs; an error is counted and the input is re-run on the
         previous model (nothing fails); more than ``max_error_rate`` of them -> automatic rollback
      -> passed: the previous models are released

A refused update never touches the pipelines or the pointer. The file goes to ``done/`` or to ``rejected/`` with
``<name>.reason.json``; every outcome is logged, counted (``edge_agent_model_updates_total``) and published as an
event (``model_updated``, ``model_update_rejected``, ``model_rolled_back``, ``model_probation_passed``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from edge_agent.bundles.bundle import Bundle, default_models_dir, find_bundle, load_bundle
from edge_agent.config import AgentConfig, ModelConfig, UpdatesConfig
from edge_agent.errors import (
    ConfigError,
    EdgeAgentError,
    InputError,
    ModelNotFoundError,
    UpdateError,
    UpdateFetchError,
    UpdateNotFoundError,
    UpdateRollbackError,
    UpdateSmokeTestError,
    UpdateTooLargeError,
)
from edge_agent.flow.pipeline import Pipeline, Predictor
from edge_agent.fsutil import lock_dir
from edge_agent.metrics import Metrics
from edge_agent.types import Image, Result
from edge_agent.updates.archive import Limits, bundle_from, stage_update
from edge_agent.updates.fetch import FetchSpec, fetch, resolve_url
from edge_agent.updates.format import check_applicable, parse_version
from edge_agent.updates.keys import load_trusted_keys
from edge_agent.updates.smoke import smoke_test
from edge_agent.updates.store import ModelStore

log = logging.getLogger(__name__)

ModelFactory = Callable[[Bundle, ModelConfig], Predictor]
EventSink = Callable[[str, str, dict[str, Any]], None]


# --- which bundle is in force -----------------------------------------------------------------------------------------


def configured_bundle(cfg: AgentConfig, mcfg: ModelConfig) -> Bundle:
    """The bundle the agent config names for ``mcfg``: a name under models_dir, or a folder path inside it
    (relative paths are below models_dir). A path that leads outside models_dir is refused (ConfigError)."""
    root = cfg.models_dir or default_models_dir()
    ref = Path(mcfg.bundle)
    if ref.is_absolute() or len(ref.parts) > 1:
        directory = ref if ref.is_absolute() else root / ref
        if not _inside(directory, root):
            raise ConfigError(f"models.{mcfg.name}.bundle: {mcfg.bundle} is outside models_dir ({root})")
        if not directory.is_dir():
            raise ModelNotFoundError(f"models.{mcfg.name}.bundle: no bundle folder {directory}")
        return load_bundle(directory)
    if ref.name in ("", ".", ".."):
        raise ConfigError(f"models.{mcfg.name}.bundle: {mcfg.bundle!r} is not a bundle name")
    return find_bundle(mcfg.bundle, root)


def _inside(path: Path, root: Path) -> bool:
    """``path`` is below ``root``, as written (no '..') or once both are resolved (symlinked roots)."""
    lexical = Path(os.path.normpath(path))
    if lexical.is_relative_to(os.path.normpath(root)) and lexical != Path(os.path.normpath(root)):
        return True
    resolved = path.resolve()
    return resolved.is_relative_to(root.resolve()) and resolved != root.resolve()


def in_force(store: ModelStore, configured: Bundle) -> tuple[Bundle, str]:
    """The bundle to run and where it comes from (``update`` | ``config``), as the store's pointer says.

    A damaged installed version falls back to the configured bundle (logged); so does an installed version that is
    not newer than the configured one (the board's image was upgraded since).
    """
    name = configured.manifest.name
    directory = store.installed(name)
    if directory is None:
        return configured, "config"
    try:
        bundle = bundle_from(directory)
    except UpdateError as exc:
        log.error("model %s: installed version at %s is unusable (%s); running the configured bundle",
                  name, directory, exc.message)
        return configured, "config"
    try:
        if parse_version(bundle.manifest.version) <= parse_version(configured.manifest.version):
            log.warning("model %s: configured bundle %s is at least as new as installed %s; running it",
                        name, configured.manifest.version, bundle.manifest.version)
            return configured, "config"
    except ValueError:
        pass  # an unorderable configured version: the installed update wins
    return bundle, "update"


# --- probation --------------------------------------------------------------------------------------------------------


class Probation:
    """Counts the new model's first inputs; calls ``on_fail(reason)`` or ``on_pass()`` once, from the worker."""

    def __init__(self, inputs: int, max_error_rate: float, on_fail: Callable[[str], None],
                 on_pass: Callable[[], None]) -> None:
        self.inputs = inputs
        self.budget = int(inputs * max_error_rate)
        self.seen = 0
        self.errors = 0
        self.state = "running"  # running | passed | failed
        self.last_error = ""
        self.reason = ""
        self._lock = threading.Lock()
        self._on_fail = on_fail
        self._on_pass = on_pass

    def observe(self, ok: bool, error: str = "") -> None:
        with self._lock:
            if self.state != "running":
                return
            self.seen += 1
            if not ok:
                self.errors += 1
                self.last_error = error
            if self.errors > self.budget:
                self.state = "failed"
            elif self.seen >= self.inputs:
                self.state = "passed"
            state = self.state
            if state == "failed":
                self.reason = (f"{self.errors} errors in its first {self.seen} inputs (allowed {self.budget} of "
                               f"{self.inputs}); last: {self.last_error}")
        if state == "failed":
            self._on_fail(self.reason)
        elif state == "passed":
            self._on_pass()

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "seen": self.seen, "of": self.inputs, "errors": self.errors,
                "allowed_errors": self.budget}


class OnProbation:
    """A worker's model during probation: runs the new model, and the previous one for an input the new one fails."""

    def __init__(self, new: Predictor, old: Predictor, probation: Probation) -> None:
        self.new = new
        self.old = old
        self.probation = probation

    def predict(self, image: Image) -> Result:
        return self._run(lambda m: m.predict(image))

    def predict_bytes(self, data: bytes) -> Result:
        return self._run(lambda m: m.predict_bytes(data))

    def _run(self, call: Callable[[Predictor], Result]) -> Result:
        state = self.probation.state
        if state == "passed":
            return call(self.new)
        if state == "failed":
            return call(self.old)
        try:
            result = call(self.new)
        except InputError:
            raise  # bad input is not the model's fault: not counted
        except Exception as exc:
            msg = exc.message if isinstance(exc, EdgeAgentError) else f"{type(exc).__name__}: {exc}"
            self.probation.observe(False, msg[:300])
            return call(self.old)
        self.probation.observe(True)
        return result

    def __getattr__(self, name: str) -> Any:  # set_thresholds, manifest, ...: the new model's
        return getattr(self.new, name)


def _unwrap(model: Predictor) -> Predictor:
    """The model a worker really runs: the new one, or the previous one once probation failed."""
    if isinstance(model, OnProbation):
        return model.old if model.probation.state == "failed" else model.new
    return model


# --- the running side -------------------------------------------------------------------------------------------------


@dataclass
class ModelSlot:
    """One model (by manifest name) of this agent, and the pipelines that run it."""

    name: str
    configured: Bundle
    bundle: Bundle
    source: str  # "config" | "update"
    config: ModelConfig
    users: list[tuple[Pipeline, ModelConfig]] = field(default_factory=list)
    probation: Probation | None = None
    previous_bundle: Bundle | None = None
    previous_models: list[tuple[Pipeline, list[Predictor]]] = field(default_factory=list)


def load_checked(
    factory: ModelFactory, slot: ModelSlot, bundle: Bundle, golden: tuple[bytes, str] | None
) -> list[tuple[Pipeline, list[Predictor]]]:
    """One new model per worker of each pipeline that runs ``slot``, each smoke-tested (one model when no pipeline
    runs it); raises UpdateSmokeTestError when any does not load or fails."""
    fresh: list[tuple[Pipeline, list[Predictor]]] = []
    try:
        for pipeline, mcfg in slot.users:
            fresh.append((pipeline, [factory(bundle, mcfg) for _ in pipeline.models]))
        checks = [m for _, ms in fresh for m in ms] or [factory(bundle, slot.config)]
    except UpdateError:
        raise
    except Exception as exc:
        msg = exc.message if isinstance(exc, EdgeAgentError) else f"{type(exc).__name__}: {exc}"
        raise UpdateSmokeTestError(f"{bundle.name} {bundle.manifest.version} does not load: {msg}") from exc
    for model in checks:
        smoke_test(model, bundle, golden)
    return fresh


class ModelUpdater:
    """Installs and rolls back model updates in a running agent (one background thread; one change at a time)."""

    def __init__(
        self,
        settings: UpdatesConfig,
        store: ModelStore,
        slots: Mapping[str, ModelSlot],
        *,
        model_factory: ModelFactory,
        metrics: Metrics | None = None,
        publish_event: EventSink | None = None,
        on_change: Callable[[str, Bundle], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.slots = dict(slots)
        self._factory = model_factory
        self._metrics = metrics
        self._publish = publish_event
        self._on_change = on_change
        self._trusted: dict[str, Any] = {}
        self._jobs: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[str, tuple[int, int]] = {}
        self._fetching: set[str] = set()
        self._stuck: dict[str, tuple[int, int]] = {}
        self.last: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        for slot in self.slots.values():
            if self._metrics is not None:
                self._metrics.set_model_version(slot.name, slot.bundle.manifest.version)

    @property
    def drop_dir(self) -> Path:
        """``updates.drop_dir`` (set by ``config.finalize``), else ``<state_dir>/updates``."""
        if self.settings.drop_dir is not None:
            return self.settings.drop_dir
        return self.store.root.parent / "updates"

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the trusted keys (ConfigError on a bad key file) and start the thread."""
        self._trusted = load_trusted_keys(self.settings.trusted_keys)
        for d in (self.drop_dir, self.drop_dir / "done", self.drop_dir / "rejected"):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"updates.drop_dir: cannot create {d}: {exc.strerror}") from exc
        self._thread = threading.Thread(target=self._run, name="model-updates", daemon=True)
        self._thread.start()
        log.info("model updates: watching %s (%d trusted keys)", self.drop_dir, len(self._trusted))

    def stop(self, timeout: float = 5.0) -> bool:
        self._stop.set()
        self._jobs.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- requests (any thread; the work happens on the updater thread) ------------------------------------------

    def request_file(self, name: str) -> Path:
        """Queue ``drop_dir/name`` for installation (the model_update command)."""
        path = self.drop_dir / name
        if "/" in name or name.startswith(".") or not path.is_file() or path.is_symlink():
            raise UpdateNotFoundError(f"no update file {name!r} in {self.drop_dir}")
        self._jobs.put(("file", path))
        return path

    def request_fetch(self, spec: FetchSpec) -> None:
        """Fetch ``spec`` from the coordinator (own thread), then queue it like :meth:`request_file`; a failed fetch is
        reported as a ``model_update_rejected`` event. Raises UpdateError at once for what cannot work."""
        if spec.size > self.settings.max_update_bytes:
            raise UpdateTooLargeError(
                f"update of {spec.size} bytes exceeds updates.max_update_bytes ({self.settings.max_update_bytes})")
        resolve_url(spec.url, self.settings.fetch_base_url)
        with self._lock:
            if spec.name in self._fetching:
                raise UpdateFetchError(f"{spec.name} is already being fetched")
            self._fetching.add(spec.name)
        threading.Thread(target=self._fetch, args=(spec,), name=f"fetch-{spec.name}", daemon=True).start()

    def _fetch(self, spec: FetchSpec) -> None:
        try:
            path = fetch(spec, self.drop_dir, base_url=self.settings.fetch_base_url,
                         max_bytes=self.settings.max_update_bytes, timeout_s=self.settings.fetch_timeout_s)
        except UpdateError as exc:
            self._rejected(Path(spec.name), exc)
            return
        except Exception as exc:  # never dies silently
            log.exception("model updates: unexpected error fetching %s", spec.name)
            self._rejected(Path(spec.name), UpdateFetchError(f"internal error: {type(exc).__name__}: {exc}"))
            return
        finally:
            with self._lock:
                self._fetching.discard(spec.name)
        self._jobs.put(("file", path))

    def request_rollback(self, model: str, reason: str = "requested by command") -> None:
        if model not in self.slots:
            raise UpdateRollbackError(f"model {model!r} is not configured on this agent")
        self._jobs.put(("rollback", (model, reason, None)))

    # --- the thread ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.settings.poll_interval_s
        next_scan = time.monotonic() + interval
        while not self._stop.is_set():
            try:
                kind, arg = self._jobs.get(timeout=max(0.0, next_scan - time.monotonic()))
            except queue.Empty:
                kind, arg = "none", None
            try:
                if kind == "stop":
                    return
                if time.monotonic() >= next_scan:  # scans keep their pace however many jobs come in
                    if self.settings.watch:
                        self._scan()
                    next_scan = time.monotonic() + interval
                if kind == "file":
                    if arg.exists() or arg.is_symlink():  # a scan may have taken it since the command
                        self.process_file(arg)
                elif kind == "rollback":
                    model, reason, probation = arg
                    self._rollback_job(model, reason, probation)
                elif kind == "passed":
                    self._passed(*arg)
            except Exception:  # the loop never dies: count, report, carry on
                log.exception("model updates: %s job failed", kind)

    def _scan(self) -> None:
        try:
            entries = sorted(self.drop_dir.iterdir())
        except OSError as exc:
            log.warning("model updates: cannot list %s: %s", self.drop_dir, exc.strerror)
            return
        present: set[str] = set()
        for p in entries:
            name = p.name
            if name.startswith(".") or name.endswith((".part", ".tmp")) or (p.is_dir() and not p.is_symlink()):
                continue
            present.add(name)
            try:
                st = p.lstat()
            except OSError:
                continue
            mark = (st.st_size, st.st_mtime_ns)
            if self._stuck.get(name) == mark:  # processed, but it could not be moved away: not again
                continue
            if self._seen.get(name) != mark:  # still being copied, or new: look again next scan
                self._seen[name] = mark
                continue
            self._seen.pop(name, None)
            self.process_file(p)
            if os.path.lexists(p):
                self._stuck[name] = mark
        for gone in set(self._seen) - present:
            del self._seen[gone]
        for gone in set(self._stuck) - present:
            del self._stuck[gone]

    def process_file(self, path: Path) -> dict[str, Any]:
        """Install ``path`` and file it under ``done/`` or ``rejected/`` (with a reason file)."""
        try:
            outcome = self.install(path)
            dest = self.drop_dir / "done"
        except UpdateError as exc:
            outcome = self._rejected(path, exc)
            dest = self.drop_dir / "rejected"
        except Exception as exc:
            log.exception("model updates: unexpected error installing %s", path.name)
            outcome = self._rejected(path, UpdateError(f"internal error: {type(exc).__name__}: {exc}"))
            dest = self.drop_dir / "rejected"
        _file_away(path, dest, outcome if outcome["outcome"] == "rejected" else None)
        return outcome

    # --- install ------------------------------------------------------------------------------------------------

    def install(self, path: Path) -> dict[str, Any]:
        """Verify, stage, smoke-test and swap in one update file; raises UpdateError with nothing changed."""
        with self._lock:
            for slot in self.slots.values():  # a failed probation whose rollback is still queued: do it first
                if slot.probation is not None and slot.probation.state == "failed":
                    self.rollback(slot.name, slot.probation.reason, slot.probation)
            limits = Limits(max_bytes=self.settings.max_update_bytes)
            installed = {n: s.bundle.manifest.version for n, s in self.slots.items()}
            staged = stage_update(
                path, self.store.staging_root, self._trusted, limits=limits,
                check=lambda st: check_applicable(st, self.slots.keys(), installed),
            )
            name, version = staged.statement.name, staged.statement.version
            slot = self.slots[name]
            golden = staged.golden()
            version_dir = self.store.promote(staged)
            try:
                bundle = bundle_from(version_dir)
                fresh = load_checked(self._factory, slot, bundle, golden)
            except BaseException as exc:
                self.store.discard(name, version)
                if isinstance(exc, UpdateError):
                    exc.model = name
                raise
            self._settle_probation(slot)  # a newer update supersedes one still on probation
            from_version = slot.bundle.manifest.version if slot.source == "update" else None
            try:
                self.store.switch(name, version, from_version)
            except OSError as exc:  # disk full, I/O error: the old pointer (and model) stay in force
                self.store.discard(name, version)
                raise UpdateError(f"cannot switch {name} to {version}: {exc}") from exc
            old_version = slot.bundle.manifest.version
            probation = self._swap_in(slot, bundle, fresh)
            outcome = {
                "outcome": "installed", "model": name, "version": version, "previous": old_version,
                "file": path.name, "probation": probation.to_dict(),
            }
        log.info("model updates: %s %s installed from %s (was %s); on probation for %d inputs",
                 name, version, path.name, old_version, probation.inputs)
        self._record(outcome, "model_updated", "info")
        return outcome

    def _swap_in(self, slot: ModelSlot, bundle: Bundle, fresh: list[tuple[Pipeline, list[Predictor]]]) -> Probation:
        s = self.settings
        probation = Probation(
            s.probation_inputs, s.max_error_rate,
            on_fail=lambda reason: self._jobs.put(("rollback", (slot.name, reason, probation))),
            on_pass=lambda: self._jobs.put(("passed", (slot.name, probation))),
        )
        previous: list[tuple[Pipeline, list[Predictor]]] = []
        for pipeline, models in fresh:
            olds = [_unwrap(m) for m in pipeline.models]
            pipeline.replace_models([OnProbation(n, o, probation) for n, o in zip(models, olds, strict=True)])
            previous.append((pipeline, olds))
        slot.previous_bundle, slot.previous_models = slot.bundle, previous
        slot.bundle, slot.source, slot.probation = bundle, "update", probation
        self._changed(slot)
        return probation

    def _settle_probation(self, slot: ModelSlot) -> None:
        if slot.probation is not None and slot.probation.state == "running":
            slot.probation.state = "passed"
        self._passed(slot.name, slot.probation)

    def _passed(self, name: str, probation: Probation | None) -> None:
        """Probation over: workers run the new model directly; the previous models are released."""
        with self._lock:
            slot = self.slots[name]
            if probation is None or slot.probation is not probation or probation.state != "passed":
                return
            for pipeline, _olds in slot.previous_models:
                pipeline.replace_models([_unwrap(m) for m in pipeline.models])
            slot.previous_models = []
            slot.probation = None
            log.info("model updates: %s %s passed probation (%d inputs, %d errors)", name,
                     slot.bundle.manifest.version, probation.seen, probation.errors)
            if self.last is not None and self.last.get("model") == name:
                self.last = {**self.last, "probation": probation.to_dict()}
            version = slot.bundle.manifest.version
        if self._publish is not None:  # what a staged rollout waits for (edge-coordinator rollout)
            try:
                self._publish("model_probation_passed", "info",
                              {"model": name, "version": version, "probation": probation.to_dict()})
            except Exception:
                log.exception("model updates: cannot publish model_probation_passed")

    # --- rollback -----------------------------------------------------------------------------------------------

    def _rollback_job(self, name: str, reason: str, probation: Probation | None) -> None:
        try:
            self.rollback(name, reason, probation)
        except UpdateError as exc:
            log.error("model updates: rollback of %s refused: [%s] %s", name, exc.code, exc.message)
            self._record({"outcome": "rollback_refused", "model": name, "code": exc.code, "message": exc.message},
                         "model_rollback_refused", "alarm")

    def rollback(self, name: str, reason: str, probation: Probation | None = None) -> dict[str, Any]:
        """Put the previous version back (from memory while on probation, else loaded and smoke-tested)."""
        with self._lock:
            slot = self.slots.get(name)
            if slot is None:
                raise UpdateRollbackError(f"model {name!r} is not configured on this agent")
            if probation is not None and slot.probation is not probation:
                return {"outcome": "stale"}  # that probation was already settled by a newer change
            if slot.source != "update":
                raise UpdateRollbackError(f"{name} runs its configured bundle: there is no update to roll back")
            bad = slot.bundle.manifest.version
            if slot.probation is not None and slot.previous_bundle is not None and slot.previous_models:
                slot.probation.state = "failed"  # wrappers route to the previous model right away
                for pipeline, olds in slot.previous_models:
                    pipeline.replace_models(olds)
                target = slot.previous_bundle
            else:
                pointer = self.store.pointer(name)
                target = (bundle_from(self.store.version_dir(name, pointer.previous)) if pointer.previous
                          else slot.configured)
                fresh = load_checked(self._factory, slot, target, None)
                for pipeline, models in fresh:
                    pipeline.replace_models(models)
            pointer = self.store.rollback(name, reason)
            slot.bundle, slot.source = target, ("update" if pointer.current is not None else "config")
            slot.probation, slot.previous_bundle, slot.previous_models = None, None, []
            self._changed(slot)
            outcome = {"outcome": "rolled_back", "model": name, "version": target.manifest.version,
                       "from_version": bad, "reason": reason}
        log.warning("model updates: %s rolled back from %s to %s: %s", name, bad, target.manifest.version, reason)
        self._record(outcome, "model_rolled_back", "warning")
        return outcome

    # --- bookkeeping ----------------------------------------------------------------------------------------------

    def _changed(self, slot: ModelSlot) -> None:
        if self._metrics is not None:
            self._metrics.set_model_version(slot.name, slot.bundle.manifest.version)
        if self._on_change is not None:
            self._on_change(slot.name, slot.bundle)

    def _rejected(self, path: Path, exc: UpdateError) -> dict[str, Any]:
        outcome = {"outcome": "rejected", "model": exc.model, "file": path.name, "code": exc.code,
                   "message": exc.message}
        log.warning("model updates: %s rejected: [%s] %s", path.name, exc.code, exc.message)
        self._record(outcome, "model_update_rejected", "warning")
        return outcome

    def _record(self, outcome: dict[str, Any], event: str, severity: str) -> None:
        outcome = {**outcome, "at": time.time()}
        self.last = outcome
        self.history = [*self.history[-19:], outcome]
        if self._metrics is not None and outcome["outcome"] in ("installed", "rejected", "rolled_back"):
            self._metrics.model_update(str(outcome.get("model") or "unknown"), outcome["outcome"])
        if self._publish is not None:
            try:
                self._publish(event, severity, {k: v for k, v in outcome.items() if k != "at"})
            except Exception:
                log.exception("model updates: cannot publish %s", event)

    def status(self) -> dict[str, Any]:
        """For /health: per model the version in force, where it comes from, probation; the last outcome."""
        models = {}
        for name, slot in self.slots.items():
            p = self.store.pointer(name)
            models[name] = {
                "version": slot.bundle.manifest.version, "source": slot.source, "previous": p.previous,
                "probation": slot.probation.to_dict() if slot.probation is not None else None,
                "rolled_back": dict(p.rolled_back) if p.rolled_back else None,
            }
        with self._lock:
            fetching = sorted(self._fetching)
        return {"enabled": self.settings.enabled, "watching": self.running, "drop_dir": str(self.drop_dir),
                "models": models, "last": self.last, "fetching": fetching}


def _file_away(path: Path, dest: Path, reason: dict[str, Any] | None) -> None:
    """Move a processed update file to ``dest`` (keeping an older file of the same name) plus its reason file."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / path.name
        if target.exists():
            target = dest / f"{path.stem}.{int(time.time() * 1000)}{path.suffix}"
        os.replace(path, target)
        if reason is not None:
            doc = {k: reason.get(k) for k in ("code", "message", "model", "at")}
            # whole or absent: an operator (or a watcher) that sees the reason file can always parse it
            final = dest / f"{target.name}.reason.json"
            tmp = final.with_name(final.name + ".tmp")
            tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
            os.replace(tmp, final)
    except OSError as exc:
        log.error("model updates: cannot move %s to %s: %s", path.name, dest, exc.strerror)


# --- offline (the CLI) ------------------------------------------------------------------------------------------------


def _lock_state_dir(state_dir: Path) -> int:
    try:
        return lock_dir(state_dir)
    except OSError as exc:
        raise ConfigError(
            f"state_dir: an edge-agent is running with {state_dir}; put the file in its updates drop folder instead"
        ) from exc


def _offline_slots(cfg: AgentConfig, store: ModelStore) -> dict[str, ModelSlot]:
    slots: dict[str, ModelSlot] = {}
    for mcfg in cfg.models:
        configured = configured_bundle(cfg, mcfg)
        if configured.manifest.name not in slots:
            bundle, source = in_force(store, configured)
            slots[configured.manifest.name] = ModelSlot(configured.manifest.name, configured, bundle, source, mcfg)
    return slots


def install_offline(
    cfg: AgentConfig, update: Path, model_factory: ModelFactory, trusted: Sequence[Path] = ()
) -> dict[str, Any]:
    """``edge-agent models install``: verify, smoke-test and put an update in force in ``cfg.state_dir`` while the
    agent is stopped (it runs the new version at its next start). Keys: ``trusted`` or ``updates.trusted_keys``."""
    keys = tuple(trusted) or cfg.updates.trusted_keys
    if not keys:
        raise ConfigError("updates.trusted_keys: no trusted key configured (or given with --trusted-key)")
    fd = _lock_state_dir(cfg.state_dir)
    try:
        store = ModelStore(cfg.state_dir / "models")
        store.clean()
        slots = _offline_slots(cfg, store)
        installed = {n: s.bundle.manifest.version for n, s in slots.items()}
        staged = stage_update(
            update, store.staging_root, load_trusted_keys(keys),
            limits=Limits(max_bytes=cfg.updates.max_update_bytes),
            check=lambda st: check_applicable(st, slots.keys(), installed),
        )
        name, version = staged.statement.name, staged.statement.version
        slot = slots[name]
        golden = staged.golden()
        version_dir = store.promote(staged)
        try:
            bundle = bundle_from(version_dir)
            load_checked(model_factory, slot, bundle, golden)
        except BaseException as exc:
            store.discard(name, version)
            if isinstance(exc, UpdateError):
                exc.model = name
            raise
        store.switch(name, version, slot.bundle.manifest.version if slot.source == "update" else None)
        return {"outcome": "installed", "model": name, "version": version, "previous": slot.bundle.manifest.version,
                "state_dir": str(cfg.state_dir)}
    finally:
        os.close(fd)


def rollback_offline(cfg: AgentConfig, model: str, model_factory: ModelFactory) -> dict[str, Any]:
    """``edge-agent models rollback``: put the previous version (or the configured bundle) back in force."""
    fd = _lock_state_dir(cfg.state_dir)
    try:
        store = ModelStore(cfg.state_dir / "models")
        slots = _offline_slots(cfg, store)
        slot = slots.get(model)
        if slot is None:
            raise UpdateRollbackError(f"model {model!r} is not configured in this config")
        if slot.source != "update":
            raise UpdateRollbackError(f"{model} runs its configured bundle: there is no update to roll back")
        pointer = store.pointer(model)
        target = bundle_from(store.version_dir(model, pointer.previous)) if pointer.previous else slot.configured
        load_checked(model_factory, slot, target, None)
        store.rollback(model, "requested on the command line")
        return {"outcome": "rolled_back", "model": model, "version": target.manifest.version,
                "from_version": slot.bundle.manifest.version}
    finally:
        os.close(fd)
