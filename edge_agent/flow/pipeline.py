"""A named pipeline: bounded queue -> worker threads (each with its own model) -> sector logic -> outbox.

Contract 4::

    pipeline.submit(InputItem(...)) -> Future[PipelineOutput]

The future resolves once the result is durable in the outbox (``outbox.add_result`` returned), or
with the :class:`EdgeAgentError` that stopped it. Bad input (an :class:`InputError`: undecodable,
too large, missing spool file) is also journalled with ``outbox.reject_input``; any other failure
(storage, runtime) leaves the input pending in the outbox, so a restart retries it.

Workers infer; the durable write runs on a bounded pool of commit threads (concurrent writes
share the outbox's group commit), so a worker is not idle while a result waits for its fsync.

Inputs are taken in arrival order, except ``urgent`` ones (a line's triggered parts, which have a deadline):
they go before everything queued. A full queue raises :class:`OverloadedError` at submit time. ``stop`` drains
what is queued within its timeout; whatever is left is failed with ``OverloadedError`` (still pending in the outbox).
Each worker signals end-of-stream in ``finally``. After the result is stored the pipeline calls its
sinks; one failing sink is counted and logged and never stops the others.

``replace_models`` gives the workers new models (a model update) between inputs: an input already running
finishes on the old model, every later one runs on the new; the queue is untouched, so nothing is lost.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from edge_agent.config import LivestockOptions, PhotoQualityOptions, PipelineConfig
from edge_agent.delivery.interface import ResultJournal, StoredResult
from edge_agent.errors import EdgeAgentError, InputError, InputNotFoundError, OverloadedError
from edge_agent.metrics import Metrics
from edge_agent.sectors.herd_events import (
    HeadcountDropRule,
    HerdEventRules,
    HerdEvents,
    StationaryRule,
    frame_view,
    split_events,
)
from edge_agent.sectors.inspection import InspectionRules, inspection_verdict, with_defect_type
from edge_agent.sectors.livestock import LineRule, LivestockRules, LivestockTracker, ZoneRule
from edge_agent.types import Image, Result

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputItem:
    """One input for a pipeline: bytes (untrusted, decoded by the model), a decoded frame, or a spool file."""

    input_id: str
    pipeline: str
    source: str
    data: bytes | None = field(default=None, repr=False)
    image: Image | None = field(default=None, repr=False)
    spool_path: str | None = None
    hints: Mapping[str, str] = field(default_factory=dict)
    urgent: bool = False
    """A part a line waits for (a trigger with a deadline): taken from the queue before every other input."""


@dataclass(frozen=True)
class PipelineOutput:
    stored: StoredResult
    """The outbox row."""
    result: Result
    sector: dict[str, Any]


class Predictor(Protocol):
    """What a pipeline needs from a model (``edge_agent.vision.model.Model`` fits)."""

    def predict(self, image: Image) -> Result: ...
    def predict_bytes(self, data: bytes) -> Result: ...


Sector = Callable[[Result, InputItem], dict[str, Any]]
Sink = Callable[[PipelineOutput, InputItem], None]


def no_sector(result: Result, item: InputItem) -> dict[str, Any]:
    return {}


def load_input(item: InputItem) -> bytes:
    """The bytes of an input (its data or its spool file); InputNotFoundError when the spool file is gone."""
    if item.data is not None:
        return item.data
    if item.spool_path is None:
        raise InputNotFoundError("input has neither data, image nor spool file")
    try:
        return Path(item.spool_path).read_bytes()
    except FileNotFoundError as exc:
        raise InputNotFoundError(f"spool file is gone: {Path(item.spool_path).name}") from exc
    except OSError as exc:
        raise InputNotFoundError(f"spool file unreadable: {exc.strerror}") from exc


@dataclass(frozen=True)
class Chain:
    """The second model of a chained inspection: a defect-type classifier run on failed parts only."""

    classifier: Predictor
    min_score: float = 0.0
    top_k: int = 3


def inspect_part(result: Result, item: InputItem, rules: InspectionRules, chain: Chain | None = None) -> dict[str, Any]:
    """Pass/fail for one part; a failed part also gets the chain's defect type (``sectors.inspection``)."""
    verdict = inspection_verdict(result, rules)
    if chain is None or verdict["passed"]:
        return verdict
    typed = chain.classifier.predict(item.image) if item.image is not None else chain.classifier.predict_bytes(
        load_input(item)
    )
    return with_defect_type(verdict, typed, min_score=chain.min_score, top_k=chain.top_k)


def inspection_rules(cfg: PipelineConfig) -> InspectionRules:
    opts = cfg.inspection
    return InspectionRules(**opts.rules()) if opts is not None else InspectionRules()


def sector_image_side(cfg: PipelineConfig) -> int:
    """Shorter side (px) of the decoded photo the sector step looks at (crop photo-quality checks); 0: none.

    When not 0 the pipeline decodes the bytes itself, at least this large (when the photo is), and hands the image
    to the model and, in ``item.image``, to the sector."""
    if cfg.kind == "crop" and (cfg.quality or PhotoQualityOptions()).enabled:
        from edge_agent.vision.quality import WORK_SIDE

        return WORK_SIDE
    return 0


def make_sector(
    cfg: PipelineConfig, models: Mapping[str, Predictor] | None = None, labels: Sequence[str] = ()
) -> Sector:
    """The sector step of a pipeline kind (crop advice, pass/fail, tracking) as one callable. ``models``: the
    models a chained inspection (``inspection.classify``) may name, by config name; ``labels``: the pipeline
    model's label set (the crop verdict lists its crops when a photo shows a plant it does not know)."""
    if cfg.kind == "crop":
        from edge_agent.sectors.crop import CropOptions, crop_verdict, known_crops
        from edge_agent.sectors.retake import with_quality
        from edge_agent.vision.quality import QualityThresholds, check_photo

        qopts = cfg.quality or PhotoQualityOptions()
        thresholds = QualityThresholds(**qopts.thresholds()) if qopts.enabled else None
        crop_options = CropOptions(known_crops=known_crops(labels))

        def crop(result: Result, item: InputItem) -> dict[str, Any]:
            verdict = crop_verdict(result, item.hints, crop_options)
            if thresholds is None or item.image is None:
                return verdict
            return with_quality(verdict, check_photo(item.image, thresholds).to_dict())  # a failed check: retake

        return crop
    if cfg.kind == "inspection":
        rules = inspection_rules(cfg)
        classify = cfg.inspection.classify if cfg.inspection is not None else None
        chain = None
        if classify is not None:
            if models is None or classify.model not in models:
                raise ValueError(f"pipeline {cfg.name}: the chained model {classify.model!r} is not loaded")
            chain = Chain(models[classify.model], classify.min_score, classify.top_k)

        def inspect(result: Result, item: InputItem) -> dict[str, Any]:
            return inspect_part(result, item, rules, chain)

        return inspect
    if cfg.kind == "livestock":
        lopts = cfg.livestock
        lrules = LivestockRules()
        if lopts is not None:
            lrules = LivestockRules(
                labels=lopts.labels,
                min_score=lopts.min_score,
                high_score=lopts.high_score,
                iou_threshold=lopts.iou_threshold,
                max_missed=lopts.max_missed,
                min_hits=lopts.min_hits,
                count_line=LineRule(lopts.count_line.axis, lopts.count_line.position) if lopts.count_line else None,
                zones=tuple(ZoneRule(z.name, z.box, z.max_count, z.alert_on_enter) for z in lopts.zones),
            )
        tracker = LivestockTracker(lrules)
        herd = HerdEvents(herd_event_rules(lopts)) if lopts is not None else HerdEvents()
        lock = threading.Lock()
        last_frame: dict[str, int] = {}

        def track(result: Result, item: InputItem) -> dict[str, Any]:
            frame = item.hints.get("frame")
            captured = capture_time(item)
            with lock:  # one tracker state per source; workers take turns
                if frame is not None and frame.isdigit():
                    if int(frame) < last_frame.get(item.source, -1):
                        return {"skipped": "out_of_order_frame"}  # a newer frame already moved the tracks on
                    last_frame[item.source] = int(frame)
                report = tracker.update(result, item.source, timestamp=captured)
                alerts, reports = split_events(
                    herd.update(captured, item.source, frame_view(report, result.image_size))
                )
            stamp = round(captured, 3)
            report["alerts"] = [{**a, "ts": a.get("ts", stamp)} for a in (*report.get("alerts", ()), *alerts)]
            report["reports"] = reports
            report["captured_at"] = stamp
            return report

        return track
    return no_sector


def capture_time(item: InputItem) -> float:
    """When the frame was taken: the source's ``captured_at`` hint (a folder file's modification time), else now
    (a camera frame is processed as soon as it is read: latest frame wins)."""
    hint = item.hints.get("captured_at")
    if hint is not None:
        try:
            value = float(hint)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    return time.time()


def herd_event_rules(opts: LivestockOptions) -> HerdEventRules:
    s, d = opts.stationary, opts.headcount_drop
    expected: list[tuple[str | None, int | Literal["learn"]]] = []
    if opts.expected is not None:
        expected.append((None, opts.expected))
    expected += [(z.name, z.expected) for z in opts.zones if z.expected is not None]
    return HerdEventRules(
        report_interval_s=opts.report_interval_s,
        stationary=StationaryRule(s.enabled, s.after_s, s.radius, s.clear_radius, s.clear_after_s, s.memory_s),
        headcount_drop=HeadcountDropRule(d.drop, d.clear_drop, d.after_s, d.clear_after_s, d.smooth_s, d.baseline_s,
                                         d.min_baseline),
        expected=tuple(expected),
    )


_STOP = object()
_URGENT, _NORMAL, _LAST = 0, 1, 2  # queue order: line parts, then everything else in arrival order, then stop


@dataclass
class _Job:
    item: InputItem
    future: Future[PipelineOutput]
    queued_at: float


class Pipeline:
    """Worker threads, one model each, sharing one bounded queue. Build, ``start()``, ``submit()``, ``stop()``."""

    def __init__(
        self,
        name: str,
        models: Sequence[Predictor],
        outbox: ResultJournal,
        *,
        kind: str = "plain",
        sector: Sector = no_sector,
        queue_size: int = 16,
        metrics: Metrics | None = None,
        sinks: Sequence[tuple[str, Sink]] = (),
        commit_concurrency: int = 16,
        sector_image_side: int = 0,
    ) -> None:
        if not models:
            raise ValueError("a pipeline needs at least one model (one per worker)")
        self.name = name
        self.kind = kind
        self._models = list(models)
        self._outbox = outbox
        self._sector = sector
        self._sector_image_side = sector_image_side
        self._queue_size = queue_size
        self._metrics = metrics
        self._sinks = list(sinks)
        self._queue: queue.PriorityQueue[tuple[int, int, _Job | object]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._queued = 0
        self._busy = 0
        self._committing = 0
        self._idle = threading.Condition(self._lock)
        self._commit_slots = threading.BoundedSemaphore(commit_concurrency)
        self._commit_pool = ThreadPoolExecutor(commit_concurrency, thread_name_prefix=f"pipeline-{name}-commit")
        self._closed = False
        self._abort = threading.Event()
        self._threads: list[threading.Thread] = []
        self._alive = 0
        self.processed = 0
        self.failed = 0
        if metrics is not None:
            metrics.bind_queue_depth(name, lambda: float(self.depth))

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._threads:
                return
            for i in range(len(self._models)):
                t = threading.Thread(target=self._worker, args=(i,), name=f"pipeline-{self.name}-{i}", daemon=True)
                self._threads.append(t)
                self._alive += 1
            for t in self._threads:
                t.start()

    def set_thresholds(self, **changes: float) -> dict[str, Any]:
        """Apply threshold changes to every worker's model (validated on the first: all or nothing)."""
        setters = [getattr(m, "set_thresholds", None) for m in self._models]
        if any(s is None for s in setters):
            raise ValueError(f"the models of pipeline {self.name} have no adjustable thresholds")
        applied: dict[str, Any] = {}
        for setter in setters:
            assert setter is not None
            applied = setter(**changes)
        return applied

    @property
    def models(self) -> list[Predictor]:
        """The workers' models, in worker order (a copy)."""
        with self._lock:
            return list(self._models)

    def replace_models(self, models: Sequence[Predictor]) -> list[Predictor]:
        """Give each worker a new model (one per worker, same order); returns the models they had.

        Safe while inputs flow: a worker takes its model afresh for each input, so an input already being
        processed finishes on the old model and every later one runs on the new. The queue is not touched:
        nothing accepted is dropped or failed by a swap.
        """
        if len(models) != len(self._models):
            raise ValueError(f"pipeline {self.name} has {len(self._models)} workers, got {len(models)} models")
        with self._lock:
            old, self._models = self._models, list(models)
        return old

    def add_sink(self, name: str, sink: Sink) -> None:
        self._sinks.append((name, sink))

    @property
    def depth(self) -> int:
        """Inputs queued, not yet picked up by a worker."""
        return self._queued

    @property
    def in_flight(self) -> int:
        """Inputs queued or being processed."""
        return self._queued + self._busy + self._committing

    @property
    def capacity(self) -> int:
        return self._queue_size

    @property
    def running(self) -> bool:
        return self._alive > 0 and not self._closed

    def submit(self, item: InputItem) -> Future[PipelineOutput]:
        """Queue ``item``; raises OverloadedError when the queue is full or the pipeline is stopping."""
        with self._lock:
            if self._closed:
                raise OverloadedError(f"pipeline {self.name!r} is stopping")
            if self._queued >= self._queue_size:
                if self._metrics is not None:
                    self._metrics.submit_refused(self.name)
                raise OverloadedError(f"pipeline {self.name!r} queue is full ({self._queue_size})")
            self._queued += 1
            fut: Future[PipelineOutput] = Future()
            order = _URGENT if item.urgent else _NORMAL
            self._queue.put((order, next(self._seq), _Job(item, fut, time.perf_counter())))
        return fut

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop taking inputs, drain within ``timeout``; True when every worker ended in time."""
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put((_LAST, next(self._seq), _STOP))
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:  # results handed to the commit threads reach the disk before we say "stopped"
            self._idle.wait_for(lambda: self._committing == 0, max(0.0, deadline - time.monotonic()))
            committed = self._committing == 0
        self._commit_pool.shutdown(wait=False)
        clean = committed and not any(t.is_alive() for t in self._threads)
        if not clean:
            self._abort.set()  # workers fail what is still queued and exit after their current input
            log.warning(
                "pipeline %s: not drained within %.1f s; the rest stays pending in the outbox", self.name, timeout
            )
        return clean

    # --- work -----------------------------------------------------------------------------------------------------

    def _worker(self, index: int) -> None:
        try:
            while True:
                job = self._queue.get()[2]
                if job is _STOP:
                    break
                assert isinstance(job, _Job)
                with self._lock:
                    self._queued -= 1
                    self._busy += 1
                try:
                    if self._abort.is_set():
                        self._fail_unrun(job)
                    else:
                        self._process(self._models[index], job)  # read per input: replace_models swaps between
                finally:
                    with self._lock:
                        self._busy -= 1
        except Exception:  # pragma: no cover - _process catches everything; this is the last guard
            log.exception("pipeline %s: worker crashed", self.name)
        finally:
            self._end_of_stream()

    def _end_of_stream(self) -> None:
        """Last worker out fails whatever is still queued (inputs stay pending in the outbox)."""
        with self._lock:
            self._alive -= 1
            last = self._alive == 0
            self._closed = self._closed or last
        if not last:
            return
        while True:
            try:
                job = self._queue.get_nowait()[2]
            except queue.Empty:
                return
            if isinstance(job, _Job):
                with self._lock:
                    self._queued -= 1
                self._fail_unrun(job)

    def _fail_unrun(self, job: _Job) -> None:
        if job.future.set_running_or_notify_cancel():
            job.future.set_exception(OverloadedError(f"pipeline {self.name!r} stopped before this input ran"))

    def _infer(self, model: Predictor, item: InputItem) -> tuple[Result, InputItem]:
        """Run ``model`` on ``item``; with ``sector_image_side`` the decoded photo goes on in ``item.image``."""
        if item.image is not None:
            return model.predict(item.image), item
        data = load_input(item)
        decode = getattr(model, "decode", None) if self._sector_image_side > 0 else None
        if decode is None:
            return model.predict_bytes(data), item
        t0 = time.perf_counter()
        image: Image = decode(data, min_side=self._sector_image_side)
        decode_ms = (time.perf_counter() - t0) * 1000.0
        result = model.predict(image)
        if result.timings.decode_ms == 0.0:
            result = replace(result, timings=replace(result.timings, decode_ms=decode_ms))
        return result, replace(item, image=image)

    def _process(self, model: Predictor, job: _Job) -> None:
        """Inference and sector logic on the worker; the durable write goes to a commit thread so the worker
        infers the next input while this one waits for its fsync (the outbox group-commits concurrent writes)."""
        item, fut = job.item, job.future
        if not fut.set_running_or_notify_cancel():
            return
        try:
            result, item = self._infer(model, item)
            t1 = time.perf_counter()
            sector = self._sector(result, item)
            t2 = time.perf_counter()
        except InputError as exc:
            self._rejected(item, fut, exc)
            return
        except EdgeAgentError as exc:
            self._errored(item, fut, exc)
            return
        except Exception as exc:
            log.exception("pipeline %s: unexpected error on input %s", self.name, item.input_id)
            self._errored(item, fut, EdgeAgentError(f"internal error: {type(exc).__name__}"))
            return
        self._commit_slots.acquire()  # bounded: at most commit_concurrency results wait for the disk
        with self._lock:
            self._committing += 1
        try:
            self._commit_pool.submit(self._commit, job, result, sector, t1, t2)
        except RuntimeError:  # pool already shut down (stop timed out): commit here instead
            self._commit(job, result, sector, t1, t2)

    def _commit(self, job: _Job, result: Result, sector: dict[str, Any], t1: float, t2: float) -> None:
        item, fut = job.item, job.future
        try:
            try:
                body = {**result.to_dict(), "kind": self.kind, "source": item.source, "sector": sector}
                stored = self._outbox.add_result(
                    item.input_id, pipeline=self.name, model=result.model, model_version=result.model_version,
                    body=body,
                )
                t3 = time.perf_counter()
            except EdgeAgentError as exc:
                self._errored(item, fut, exc)
                return
            except Exception as exc:
                log.exception("pipeline %s: unexpected error storing input %s", self.name, item.input_id)
                self._errored(item, fut, EdgeAgentError(f"internal error: {type(exc).__name__}"))
                return
            self._stored(job, PipelineOutput(stored=stored, result=result, sector=sector), t1, t2, t3)
        finally:
            self._commit_slots.release()
            with self._lock:
                self._committing -= 1
                self._idle.notify_all()

    def _stored(self, job: _Job, output: PipelineOutput, t1: float, t2: float, t3: float) -> None:
        item, result = job.item, output.result
        with self._lock:
            self.processed += 1
        if self._metrics is not None:
            tm = result.timings
            self._metrics.observe_stages(
                self.name,
                {
                    "decode": tm.decode_ms / 1000.0,
                    "preprocess": tm.preprocess_ms / 1000.0,
                    "inference": tm.inference_ms / 1000.0,
                    "postprocess": tm.postprocess_ms / 1000.0,
                    "sector": t2 - t1,
                    "outbox": t3 - t2,
                    "total": t3 - job.queued_at,
                },
            )
            self._metrics.input_done(self.name, "ok")
        # Sinks run before the future resolves: whoever waits on a result (an upload, a test) knows its events and
        # signals have gone out, so a caller submitting one input after another sees the sinks in that order.
        for name, sink in self._sinks:
            try:
                sink(output, item)
            except Exception:
                log.exception("pipeline %s: sink %s failed on input %s", self.name, name, item.input_id)
                if self._metrics is not None:
                    self._metrics.sink_error(self.name, name)
        job.future.set_result(output)

    def _rejected(self, item: InputItem, fut: Future[PipelineOutput], exc: EdgeAgentError) -> None:
        with self._lock:
            self.failed += 1
        log.info("pipeline %s: input %s rejected: [%s] %s", self.name, item.input_id, exc.code, exc.message)
        try:
            self._outbox.reject_input(item.input_id, exc.code, exc.message)
        except EdgeAgentError as store_exc:
            log.error("pipeline %s: cannot journal rejection of %s: %s", self.name, item.input_id, store_exc)
        if self._metrics is not None:
            self._metrics.input_done(self.name, "rejected")
        fut.set_exception(exc)

    def _errored(self, item: InputItem, fut: Future[PipelineOutput], exc: EdgeAgentError) -> None:
        with self._lock:
            self.failed += 1
        log.warning("pipeline %s: input %s failed: [%s] %s", self.name, item.input_id, exc.code, exc.message)
        if self._metrics is not None:
            self._metrics.input_done(self.name, "error")
        fut.set_exception(exc)
