"""The line controller: trigger -> recipe -> inspection -> one signal per part, by its deadline.

::

    trigger(recipe, part_id, image | camera frame)      (HTTP, MQTT command, part-present detection)
      -> decode, crop to the recipe's region of interest, submit to the recipe's pipeline
      -> the pipeline's sector step (wrapped by :meth:`LineController.sector_for`) decides with the recipe's
         rules and chain, then *settles* the part: on time, the verdict is signalled at once (before the outbox
         write); after the deadline, it is recorded with ``line.late = true`` and signals nothing
      -> at the deadline, a part without a verdict gets the recipe's fail-safe (reject or pass), counted
      -> an input that fails (or a queue that is full) gets the fail-safe at once

Every part is signalled exactly once: settling happens under one lock, first come (verdict, deadline, error)
wins. A verdict is never signalled after its deadline: one that finds its deadline passed (the deadline thread
starved of CPU) settles the part with the fail-safe itself, and so does a trigger whose decoding took the whole
deadline. Signals go to the outputs' lanes (``line.outputs``), so nothing here waits for a PLC or a webhook. The
trigger's future resolves with the :class:`~edge_agent.line.outputs.Decision` when it is settled.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edge_agent.config import LineConfig, PipelineConfig, RecipeConfig
from edge_agent.errors import EdgeAgentError, NoFrameError, OverloadedError, RecipeUnknownError
from edge_agent.flow.pipeline import Chain, InputItem, PipelineOutput, Predictor, Sector, inspect_part, inspection_rules
from edge_agent.line.outputs import Cause, Decision, RejectSignal, SignalLane
from edge_agent.line.presence import PresenceDetector
from edge_agent.metrics import Metrics
from edge_agent.types import Image, U8Image
from edge_agent.vision.decode import PixelBudget, decode_image

log = logging.getLogger(__name__)

Submit = Callable[[InputItem], "Future[PipelineOutput]"]
_PART_ID_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-")


def clean_part_id(part_id: str | None) -> str | None:
    """A part id from outside: 1-64 characters of ``[A-Za-z0-9_.:-]``, else None (the controller numbers it)."""
    if part_id is None or not 0 < len(part_id) <= 64 or not set(part_id) <= _PART_ID_OK:
        return None
    return part_id


def crop(image: Image, roi: tuple[float, float, float, float] | None) -> Image:
    """The region of interest (fractions x1, y1, x2, y2) of ``image``; at least one pixel each way."""
    if roi is None:
        return image
    h, w = image.pixels.shape[:2]
    x1, y1 = min(int(roi[0] * w), w - 1), min(int(roi[1] * h), h - 1)
    x2, y2 = max(round(roi[2] * w), x1 + 1), max(round(roi[3] * h), y1 + 1)
    pixels = np.ascontiguousarray(image.pixels[y1:y2, x1:x2])
    return Image(pixels=pixels, color=image.color, original_size=(pixels.shape[1], pixels.shape[0]))


@dataclass
class _Recipe:
    cfg: RecipeConfig
    rules: Any
    chain: Chain | None
    outputs: tuple[str, ...]


@dataclass
class _Part:
    recipe: _Recipe
    part_id: str
    input_id: str
    trigger: str
    triggered_at: float
    deadline_at: float
    future: Future[Decision] = field(default_factory=Future)
    decision: Decision | None = None


class LineController:
    """Built by the service (``agent.service``) with the pipelines' configs, ``submit``, the outputs and the
    models chains name. ``start()``, triggers, ``stop()``."""

    def __init__(
        self,
        cfg: LineConfig,
        *,
        pipelines: Sequence[PipelineConfig],
        submit: Submit,
        outputs: Mapping[str, RejectSignal],
        models: Mapping[str, Predictor] | None = None,
        metrics: Metrics | None = None,
        pixel_budget: PixelBudget | None = None,
        max_pixels: int = 40_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self._submit = submit
        self._metrics = metrics
        self._budget = pixel_budget
        self._max_pixels = max_pixels
        self._clock = clock
        by_name = {p.name: p for p in pipelines}
        models = models or {}
        self.recipes: dict[str, _Recipe] = {}
        for r in cfg.recipes:
            pcfg = by_name[r.pipeline]
            rules = inspection_rules(pcfg)
            overrides: dict[str, Any] = {}
            if r.anomaly_threshold is not None:
                overrides["anomaly_threshold"] = r.anomaly_threshold
            if r.min_score is not None:
                overrides["min_score"] = r.min_score
            rules = replace(rules, **overrides)
            classify = r.classify or (pcfg.inspection.classify if pcfg.inspection is not None else None)
            chain = Chain(models[classify.model], classify.min_score, classify.top_k) if classify is not None else None
            names = r.outputs if r.outputs is not None else tuple(o.name for o in cfg.outputs)
            self.recipes[r.id] = _Recipe(r, rules, chain, tuple(names))
        self.lanes = {name: SignalLane(out, self._observe, clock) for name, out in outputs.items()}
        self._lock = threading.Lock()
        self._parts: dict[str, _Part] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._timer = threading.Thread(target=self._deadlines, name="line-deadlines", daemon=True)
        self._frames: dict[str, U8Image] = {}
        self._presence: dict[str, list[tuple[PresenceDetector, str]]] = {}
        for t in cfg.presence:
            det = PresenceDetector(t.enter, t.leave, t.settle_frames, t.size, t.background_rate)
            self._presence.setdefault(t.camera, []).append((det, t.recipe))
        self._counter = itertools.count(1)
        self._session = uuid.uuid4().hex[:8]
        self.late = 0

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        for lane in self.lanes.values():
            lane.start()
        self._timer.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the deadline thread and the lanes (a pending part's fail-safe is not signalled after this)."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._timer.is_alive():
            self._timer.join(timeout)
        clean = not self._timer.is_alive()
        for lane in self.lanes.values():
            clean &= lane.stop(timeout)
        return clean

    def health(self) -> dict[str, Any]:
        """For the heartbeat: parts waiting, late verdicts, and each output's counts and newest failure."""
        return {
            "pending": self.pending,
            "late_verdicts": self.late,
            "recipes": sorted(self.recipes),
            "outputs": {name: {"signalled": lane.signalled, "errors": lane.errors, "last_error": lane.last_error}
                        for name, lane in self.lanes.items()},
        }

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(1 for p in self._parts.values() if p.decision is None)

    # --- triggers ---------------------------------------------------------------------------------------------------

    def recipe_for(self, recipe: str | None) -> _Recipe:
        name = recipe or self.cfg.default_recipe
        if name is None or name not in self.recipes:
            raise RecipeUnknownError(f"unknown recipe {name!r} (known: {sorted(self.recipes)})")
        return self.recipes[name]

    def trigger(
        self,
        recipe: str | None,
        part_id: str | None = None,
        *,
        data: bytes | None = None,
        frame: U8Image | None = None,
        source: str = "api",
        at: float | None = None,
    ) -> Future[Decision]:
        """Inspect one part for the line. The image: ``data`` (encoded bytes), else ``frame`` (BGR), else the
        newest frame of the recipe's camera. Raises RecipeUnknownError, NoFrameError or an image error before
        anything is signalled; every later failure is the fail-safe. ``at``: trigger time (``clock``), default now."""
        t0 = self._clock() if at is None else at
        r = self.recipe_for(recipe)
        if self._metrics is not None:
            self._metrics.line_trigger(r.cfg.id, source)
        image = self._image(r, data, frame)
        pid = clean_part_id(part_id) or f"{r.cfg.id}-{self._session}-{next(self._counter)}"
        input_id = f"l-{r.cfg.id}-{uuid.uuid4().hex[:12]}"
        part = _Part(r, pid, input_id, source, t0, t0 + r.cfg.deadline_ms / 1000.0)
        with self._lock:
            crowded = len(self._parts) >= self.cfg.max_pending
            if not crowded:
                self._parts[input_id] = part
                heapq.heappush(self._heap, (part.deadline_at, next(self._seq), input_id))
                self._wake.notify()
        if crowded:
            self._fail_safe(part, "overloaded")
            return part.future
        item = InputItem(input_id=input_id, pipeline=r.cfg.pipeline, source=source, image=crop(image, r.cfg.roi),
                         hints={"recipe": r.cfg.id, "part_id": pid}, urgent=self.cfg.priority)
        if self._clock() >= part.deadline_at:  # decoding took the whole deadline: the fail-safe now, inspect anyway
            self._fail_safe(part, "deadline")
        try:
            fut = self._submit(item)
        except OverloadedError:
            self._drop(input_id)
            self._fail_safe(part, "overloaded")
            return part.future
        fut.add_done_callback(lambda f: self._finished(input_id, f))
        return part.future

    def _image(self, r: _Recipe, data: bytes | None, frame: U8Image | None) -> Image:
        if data:
            return decode_image(data, max_pixels=self._max_pixels, budget=self._budget)
        if frame is None and r.cfg.camera is not None:
            frame = self._frames.get(r.cfg.camera)
        if frame is None:
            where = f"camera {r.cfg.camera!r} has no frame yet" if r.cfg.camera else "the recipe names no camera"
            raise NoFrameError(f"recipe {r.cfg.id}: no image in the trigger and {where}")
        return Image.from_array(frame, "BGR")

    def on_frame(self, camera: str, frame: U8Image) -> None:
        """A camera frame (the camera's reader thread): kept as the newest, and watched for arriving parts."""
        self._frames[camera] = frame
        for detector, recipe in self._presence.get(camera, ()):
            if detector.update(frame) == "arrived":
                try:
                    self.trigger(recipe, frame=frame, source="presence")
                except EdgeAgentError as exc:
                    log.warning("line: presence trigger on %s refused: [%s] %s", camera, exc.code, exc.message)

    # --- settling -----------------------------------------------------------------------------------------------------

    def sector_for(self, base: Sector) -> Sector:
        """Wrap a pipeline's sector step: line inputs are judged with their recipe and settled; others pass
        through to ``base``."""

        def sector(result: Any, item: InputItem) -> dict[str, Any]:
            recipe = self.recipes.get(item.hints.get("recipe", "")) if item.input_id.startswith("l-") else None
            if recipe is None:
                return base(result, item)
            try:
                verdict = inspect_part(result, item, recipe.rules, recipe.chain)
            except Exception:
                self._finished_error(item.input_id)  # the chain failed: the fail-safe, now
                raise
            return self._settle(item, verdict)

        return sector

    def _settle(self, item: InputItem, verdict: dict[str, Any]) -> dict[str, Any]:
        now = self._clock()
        overdue = False
        with self._lock:
            part = self._parts.pop(item.input_id, None)
            late = part is None or part.decision is not None
            if part is not None and part.decision is None:
                if now > part.deadline_at:  # the deadline thread has not run yet (a starved CPU): the verdict is late
                    part.decision = self._decision(part, part.recipe.cfg.fail_safe, "deadline", now)
                    late = overdue = True
                else:
                    part.decision = self._decision(part, "reject" if not verdict["passed"] else "pass", "verdict",
                                                   now, verdict)
        if part is None:  # not pending here (a re-run after a restart): record it, signal nothing
            return {**verdict, "line": {"recipe": item.hints.get("recipe", ""), "part_id": item.hints.get(
                "part_id", ""), "trigger": item.source, "deadline_ms": 0.0, "elapsed_ms": 0.0, "late": True,
                "decision": "reject" if not verdict["passed"] else "pass", "cause": "error"}}
        decision = part.decision
        assert decision is not None
        if late:
            self.late += 1
            if self._metrics is not None:
                self._metrics.line_late_verdict(part.recipe.cfg.id)
        if not late or overdue:
            self._signal(part, decision)
        line = {
            "recipe": part.recipe.cfg.id, "part_id": part.part_id, "trigger": part.trigger,
            "deadline_ms": part.recipe.cfg.deadline_ms, "elapsed_ms": round((now - part.triggered_at) * 1000.0, 3),
            "late": late, "decision": decision.decision, "cause": decision.cause,
        }
        return {**verdict, "line": line}

    def _decision(self, part: _Part, value: str, cause: Cause, now: float,
                  verdict: Mapping[str, Any] | None = None) -> Decision:
        return Decision(recipe=part.recipe.cfg.id, part_id=part.part_id, decision="reject" if value == "reject"
                        else "pass", cause=cause, input_id=part.input_id, trigger=part.trigger,
                        deadline_ms=part.recipe.cfg.deadline_ms, triggered_at=part.triggered_at, decided_at=now,
                        verdict=verdict)

    def _signal(self, part: _Part, decision: Decision) -> None:
        for name in part.recipe.outputs:
            lane = self.lanes.get(name)
            if lane is not None:
                lane.put(decision)
        if self._metrics is not None:
            self._metrics.line_decision(decision.recipe, decision.decision, decision.cause)
        if not part.future.done():
            part.future.set_result(decision)

    def _fail_safe(self, part: _Part, cause: Cause) -> None:
        """Signal the recipe's fail-safe for ``part`` unless it is settled already (caller holds no lock)."""
        with self._lock:
            if part.decision is not None:
                return
            part.decision = self._decision(part, part.recipe.cfg.fail_safe, cause, self._clock())
        log.warning("line: part %s (%s): fail-safe %s (%s)", part.part_id, part.recipe.cfg.id,
                    part.recipe.cfg.fail_safe, cause)
        self._signal(part, part.decision)

    def _drop(self, input_id: str) -> _Part | None:
        with self._lock:
            return self._parts.pop(input_id, None)

    def _finished(self, input_id: str, fut: Future[PipelineOutput]) -> None:
        """The pipeline's future: a failed input is the fail-safe now (a stored one was settled by the sector)."""
        if fut.cancelled() or fut.exception() is not None:
            self._finished_error(input_id)
        else:
            self._drop(input_id)

    def _finished_error(self, input_id: str) -> None:
        part = self._drop(input_id)
        if part is not None:
            self._fail_safe(part, "error")

    def _deadlines(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and (not self._heap or self._heap[0][0] > self._clock()):
                    self._wake.wait(None if not self._heap else max(0.0, self._heap[0][0] - self._clock()))
                if self._stopping:
                    return
                _, _, input_id = heapq.heappop(self._heap)
                part = self._parts.get(input_id)  # stays: its late verdict is still recorded (and marked late)
            if part is not None:
                self._fail_safe(part, "deadline")

    def _observe(self, output: str, decision: Decision, done_at: float, ok: bool) -> None:
        if self._metrics is not None:
            self._metrics.line_signal(output, done_at - decision.triggered_at, ok)
