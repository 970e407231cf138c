"""The composition root: the one place where the agent's concrete parts are built, started and stopped.

    config -> outbox -> model store (installed updates) -> models (one session per pipeline worker, warmed up)
           -> pipelines -> publisher (MQTT; never blocks start-up) -> model updater (drop folder, when enabled)
           -> restart recovery -> sources -> HTTP API -> /metrics

A full state disk is a state, not a failure: the outbox refuses new inputs while it is short of space
(``health`` says ``degraded``, sources keep their files, uploads get 507) and the service re-runs
pending inputs once space returns. Nothing at start-up exits for lack of space except an outbox that
cannot be opened at all (``StorageError``: the CLI exits 75, which the systemd unit restarts).

``stop(timeout)`` undoes it in reverse within a bounded time: sources stop taking input, the API
stops, pipelines drain (what they cannot finish stays pending in the outbox for the next start),
the publisher says ``offline`` and disconnects, the outbox closes. ``run_service`` wires SIGTERM
and SIGINT to that.

Factories for the noisy parts (MQTT transport, camera capture, models) can be passed in, so tests
run the whole service with fakes or with a real broker.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

from prometheus_client import CollectorRegistry, start_http_server

from edge_agent.agent.control import handle_command
from edge_agent.agent.health import agent_health, models_info
from edge_agent.agent.recovery import InFlight, Recovery
from edge_agent.bundles.bundle import Bundle
from edge_agent.config import AgentConfig, CameraSourceConfig, FolderSourceConfig, ModelConfig, PipelineConfig
from edge_agent.delivery.feedback import InspectedPart, InspectionStore, KeepLimits
from edge_agent.delivery.homeassistant import HomeAssistant
from edge_agent.delivery.outbox import Outbox, OutboxLimits
from edge_agent.delivery.publisher import Publisher, PublisherSettings, availability_will
from edge_agent.delivery.space import SpaceState
from edge_agent.errors import ConfigError, OverloadedError, StorageError, StorageFullError
from edge_agent.flow.pipeline import (
    InputItem,
    Pipeline,
    PipelineOutput,
    Predictor,
    Sector,
    make_sector,
    sector_image_side,
)
from edge_agent.flow.sources import Source
from edge_agent.flow.sources.camera import CameraSource, CaptureFactory
from edge_agent.flow.sources.folder import FolderSource
from edge_agent.fsutil import lock_dir
from edge_agent.line.controller import LineController
from edge_agent.line.outputs import RejectSignal, build_output
from edge_agent.metrics import Metrics
from edge_agent.protocol.commands import Command
from edge_agent.protocol.signing import AgentAuth
from edge_agent.transport.base import MqttSettings, Transport, Will
from edge_agent.types import AnomalyScore
from edge_agent.updates.keys import load_private_key, load_trusted_keys
from edge_agent.updates.manager import ModelSlot, ModelUpdater, configured_bundle, in_force
from edge_agent.updates.store import ModelStore
from edge_agent.vision.decode import PixelBudget

log = logging.getLogger(__name__)


TransportFactory = Callable[[MqttSettings, Will], Transport]
ModelFactory = Callable[[Bundle, ModelConfig], Predictor]


def _paho_transport(settings: MqttSettings, will: Will) -> Transport:
    from edge_agent.transport.mqtt import PahoTransport

    return PahoTransport(settings, will=will)


def _onnx_model(bundle: Bundle, cfg: ModelConfig, *, pixel_budget: PixelBudget | None = None) -> Predictor:
    from edge_agent.vision.model import Model
    from edge_agent.vision.runtime import RuntimeOptions

    opts = RuntimeOptions(providers=cfg.providers, intra_op_threads=cfg.threads, allow_spinning=False)
    model = Model.load(bundle, opts, max_pixels=cfg.max_pixels, pixel_budget=pixel_budget)
    if cfg.score_threshold is not None:
        try:
            model.set_thresholds(score=cfg.score_threshold)
        except ValueError as exc:
            raise ConfigError(f"models.{cfg.name}.score_threshold: {exc}") from exc
    if cfg.warmup:
        model.warmup(1)
    return model


onnx_model_factory = _onnx_model
"""The model factory the agent uses (also for ``edge-agent models install``)."""


def _opencv_capture(url: str) -> Any:
    from edge_agent.flow.sources.opencv import OpenCvCapture

    return OpenCvCapture(url)


class Service:
    """The running agent. ``start()``, then ``stop()``; ``health()`` any time."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        registry: CollectorRegistry | None = None,
        transport_factory: TransportFactory = _paho_transport,
        capture_factory: CaptureFactory = _opencv_capture,
        model_factory: ModelFactory | None = None,
    ) -> None:
        self.cfg = cfg
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self._transport_factory = transport_factory
        self._capture_factory = capture_factory
        self.pixel_budget = PixelBudget(cfg.decode_pixel_budget)  # shared by every decode of untrusted bytes
        self._model_factory: ModelFactory = model_factory or functools.partial(
            _onnx_model, pixel_budget=self.pixel_budget
        )
        self.outbox: Outbox | None = None
        self.inspections: InspectionStore | None = None
        self.publisher: Publisher | None = None
        self.pipelines: dict[str, Pipeline] = {}
        self.line: LineController | None = None
        self.chain_models: dict[str, Predictor] = {}
        self.sources: dict[str, Source] = {}
        self._bundles: dict[str, Bundle] = {}
        self._sources: dict[str, str] = {}  # config model name -> "config" | "update"
        self._slots: dict[str, ModelSlot] = {}
        self.store: ModelStore | None = None
        self.updater: ModelUpdater | None = None
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        self._metrics_server: Any = None
        self.recovery: Recovery | None = None
        self._stopping = threading.Event()
        self._lock_fd: int | None = None
        self._ready = False
        self.state = "created"
        self.in_flight = InFlight()

    # --- paths ----------------------------------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.cfg.state_dir

    def spool_dir(self, source: str) -> Path:
        return self.state_dir / "spool" / source

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Build and start everything; raises EdgeAgentError (config, models, storage) before anything runs.
        A disk too full to start on raises StorageFullError (never a ConfigError: it is not the config's fault)."""
        try:
            self._start()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(f"state_dir: no space left under {self.state_dir}: {exc}") from exc
            raise

    def _start(self) -> None:
        self.state = "starting"
        cfg = self.cfg
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFullError(f"state_dir: no space to create {self.state_dir}") from exc
            raise ConfigError(f"state_dir: cannot create {self.state_dir}: {exc.strerror}") from exc
        self._lock_state_dir()
        self.store = ModelStore(self.state_dir / "models")
        self.store.clean()  # staging leftovers and versions a crash left unswitched
        o = cfg.outbox
        limits = OutboxLimits(
            max_bytes=o.max_bytes,
            max_age_s=o.max_age_s,
            full_policy=o.full_policy,
            retention_s=o.retention_s,
            min_free_bytes=o.min_free_bytes,
            reserve_bytes=o.reserve_bytes,
        )
        self.outbox = Outbox(self.state_dir / "outbox.db", cfg.device_id, limits)
        outbox = self.outbox

        def outbox_stats() -> tuple[int, int, float]:
            st = outbox.stats()
            return st.backlog, st.bytes, st.oldest_age_s

        def storage() -> dict[str, Any]:
            st = outbox.stats()
            return {"disk_free_bytes": st.disk_free_bytes, "disk_state": st.disk_state,
                    "reserve_held": st.reserve_held, "alarms": outbox.alarm_counts()}

        self.metrics.bind_outbox(outbox_stats)
        self.metrics.bind_storage(storage)
        outbox.add_space_listener(self._on_space)
        try:
            self._build_inspection_store()
            self._build_pipelines()
            self._build_publisher()
            self._build_updater()
            for p in self.pipelines.values():
                p.start()
            if self.line is not None:
                self.line.start()
            if self.publisher is not None:
                self.publisher.start()
            if self.updater is not None and cfg.updates.enabled:
                self.updater.start()
            self.recovery = Recovery(cfg, outbox, self.pipelines, self.submit, self.in_flight, self.spool_dir)
            self.recovery.recover()
            self.recovery.start_housekeeping()
            self._build_sources()
            for s in self.sources.values():
                s.start()
            self._start_http()
            self._start_metrics()
        except BaseException:
            self.stop(timeout=5.0)
            raise
        self._ready = True
        self.state = "running"
        log.info(
            "edge-agent %s running: pipelines %s, sources %s, mqtt %s",
            cfg.device_id,
            ", ".join(self.pipelines),
            ", ".join(self.sources) or "none",
            f"{cfg.mqtt.host}:{cfg.mqtt.port}" if cfg.mqtt.enabled else "off",
        )

    def stop(self, timeout: float | None = None) -> bool:
        """Stop within ``timeout`` seconds (default ``shutdown_timeout_s``); True when everything ended cleanly."""
        if self._stopping.is_set():
            return True
        self._stopping.set()
        self._ready = False
        self.state = "stopping"
        deadline = time.monotonic() + (timeout if timeout is not None else self.cfg.shutdown_timeout_s)

        def left(share: float = 1.0) -> float:
            return max(0.05, (deadline - time.monotonic()) * share)

        clean = True
        for source in self.sources.values():
            clean &= bool(source.stop(min(left(0.2), 2.0)))
        if self._http is not None:
            self._http.should_exit = True
            if self._http_thread is not None:
                self._http_thread.join(min(left(0.3), 3.0))
                clean &= not self._http_thread.is_alive()
        if self.recovery is not None:
            self.recovery.stop(min(left(0.1), 1.0))
        if self.updater is not None:
            clean &= self.updater.stop(min(left(0.3), 5.0))
        for pipeline in self.pipelines.values():
            clean &= pipeline.stop(left(0.6))
        if self.line is not None:
            clean &= self.line.stop(min(left(0.3), 2.0))
        if self.publisher is not None:
            self.publisher.stop(left(0.8))
        if self.inspections is not None:
            self.inspections.close(min(left(0.5), 2.0))
        if self.outbox is not None:
            self.outbox.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        self.state = "stopped"
        log.info("edge-agent stopped (%s)", "clean" if clean else "timed out; unfinished inputs stay pending")
        return clean

    @property
    def ready(self) -> bool:
        return self._ready

    def _lock_state_dir(self) -> None:
        """One agent per state directory: two writers on one outbox and spool would step on each other."""
        try:
            self._lock_fd = lock_dir(self.state_dir)
        except BlockingIOError as exc:
            raise ConfigError(f"state_dir: another edge-agent is running with {self.state_dir}") from exc
        except OSError as exc:  # ENOSPC: no inode left for the lock file
            raise StorageError(f"state_dir: cannot create {self.state_dir / 'agent.lock'}: {exc.strerror}") from exc

    # --- building ---------------------------------------------------------------------------------------------------

    def _bundle(self, mcfg: ModelConfig) -> Bundle:
        """The bundle in force for ``mcfg``: an installed update when the model store's pointer names one."""
        if mcfg.name in self._bundles:
            return self._bundles[mcfg.name]
        assert self.store is not None
        configured = configured_bundle(self.cfg, mcfg)
        bundle, source = in_force(self.store, configured)
        name = configured.manifest.name
        if name not in self._slots:
            self._slots[name] = ModelSlot(name, configured, bundle, source, mcfg)
        slot = self._slots[name]
        if slot.configured.directory.resolve() != configured.directory.resolve():
            raise ConfigError(
                f"models.{mcfg.name}.bundle: model {name!r} is already loaded from {slot.configured.directory}; "
                "one bundle folder per model name (updates are installed by name)"
            )
        self._bundles[mcfg.name], self._sources[mcfg.name] = slot.bundle, slot.source
        return slot.bundle

    def _build_line(self) -> None:
        """Chained models (one shared session each: onnxruntime runs are thread-safe) and the line controller."""
        models = {m.name: m for m in self.cfg.models}
        chained = {p.inspection.classify.model for p in self.cfg.pipelines
                   if p.inspection is not None and p.inspection.classify is not None}
        chained |= {r.classify.model for r in self.cfg.line.recipes if r.classify is not None}
        for name in sorted(chained):
            self.chain_models[name] = self._model_factory(self._bundle(models[name]), models[name])
        line = self.cfg.line
        if not line.recipes:
            return
        outputs: dict[str, RejectSignal] = {o.name: build_output(o, publish=self._publish_event) for o in line.outputs}
        self.line = LineController(
            line, pipelines=self.cfg.pipelines, submit=self.submit, outputs=outputs, models=self.chain_models,
            metrics=self.metrics, pixel_budget=self.pixel_budget,
            max_pixels=max((m.max_pixels for m in self.cfg.models), default=40_000_000),
        )

    def _build_pipelines(self) -> None:
        assert self.outbox is not None
        self._build_line()
        models = {m.name: m for m in self.cfg.models}
        line_pipelines = {r.pipeline for r in self.cfg.line.recipes}
        for pcfg in self.cfg.pipelines:
            mcfg = models[pcfg.model]
            bundle = self._bundle(mcfg)
            workers = [self._model_factory(bundle, mcfg) for _ in range(pcfg.workers)]
            pipeline = Pipeline(
                pcfg.name,
                workers,
                self.outbox,
                kind=pcfg.kind,
                sector=self._sector(pcfg, line_pipelines, bundle.manifest.labels),
                queue_size=pcfg.queue_size,
                metrics=self.metrics,
                sector_image_side=sector_image_side(pcfg),
            )
            pipeline.add_sink("events", self._events_sink)
            if self.inspections is not None and self.inspections.keeps(pcfg.name):
                pipeline.add_sink("keep_image", self._keep_sink)  # last: never delays the reject signal
            self.pipelines[pcfg.name] = pipeline
            self._slots[bundle.manifest.name].users.append((pipeline, mcfg))

    def _sector(self, pcfg: PipelineConfig, line_pipelines: set[str], labels: Sequence[str] = ()) -> Sector:
        sector = make_sector(pcfg, self.chain_models, labels)
        if self.line is not None and pcfg.name in line_pipelines:
            sector = self.line.sector_for(sector)
        return sector

    def _build_inspection_store(self) -> None:
        """Recent images of inspected parts and operator feedback (``delivery.feedback``), when a pipeline keeps any."""
        outbox = self.outbox
        assert outbox is not None
        limits = {p.name: KeepLimits(p.inspection.keep_images, p.inspection.keep_max_bytes)
                  for p in self.cfg.pipelines if p.kind == "inspection" and p.inspection is not None}
        limits.update({p.name: KeepLimits() for p in self.cfg.pipelines if p.kind == "inspection"
                       and p.inspection is None})
        if not any(lim.images > 0 for lim in limits.values()):
            return

        def record_event(event: str, severity: str, data: dict[str, Any]) -> None:
            level: Literal["info", "warning", "alarm"] = "warning" if severity == "warning" else "info"
            outbox.add_event(event, level, data)

        def known(ident: str) -> bool:
            return (outbox.get_result(ident) or outbox.get_result_by_input(ident)) is not None

        self.inspections = InspectionStore(self.state_dir, limits, space=lambda: outbox.disk_state,
                                           record_event=record_event, known=known)
        outbox.add_space_listener(self.inspections.on_space)
        self.metrics.bind_feedback(self.inspections.stats)
        self.inspections.start()

    def _keep_sink(self, out: PipelineOutput, item: InputItem) -> None:
        """Hand the part's image to the inspection store (a hard link or a reference: cheap)."""
        if self.inspections is None:
            return
        anomaly = next((p for p in out.result.predictions if isinstance(p, AnomalyScore)), None)
        verdict, score = out.sector.get("verdict"), out.sector.get("score")
        part = InspectedPart(
            result_id=out.stored.result_id, input_id=item.input_id, pipeline=item.pipeline, source=item.source,
            model=out.result.model, model_version=out.result.model_version,
            verdict=str(verdict) if verdict is not None else None,
            score=float(score) if isinstance(score, int | float) else None,
            threshold=round(anomaly.threshold, 6) if anomaly is not None else None,
            part_id=item.hints.get("part_id"),
        )
        self.inspections.keep(part, spool_path=item.spool_path, data=item.data, image=item.image)

    def _build_updater(self) -> None:
        assert self.store is not None

        def on_change(name: str, bundle: Bundle) -> None:
            slot = self._slots[name]
            for cname, b in list(self._bundles.items()):
                if b.manifest.name == name:
                    self._bundles[cname], self._sources[cname] = bundle, slot.source

        self.updater = ModelUpdater(
            self.cfg.updates, self.store, self._slots, model_factory=self._model_factory, metrics=self.metrics,
            publish_event=self._publish_event, on_change=on_change,
        )

    def _publish_event(self, event: str, severity: str, data: dict[str, Any]) -> None:
        if self.publisher is not None:
            level: Literal["info", "warning", "alarm"] = (
                "alarm" if severity == "alarm" else "warning" if severity == "warning" else "info"
            )
            self.publisher.publish_event(event, level, data)

    def _build_publisher(self) -> None:
        m = self.cfg.mqtt
        if not m.enabled:
            return
        assert self.outbox is not None
        settings = MqttSettings(
            host=m.host,
            port=m.port,
            client_id=m.client_id or self.cfg.device_id,
            keepalive_s=m.keepalive_s,
            username=m.username,
            password=m.password.get_secret_value() if m.password is not None else None,
            tls=m.tls.enabled,
            ca_file=str(m.tls.ca_file) if m.tls.ca_file else None,
            cert_file=str(m.tls.cert_file) if m.tls.cert_file else None,
            key_file=str(m.tls.key_file) if m.tls.key_file else None,
            max_inflight=m.max_inflight,
            reconnect_max_s=m.reconnect_max_s,
        )
        session_ts = time.time()  # the will and every `online` of this process carry it (see availability_will)
        transport = self._transport_factory(settings, availability_will(self.cfg.device_id, session_ts))
        auth = AgentAuth(
            ack_keys=load_trusted_keys(m.ack_keys),
            command_keys=load_trusted_keys(self.cfg.commands.trusted_keys),
            result_key=load_private_key(m.result_key) if m.result_key is not None else None,
            max_clock_skew_s=m.max_clock_skew_s,
            command_max_ttl_s=self.cfg.commands.max_ttl_s,
        )
        self.publisher = Publisher(
            self.outbox,
            transport,
            self.cfg.device_id,
            health=self.health,
            command_handler=self.handle_command,
            settings=PublisherSettings(
                window=m.max_inflight,
                heartbeat_s=m.heartbeat_s,
                ack_timeout_s=m.republish_after_s,
                republish_per_s=m.republish_rate,
            ),
            auth=auth,
            policy=self.cfg.commands.policy(),
            session_ts=session_ts,
            home_assistant=self._home_assistant(),
        )
        self.metrics.bind_publisher(self.publisher.snapshot)

    def _home_assistant(self) -> HomeAssistant | None:
        ha = self.cfg.home_assistant
        if not ha.enabled:
            return None
        return HomeAssistant(
            self.cfg.device_id,
            [(p.name, p.kind) for p in self.cfg.pipelines],
            discovery_prefix=ha.discovery_prefix,
            state_interval_s=ha.state_interval_s,
        )

    def _build_sources(self) -> None:
        assert self.outbox is not None
        for scfg in self.cfg.sources:
            if isinstance(scfg, FolderSourceConfig):
                self.sources[scfg.name] = FolderSource(
                    scfg, spool_dir=self.spool_dir(scfg.name), journal=self.outbox, submit=self.submit,
                    metrics=self.metrics,
                )
            elif isinstance(scfg, CameraSourceConfig):
                self.sources[scfg.name] = CameraSource(
                    scfg, submit=self.submit, capture_factory=self._capture_factory, metrics=self.metrics,
                    on_frame=self.line.on_frame if self.line is not None and self._line_camera(scfg.name) else None,
                )

    def _line_camera(self, name: str) -> bool:
        line = self.cfg.line
        return any(r.camera == name for r in line.recipes) or any(t.camera == name for t in line.presence)

    def _start_http(self) -> None:
        h = self.cfg.http
        if not h.enabled:
            return
        from edge_agent.api import create_app
        from edge_agent.api.context import ApiContext
        from edge_agent.api.server import make_server

        assert self.outbox is not None
        ctx = ApiContext(
            settings=h,
            spool_dir=self.spool_dir("http"),
            outbox=self.outbox,
            submit=self.submit,
            models=self.models_info,
            is_ready=lambda: self._ready,
            registry=self.registry,
            pipeline=self.upload_pipeline(),
            feedback=self.inspections.add_feedback if self.inspections is not None else None,
            line_trigger=self.line.trigger if self.line is not None else None,
        )
        self.spool_dir("http").mkdir(parents=True, exist_ok=True)
        app = create_app(ctx)
        self._http = make_server(app, h)  # connection cap, header deadline, proxy headers only from trusted_proxies
        self._http_thread = threading.Thread(target=self._http.run, name="http", daemon=True)
        self._http_thread.start()
        deadline = time.monotonic() + 15.0
        while not self._http.started:  # uvicorn has no start event: poll its flag with a deadline
            if not self._http_thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"http.port: cannot serve on {h.bind}:{h.port} (address in use?)")
            self._stopping.wait(0.02)
        log.info("HTTP API on http://%s:%d/", h.bind, h.port)

    def _start_metrics(self) -> None:
        m = self.cfg.metrics
        if not m.enabled:
            return
        try:
            server, _thread = start_http_server(m.port, addr=m.bind, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics.port: cannot listen on {m.bind}:{m.port}: {exc.strerror}") from exc
        self._metrics_server = server
        log.info("Prometheus metrics on http://%s:%d/metrics", m.bind, m.port)

    def upload_pipeline(self) -> str:
        """The pipeline HTTP uploads go to: ``http.pipeline``, else the first crop pipeline, else the first."""
        if self.cfg.http.pipeline is not None:
            return self.cfg.http.pipeline
        crop = [p.name for p in self.cfg.pipelines if p.kind == "crop"]
        return crop[0] if crop else self.cfg.pipelines[0].name

    # --- running --------------------------------------------------------------------------------------------------

    def submit(self, item: InputItem) -> Future[PipelineOutput]:
        """Route ``item`` to its pipeline (the ``submit`` every source and the API use)."""
        pipeline = self.pipelines.get(item.pipeline)
        if pipeline is None:
            raise OverloadedError(f"no pipeline {item.pipeline!r} is running")
        self.in_flight.add(item.input_id)
        try:
            fut = pipeline.submit(item)
        except BaseException:
            self.in_flight.discard(item.input_id)
            raise
        fut.add_done_callback(lambda _f: self.in_flight.discard(item.input_id))
        return fut

    @property
    def recovered(self) -> int:
        """Inputs re-run by the restart recovery and the housekeeping sweeps."""
        return self.recovery.recovered if self.recovery is not None else 0

    def _on_space(self, state: SpaceState, free: int) -> None:
        """The outbox's disk state changed (from its writer thread or a capacity check): tell and, once space is
        back, re-run what waited."""
        data = {"state": state, "free_bytes": free, "min_free_bytes": self.cfg.outbox.min_free_bytes}
        if state == "ok":
            self._publish_event("storage_ok", "info", data)
            if self.recovery is not None:
                self.recovery.wake()
        else:
            self._publish_event("storage_full", "alarm" if state == "full" else "warning", data)

    def _sweep(self, min_age_s: float | None = None) -> int:
        """One housekeeping sweep now (tests): the number of pending inputs re-run."""
        assert self.recovery is not None
        return self.recovery.sweep(min_age_s)

    def _events_sink(self, out: PipelineOutput, item: InputItem) -> None:
        """Sector events (rejected parts, livestock alerts) go out on the events topic (not durable)."""
        if self.publisher is None:
            return
        sector = out.sector
        ref = {"pipeline": item.pipeline, "source": item.source, "input_id": item.input_id,
               "result_id": getattr(out.stored, "result_id", None)}
        if sector.get("signal") and "line" not in sector:  # a line part's event is its mqtt output's
            data = {**ref, "signal": sector["signal"], "reasons": sector.get("reasons", []),
                    "defects": sector.get("defects", [])}
            if "heatmap" in sector:
                data["heatmap"] = sector["heatmap"]
            self.publisher.publish_event("part_rejected", "warning", data)
        for alert in sector.get("alerts", ()):
            kind = str(alert.get("type", "alert"))
            quiet = kind == "line_crossed" or alert.get("state") == "cleared"
            self.publisher.publish_event(f"livestock_{kind}", "info" if quiet else "warning", {**ref, **alert})
        for report in sector.get("reports", ()):  # headcount per interval (also kept in the result: durable)
            self.publisher.publish_event(f"livestock_{report.get('type', 'report')}", "info", {**ref, **report})

    def models_info(self) -> list[dict[str, Any]]:
        return models_info(self._bundles, self._sources)

    def handle_command(self, command: Command) -> dict[str, Any]:
        """Commands that change the running agent (the publisher handles its own first): ``agent.control``."""
        updater = self.updater if self.cfg.updates.enabled else None
        return handle_command(command, self.pipelines, updater, self.inspections, self.line)

    def health(self) -> dict[str, Any]:
        """Status for heartbeats and ``/healthz``: ``agent.health``."""
        return agent_health(
            ready=self._ready, state=self.state, device=self.cfg.device_id, sources=self.sources,
            publisher=self.publisher.state if self.publisher is not None else "disabled", outbox=self.outbox,
            state_dir=self.state_dir, min_free_bytes=self.cfg.outbox.min_free_bytes, models=self.models_info(),
            updates=self.updater.status() if self.updater is not None else None, pipelines=self.pipelines,
            line=self.line.health() if self.line is not None else None,
        )


M_MMAP_THRESHOLD = -3


def return_freed_memory_promptly() -> bool:
    """glibc: serve allocations of 1 MiB and more with mmap, so that a decoded image's buffers go back to the
    system when freed. Its adaptive threshold otherwise climbs to 32 MiB after the first large free, and Pillow's
    16 MiB blocks then fragment the heap: a few large decodes left hundreds of MB resident for good. A process
    setting: the daemon calls it once; False where the C library has no ``mallopt`` (musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):
        return False


def run_service(cfg: AgentConfig, *, on_ready: Callable[[Service], None] | None = None, **kwargs: Any) -> int:
    """Start, wait for SIGTERM/SIGINT, stop within ``shutdown_timeout_s``. Returns a process exit code."""
    return_freed_memory_promptly()
    service = Service(cfg, **kwargs)
    done = threading.Event()
    previous: Mapping[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            done.set()

        for sig in previous:
            signal.signal(sig, on_signal)
    try:
        service.start()
        if on_ready is not None:
            on_ready(service)
        done.wait()
        return 0 if service.stop() else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
