"""Measure the inference loop against its physical floor, side by side, in one process.

Reusable by ``benchmarks/run.py`` (the full report) and ``edge-agent bench`` (a board in the
field). Nothing here is a pass/fail test: it returns numbers, and ratios measured in the same
run (interleaved rounds, warm-ups, medians), because absolute timings on shared machines drift.

What is measured per bundle (see issue 6):
- ``floor``: ``session.run`` alone on a prepared tensor, same session; for photos also the fastest
  JPEG decode that still yields the pixels the model needs (OpenCV reduced decode);
- ``loop``: the real path (``Model.predict``/``predict_bytes`` + orjson of ``Result.to_dict()`` +
  an optional result sink such as the outbox) with per-stage percentiles;
- ``naive``: the tutorial loop (Pillow full decode, Pillow resize, numpy normalise, run, numpy
  post-processing that decodes every anchor and runs a per-class NMS);
- ``pipelined``: N worker threads, each with its own single-thread session, on a JPEG stream.
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from PIL import Image as PILImage

from edge_agent.bundles.bundle import Bundle
from edge_agent.bundles.manifest import (
    AnomalyDecoder,
    DetectionsDecoder,
    InputSpec,
    Manifest,
    NanodetDecoder,
    SoftmaxDecoder,
    YoloxDecoder,
    decoder_feeds,
)
from edge_agent.types import Image, Result, U8Image
from edge_agent.vision import imaging
from edge_agent.vision import postprocess as pp
from edge_agent.vision.model import Model
from edge_agent.vision.preprocess import center_crop_geometry, letterbox_geometry
from edge_agent.vision.runtime import RuntimeOptions

log = logging.getLogger(__name__)

Stages = Mapping[str, float]
Step = Callable[[], Stages | None]
"""One timed call; may return per-stage milliseconds."""
ResultSink = Callable[[str, Result, dict[str, Any]], None]
"""(input_id, result, encoded document) -> None; e.g. an outbox write."""

PHOTO_SIZES: dict[str, tuple[int, int]] = {"1080p": (1920, 1080), "12mp": (4000, 3000)}


# ------------------------------------------------------------------ statistics and sampling
@dataclass(frozen=True)
class Stats:
    """Percentiles of a series of milliseconds."""

    n: int
    p50: float
    p95: float
    p99: float
    mean: float
    min: float

    @staticmethod
    def of(samples: Sequence[float]) -> Stats:
        if not samples:
            return Stats(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        a = np.asarray(samples, dtype=np.float64)
        p50, p95, p99 = np.percentile(a, [50, 95, 99])
        return Stats(int(a.size), float(p50), float(p95), float(p99), float(a.mean()), float(a.min()))

    def to_dict(self) -> dict[str, float | int]:
        return {k: (v if isinstance(v, int) else round(v, 4)) for k, v in self.__dict__.items()}


@dataclass
class Series:
    """Samples of one measured step: wall time, process CPU time and optional stages (ms)."""

    total: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)

    def add(self, total_ms: float, stages: Stages | None, cpu_ms: float = math.nan) -> None:
        self.total.append(total_ms)
        self.cpu.append(cpu_ms)
        for k, v in (stages or {}).items():
            self.stages.setdefault(k, []).append(v)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": Stats.of(self.total).to_dict(),
            "cpu": Stats.of([c for c in self.cpu if not math.isnan(c)]).to_dict(),
            "stages": {k: Stats.of(v).to_dict() for k, v in self.stages.items()},
        }

    @property
    def p50(self) -> float:
        return Stats.of(self.total).p50


@dataclass(frozen=True)
class Budget:
    """How long to sample a group of steps: at least ``min_reps`` rounds, then until ``seconds`` are spent."""

    seconds: float = 2.0
    min_reps: int = 10
    max_reps: int = 5000
    warmup: int = 3


QUICK = Budget(seconds=0.3, min_reps=4, max_reps=500, warmup=2)
FULL = Budget(seconds=10.0, min_reps=15, max_reps=20000, warmup=5)


def sample_interleaved(steps: Mapping[str, Step], budget: Budget) -> dict[str, Series]:
    """Time the steps call by call in alternating rounds (A B C, C B A, ...) so that load changes on
    a shared machine hit every step alike; each call records wall time and process CPU time."""
    series = {name: Series() for name in steps}
    for fn in steps.values():
        for _ in range(budget.warmup):
            fn()
    names = list(steps)
    clock = time.perf_counter
    cpu = time.process_time
    start = clock()
    rounds = 0
    while rounds < budget.min_reps or (clock() - start < budget.seconds and rounds < budget.max_reps):
        for name in names if rounds % 2 == 0 else reversed(names):
            fn = steps[name]
            c0 = cpu()
            t0 = clock()
            stages = fn()
            t1 = clock()
            series[name].add((t1 - t0) * 1000.0, stages, (cpu() - c0) * 1000.0)
        rounds += 1
    return series


# ------------------------------------------------------------------ test inputs
def synthetic_sources(count: int = 6, size: int = 384, seed: int = 0) -> list[U8Image]:
    """Textured RGB pictures (octaves of smooth noise plus grain) for boards without a dataset."""
    rng = np.random.default_rng(seed)
    out: list[U8Image] = []
    for _ in range(count):
        acc = np.zeros((size, size, 3), np.float32)
        for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.15)):
            low = rng.random((cells, cells, 3), dtype=np.float32)
            acc += weight * imaging.resize((low * 255).astype(np.uint8), (size, size), "linear").astype(np.float32)
        acc += rng.normal(0, 6, acc.shape).astype(np.float32)
        out.append(np.clip(acc, 0, 255).astype(np.uint8))
    return out


def compose(sources: Sequence[U8Image], size: tuple[int, int], tiles_per_row: int, grain: float, seed: int) -> U8Image:
    """Tile RGB ``sources`` (upscaled as needed) into a (size) RGB picture with sensor-like grain."""
    w, h = size
    tile = math.ceil(w / tiles_per_row)
    rows = math.ceil(h / tile)
    canvas = np.empty((rows * tile, tiles_per_row * tile, 3), np.uint8)
    for r in range(rows):
        for c in range(tiles_per_row):
            src = sources[(r * tiles_per_row + c + seed) % len(sources)]
            canvas[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = imaging.resize(src, (tile, tile), "linear")
    out = canvas[:h, :w]
    if grain > 0:
        noise = np.random.default_rng(seed).normal(0, grain, out.shape).astype(np.float32)
        out = np.clip(out.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


def encode_jpeg(rgb: U8Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rgb, "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class BenchInputs:
    """Camera frame (1080p BGR array), photos (JPEG bytes by kind), and a 1080p JPEG stream."""

    frame: U8Image
    photos: dict[str, bytes]
    stream: tuple[bytes, ...]

    def describe(self) -> dict[str, Any]:
        return {
            "frame": list(self.frame.shape),
            "photos": {k: {"size": list(jpeg_size(v)), "bytes": len(v)} for k, v in self.photos.items()},
            "stream": {"frames": len(self.stream), "bytes_mean": int(np.mean([len(b) for b in self.stream]))},
        }


def make_inputs(
    sources: Sequence[U8Image], stream_len: int = 4, sizes: Mapping[str, tuple[int, int]] = PHOTO_SIZES
) -> BenchInputs:
    """Build 1080p and 12 MP test JPEGs from small RGB ``sources`` by tiling and upscaling.

    ``sizes`` maps the kinds "1080p" (also the camera frame and the stream) and "12mp" to pixel sizes.
    """
    photos: dict[str, bytes] = {}
    frame_rgb = compose(sources, sizes["1080p"], 3, 2.0, 0)
    photos["1080p"] = encode_jpeg(frame_rgb)
    photos["12mp"] = encode_jpeg(compose(sources, sizes["12mp"], 12, 3.0, 1))
    stream = tuple(encode_jpeg(compose(sources, sizes["1080p"], 3, 2.0, i)) for i in range(stream_len))
    return BenchInputs(frame=np.ascontiguousarray(frame_rgb[:, :, ::-1]), photos=photos, stream=stream)


def jpeg_size(data: bytes) -> tuple[int, int]:
    with PILImage.open(io.BytesIO(data)) as im:
        return (int(im.size[0]), int(im.size[1]))


def reduction_for(size: tuple[int, int], need: tuple[int, int]) -> int:
    """Largest JPEG DCT reduction (8, 4, 2, 1) that still yields ``need`` pixels (as decode.py picks)."""
    w, h = size
    for factor in (8, 4, 2):
        if -(-w // factor) >= need[0] and -(-h // factor) >= need[1]:
            return factor
    return 1


# ------------------------------------------------------------------ the naive tutorial loop
class NaiveLoop:
    """The everyday baseline, written the way onnxruntime and common tutorials do it."""

    def __init__(self, manifest: Manifest, session: Any) -> None:
        self.m = manifest
        self.session = session

    def photo(self, data: bytes) -> Stages:
        t0 = time.perf_counter()
        im = PILImage.open(io.BytesIO(data)).convert("RGB")
        return self._image(im, t0)

    def frame(self, bgr: U8Image) -> Stages:
        t0 = time.perf_counter()
        im = PILImage.fromarray(bgr[:, :, ::-1].copy())  # tutorials convert BGR->RGB via PIL too
        return self._image(im, t0)

    def _image(self, im: PILImage.Image, t0: float) -> Stages:
        spec = self.m.input
        t1 = time.perf_counter()
        x = self._preprocess(im, spec)
        t2 = time.perf_counter()
        outs = self.session.run(None, {spec.name: x, **decoder_feeds(self.m)})
        t3 = time.perf_counter()
        self._postprocess(dict(zip([o.name for o in self.session.get_outputs()], outs, strict=True)))
        t4 = time.perf_counter()
        ms = 1000.0
        return {"decode": (t1 - t0) * ms, "preprocess": (t2 - t1) * ms, "inference": (t3 - t2) * ms,
                "postprocess": (t4 - t3) * ms}

    @staticmethod
    def _preprocess(im: PILImage.Image, spec: InputSpec) -> npt.NDArray[Any]:
        w, h = im.size
        big = (spec.width, spec.height)
        mode = spec.resize.mode
        if mode == "stretch":
            im = im.resize(big, PILImage.Resampling.BILINEAR)
        elif mode == "letterbox":
            r = min(big[0] / w, big[1] / h)
            nw, nh = max(1, round(w * r)), max(1, round(h * r))
            pad = spec.resize.pad_value
            canvas = PILImage.new("RGB", big, (pad, pad, pad))
            at = ((big[0] - nw) // 2, (big[1] - nh) // 2) if spec.resize.placement == "center" else (0, 0)
            canvas.paste(im.resize((nw, nh), PILImage.Resampling.BILINEAR), at)
            im = canvas
        else:
            r = max(big[0] / w, big[1] / h) / spec.resize.crop_fraction
            rw, rh = max(big[0], round(w * r)), max(big[1], round(h * r))
            im = im.resize((rw, rh), PILImage.Resampling.BILINEAR)
            left, top = (rw - big[0]) // 2, (rh - big[1]) // 2
            im = im.crop((left, top, left + big[0], top + big[1]))
        x = np.array(im).astype(np.float32)
        if spec.color == "BGR":
            x = x[:, :, ::-1]
        norm = spec.normalize
        x = (x * np.float32(norm.scale) - np.array(norm.mean, np.float32)) / np.array(norm.std, np.float32)
        if spec.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        x = np.expand_dims(x, 0)
        return np.ascontiguousarray(x.astype(np.float32 if spec.dtype == "float32" else np.uint8))

    def _postprocess(self, outs: dict[str, npt.NDArray[Any]]) -> list[Any]:
        m = self.m
        dec = m.decoder
        if isinstance(dec, SoftmaxDecoder):
            logits = outs[dec.output].reshape(-1)
            e = np.exp(logits - np.max(logits))
            probs = e / np.sum(e)
            top = np.argsort(probs)[::-1][: dec.top_k]
            return [(m.labels[i], float(probs[i])) for i in top]
        if isinstance(dec, AnomalyDecoder):
            return [float(outs[dec.score_output].reshape(-1)[0])]
        if isinstance(dec, DetectionsDecoder):  # the graph already filtered, decoded and NMS-ed
            return [(int(c), float(s), b.tolist()) for b, s, c in zip(
                outs[dec.boxes_output], outs[dec.scores_output], outs[dec.class_ids_output], strict=True)]
        size = (m.input.width, m.input.height)
        if isinstance(dec, YoloxDecoder):  # decode every anchor, then filter (YOLOX demo style)
            boxes = pp.decode_yolox(outs[dec.output], size, dec.strides, 0.0)
        elif isinstance(dec, NanodetDecoder):
            boxes = pp.decode_nanodet([outs[n] for n in dec.cls_outputs], [outs[n] for n in dec.reg_outputs],
                                      size, dec.strides, dec.reg_max, 0.0)
        else:
            boxes = pp.decode_yolov8(outs[dec.output], 0.0)
        keep = boxes.scores >= m.thresholds.score
        boxes = boxes.take(np.nonzero(keep)[0])
        found: list[tuple[int, float, list[float]]] = []
        for c in np.unique(boxes.class_ids):  # per-class NMS loop
            idx = np.nonzero(boxes.class_ids == c)[0]
            kept = pp.nms(boxes.xyxy[idx], boxes.scores[idx], m.thresholds.iou)
            found.extend((int(c), float(boxes.scores[idx[k]]), boxes.xyxy[idx[k]].tolist()) for k in kept)
        return found


def resize_size(spec: InputSpec, size: tuple[int, int]) -> tuple[int, int]:
    """(w, h) the pre-processing resizes a ``size`` picture to (before padding or cropping)."""
    mode = spec.resize.mode
    if mode == "stretch":
        return (spec.width, spec.height)
    if mode == "letterbox":
        return letterbox_geometry(size, (spec.width, spec.height), spec.resize.placement)[0]
    return center_crop_geometry(size, (spec.width, spec.height), spec.resize.crop_fraction)[0]


# ------------------------------------------------------------------ per-model measurements
def session_of(model: Model) -> Any:
    """The onnxruntime session behind ``model`` (floor timings call ``session.run`` directly)."""
    session = getattr(model.runtime, "session", None)
    if session is None:
        raise TypeError(f"{model.name}: runtime {type(model.runtime).__name__} has no onnxruntime session")
    return session


@dataclass(frozen=True)
class BenchConfig:
    budget: Budget = QUICK
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    """Session settings of the latency measurements (floor, loop and naive share one session)."""
    photo_kinds: tuple[str, ...] = ("1080p", "12mp")
    naive: bool = True
    naive_kinds: tuple[str, ...] = ("frame", "1080p", "12mp")
    """Where to time the naive loop too (the 12 MP photo is the one with a target)."""
    pipelined_workers: int = 0
    """Worker threads of the pipelined run (0 = one per core; -1 = skip)."""
    pipelined_seconds: float = 2.0
    wait_for_write: bool = True
    """With a sink, also time ``loop_write_waited``: the loop blocking on each durable write before the next input
    (the headline ``loop`` overlaps the write with the next input on a commit thread, as the pipeline does)."""


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class OverlappedSink:
    """A sink whose write overlaps the next input's work, as the pipeline does it: the worker hands the result
    to a commit thread (``Pipeline._commit``) and takes the next input while the write waits for its fsync.

    Each call first waits until the previous write is durable (at most one write in flight, order kept), so a
    write slower than the loop still shows up in the loop's time; the pipeline allows more in flight."""

    def __init__(self, sink: ResultSink) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        self._sink = sink
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bench-overlap")
        self._last: Future[None] | None = None

    def __call__(self, input_id: str, result: Result, doc: dict[str, Any]) -> None:
        if self._last is not None:
            self._last.result()
        self._last = self._pool.submit(self._sink, input_id, result, doc)

    def close(self) -> None:
        if self._last is not None:
            self._last.result()
        self._pool.shutdown(wait=True)


def _encode_step(model: Model, sink: ResultSink | None, tag: str = "") -> Callable[[Result, float], Stages]:
    counter = [0]

    def finish(result: Result, decode_ms: float) -> Stages:
        t0 = time.perf_counter()
        doc = result.to_dict()
        orjson.dumps(doc)
        t1 = time.perf_counter()
        stages = {"decode": decode_ms, "preprocess": result.timings.preprocess_ms,
                  "inference": result.timings.inference_ms, "postprocess": result.timings.postprocess_ms,
                  "encode": (t1 - t0) * 1000.0}
        if sink is not None:
            counter[0] += 1
            sink(f"bench-{model.name}{tag}-{counter[0]}", result, doc)
            stages["outbox"] = (time.perf_counter() - t1) * 1000.0
        return stages

    return finish


def bench_model(
    bundle: Bundle, inputs: BenchInputs, cfg: BenchConfig, sink: ResultSink | None = None
) -> dict[str, Any]:
    """All latency measurements of one bundle; returns a JSON-ready dict."""
    model = Model.load(bundle, cfg.options)
    model.warmup(2)
    session = session_of(model)
    overlapped = OverlappedSink(sink) if sink is not None else None
    finish = _encode_step(model, overlapped)
    finish_waited = _encode_step(model, sink, "-waited") if sink is not None and cfg.wait_for_write else None
    naive = NaiveLoop(model.manifest, session)
    frame = inputs.frame
    frame_image = Image.from_array(frame, "BGR")
    tensor = model.preprocessor.run(frame_image)[0].copy()
    feeds = model.feeds(tensor)

    def floor_run() -> None:
        session.run(None, feeds)

    out: dict[str, Any] = {
        "name": model.name,
        "version": model.version,
        "task": model.manifest.task,
        "input": f"{model.manifest.input.width}x{model.manifest.input.height} {model.manifest.input.dtype}",
        "provider": model.runtime.provider,
        "quantized": is_quantized(bundle),
    }
    rw, rh = resize_size(model.manifest.input, (frame.shape[1], frame.shape[0]))
    resized = np.empty((rh, rw, 3), np.uint8)
    interp = model.manifest.input.resize.interpolation

    def run_then_resize() -> Stages:
        """The one unavoidable pre-processing step, bare, where the loop runs it: right after a session.run."""
        t0 = time.perf_counter()
        session.run(None, feeds)
        t1 = time.perf_counter()
        imaging.resize_into(frame, resized, interp)
        t2 = time.perf_counter()
        return {"inference": (t1 - t0) * 1000.0, "resize": (t2 - t1) * 1000.0}

    steps: dict[str, Step] = {"floor_run": floor_run,
                              "loop": lambda: finish(model.predict(Image.from_array(frame, "BGR")), 0.0),
                              "run_then_resize": run_then_resize}
    if cfg.naive and "frame" in cfg.naive_kinds:
        steps["naive"] = lambda: naive.frame(frame)
    out["frame"] = {k: v.to_dict() for k, v in sample_interleaved(steps, cfg.budget).items()}
    if finish_waited is not None:
        out["frame"].update(_waited(
            {"floor_run": floor_run,
             "loop_write_waited": lambda: finish_waited(model.predict(Image.from_array(frame, "BGR")), 0.0)},
            cfg.budget))
    for kind in cfg.photo_kinds:
        data = inputs.photos[kind]
        factor = reduction_for(jpeg_size(data), model.preprocessor.required_size(*jpeg_size(data)))

        def floor_decode(data: bytes = data, factor: int = factor) -> None:
            imaging.decode_jpeg_reduced(data, factor)

        def photo_step(fin: Callable[[Result, float], Stages], data: bytes = data) -> Step:
            def step() -> Stages:
                t0 = time.perf_counter()
                image = model.decode(data)
                decode_ms = (time.perf_counter() - t0) * 1000.0
                return fin(model.predict(image), decode_ms)

            return step

        steps = {"floor_decode": floor_decode, "floor_run": floor_run, "loop": photo_step(finish)}
        if cfg.naive and kind in cfg.naive_kinds:
            steps["naive"] = lambda data=data: naive.photo(data)  # type: ignore[misc]
        res: dict[str, Any] = {k: v.to_dict() for k, v in sample_interleaved(steps, cfg.budget).items()}
        if finish_waited is not None:
            res.update(_waited({"floor_decode": floor_decode, "floor_run": floor_run,
                                "loop_write_waited": photo_step(finish_waited)}, cfg.budget))
        res["reduction"] = factor
        out[kind] = res
    if overlapped is not None:
        overlapped.close()
    workers = cfg.pipelined_workers if cfg.pipelined_workers else cpu_count()
    if workers > 0:
        out["pipelined"] = bench_pipelined(bundle, inputs.stream, workers, cfg)
    return out


def _waited(steps: Mapping[str, Step], budget: Budget) -> dict[str, Any]:
    """The loop that blocks on each durable write, timed in its own group with its own floors (``*_for_waited``):
    interleaved with the headline loop, its fsyncs and writer-thread wake-ups would disturb that loop's figures."""
    third = Budget(seconds=budget.seconds / 3, min_reps=budget.min_reps, max_reps=budget.max_reps,
                   warmup=budget.warmup)
    res = sample_interleaved(steps, third)
    return {(k if k.startswith("loop") else f"{k}_for_waited"): v.to_dict() for k, v in res.items()}


def bench_pipelined(bundle: Bundle, stream: Sequence[bytes], workers: int, cfg: BenchConfig) -> dict[str, Any]:
    """Frames/s of ``workers`` threads, each running the whole loop with its own 1-thread session.

    Compared with the CPU bound ``cores / (floor decode + floor run at one thread)``, both floors measured
    here with the same single-thread session. Floors and the pipelined window alternate in ``rounds`` (six
    in the full run) and each round's ratio is taken against its own floors, so that a change of speed of
    the machine between the two measurements does not become the ratio; the median round is reported.
    """
    opts = RuntimeOptions(
        providers=cfg.options.providers, intra_op_threads=1, allow_spinning=False,
        graph_optimization=cfg.options.graph_optimization,
    )
    models = [Model.load(bundle, opts) for _ in range(workers)]
    for m in models:
        m.warmup(1)
    first = models[0]
    session = session_of(first)
    data = stream[0]
    factor = reduction_for(jpeg_size(data), first.preprocessor.required_size(*jpeg_size(data)))
    tensor = first.preprocessor.run(first.decode(data))[0].copy()
    feeds = first.feeds(tensor)

    def cpu_timed(fn: Callable[[], object]) -> Step:
        def step() -> Stages:
            c0 = time.thread_time()
            fn()
            return {"cpu": (time.thread_time() - c0) * 1000.0}

        return step

    rounds = 6 if cfg.budget.seconds >= FULL.seconds else 1
    floor_budget = Budget(seconds=cfg.budget.seconds / rounds, min_reps=cfg.budget.min_reps,
                          max_reps=cfg.budget.max_reps, warmup=cfg.budget.warmup)
    cores = cpu_count()
    per_round: list[dict[str, Any]] = []
    for _ in range(rounds):
        floors = sample_interleaved(
            {"decode": cpu_timed(lambda: imaging.decode_jpeg_reduced(data, factor)),
             "run": cpu_timed(lambda: session.run(None, feeds))},
            floor_budget,
        )
        window = _pipelined_window(models, stream, cfg.pipelined_seconds / rounds)
        floor_ms = floors["decode"].p50 + floors["run"].p50
        floor_cpu_ms = float(np.median(floors["decode"].stages["cpu"]) + np.median(floors["run"].stages["cpu"]))
        bound_fps = cores * 1000.0 / floor_ms
        cpu_fps = window["frames"] / window["cpu_s"] if window["cpu_s"] > 0 else math.nan
        per_round.append({
            **window,
            "floor_decode_1t": floors["decode"].to_dict()["total"],
            "floor_run_1t": floors["run"].to_dict()["total"],
            "floor_cpu_ms": round(floor_cpu_ms, 3),
            "bound_fps": round(bound_fps, 3),
            "ratio": round(window["fps"] / bound_fps, 4),
            "cpu_share": round(window["cpu_s"] / (window["seconds"] * cores), 4),
            "cpu_ratio": round(cpu_fps * floor_cpu_ms / 1000.0, 4),
        })
    mid = sorted(per_round, key=lambda r: r["ratio"])[len(per_round) // 2]
    return {
        "workers": workers,
        "cores": cores,
        "session": "intra_op_threads=1, allow_spinning=False, one per worker",
        "rounds": rounds,
        **{k: mid[k] for k in ("fps", "frames", "floor_decode_1t", "floor_run_1t", "bound_fps", "ratio",
                               "cpu_share", "cpu_ratio", "floor_cpu_ms", "loadavg_1m")},
        "round_ratios": [r["ratio"] for r in per_round],
        "round_fps": [r["fps"] for r in per_round],
    }


def _pipelined_window(models: Sequence[Model], stream: Sequence[bytes], seconds: float) -> dict[str, Any]:
    """Run one worker thread per model on ``stream`` for ``seconds`` (after a short warm-up); frames/s and CPU."""
    workers = len(models)
    counts = [0] * workers
    stop = threading.Event()
    errors: list[BaseException] = []

    def work(i: int) -> None:
        m = models[i]
        k = i
        try:
            while not stop.is_set():
                r = m.predict_bytes(stream[k % len(stream)])
                orjson.dumps(r.to_dict())
                counts[i] += 1
                k += 1
        except BaseException as exc:  # reported, never swallowed silently
            errors.append(exc)
            stop.set()

    imaging.set_threads(1)  # each worker is one core's worth of work; no OpenCV pool on top
    threads = [threading.Thread(target=work, args=(i,), name=f"bench-worker-{i}", daemon=True) for i in range(workers)]
    try:
        for t in threads:
            t.start()
        stop.wait(min(1.0, seconds / 4))  # warm-up inside the window
        c0, t0, p0 = sum(counts), time.perf_counter(), time.process_time()
        load0 = _loadavg()
        stop.wait(seconds)
        c1, t1, p1 = sum(counts), time.perf_counter(), time.process_time()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        imaging.set_threads(-1)
    if errors:
        raise errors[0]
    return {"fps": round((c1 - c0) / (t1 - t0), 3), "frames": c1 - c0, "seconds": t1 - t0, "cpu_s": p1 - p0,
            "loadavg_1m": load0}


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def is_quantized(bundle: Bundle) -> bool:
    meta = bundle.manifest.metadata
    text = " ".join([bundle.manifest.name, bundle.directory.name, str(meta.get("quantization", ""))]).lower()
    return "int8" in text or "qdq" in text or bool(meta.get("quantized"))


def int8_pairs(bundles: Sequence[Bundle]) -> list[tuple[Bundle, Bundle]]:
    """(fp32, int8) bundle pairs: the INT8 one says ``metadata.quantization.from`` (edge_agent.toolchain.quantize), or
    ``fp32_bundle``/``quantized_from``, or is named like the FP32 one plus ``_int8``."""
    by_name = {b.name: b for b in bundles} | {b.directory.name: b for b in bundles}
    pairs: list[tuple[Bundle, Bundle]] = []
    for b in bundles:
        if not is_quantized(b):
            continue
        meta = b.manifest.metadata
        quant = meta.get("quantization")
        ref = meta.get("fp32_bundle") or meta.get("quantized_from")
        if ref is None and isinstance(quant, dict):
            ref = quant.get("from")
        candidates = [str(ref)] if ref else []
        for n in (b.name, b.directory.name):
            for suffix in ("_int8", "-int8", "_qdq", "_u8s8"):
                if n.endswith(suffix):
                    candidates.append(n[: -len(suffix)])
        for c in candidates:
            fp = by_name.get(c)
            if fp is not None and fp is not b and not is_quantized(fp):
                pairs.append((fp, b))
                break
    return pairs


def bench_int8(fp32: Bundle, int8: Bundle, inputs: BenchInputs, cfg: BenchConfig) -> dict[str, Any]:
    """``session.run`` and the frame loop, INT8 vs FP32, same threads, interleaved."""
    out: dict[str, Any] = {"fp32": fp32.name, "int8": int8.name}
    for label, opts in (("latency", cfg.options), ("1thread", RuntimeOptions(
            providers=cfg.options.providers, intra_op_threads=1, allow_spinning=False))):
        steps: dict[str, Step] = {}
        for tag, b in (("fp32", fp32), ("int8", int8)):
            m = Model.load(b, opts)
            m.warmup(1)
            sess = session_of(m)
            feeds = m.feeds(m.preprocessor.run(Image.from_array(inputs.frame, "BGR"))[0].copy())
            steps[f"{tag}_run"] = lambda s=sess, f=feeds: (s.run(None, f), None)[1]  # type: ignore[misc]
            steps[f"{tag}_loop"] = lambda m=m: (m.predict(Image.from_array(inputs.frame, "BGR")), None)[1]  # type: ignore[misc]
        res = sample_interleaved(steps, cfg.budget)
        out[label] = {
            "threads": opts.intra_op_threads,
            **{k: v.to_dict()["total"] for k, v in res.items()},
            "run_ratio": round(res["int8_run"].p50 / res["fp32_run"].p50, 4),
            "loop_ratio": round(res["int8_loop"].p50 / res["fp32_loop"].p50, 4),
        }
    return out


# ------------------------------------------------------------------ machine, memory, cold start
def machine_info() -> dict[str, Any]:
    """Machine, CPU, thread and library facts recorded with every report."""
    import platform
    import sys
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    have = set(value.split())
                    flags = sorted(have & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "neon", "asimd",
                                           "asimddp", "i8mm", "sve"})
    except OSError:
        pass
    versions: dict[str, str] = {}
    for dist in ("edge-agent", "onnxruntime", "numpy", "opencv-python-headless", "pillow", "orjson", "paho-mqtt"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    from edge_agent.vision.runtime import available_providers

    return {
        "hostname": platform.node(),
        "system": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": cpu_count(),
        "python": sys.version.split()[0],
        "versions": versions,
        "providers": available_providers(),
    }


_PROBE = (
    "import sys, time; t = time.time(); from edge_agent.toolchain.bench import probe_child; "
    "probe_child(sys.argv[1:], t)"
)


def _vm_kb(field_name: str) -> int:
    """A ``/proc/self/status`` memory field in kB (VmHWM = peak RSS of this process image), 0 if unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # kB on Linux; may include the parent's


def probe_child(argv: Sequence[str], interpreter_ready: float) -> None:
    """Child side of :func:`probe_process`: load bundles, predict once each, print one JSON line."""
    import sys
    from pathlib import Path

    from edge_agent.bundles.bundle import load_bundle

    spawned_at = float(argv[0])
    photo = Path(argv[1]).read_bytes()
    rss_import = _vm_kb("VmHWM")
    t1 = time.perf_counter()
    imported_at = time.time()
    models = [Model.load(load_bundle(Path(d))) for d in argv[2:]]
    t2 = time.perf_counter()
    first = models[0].predict_bytes(photo) if models else None
    t3 = time.perf_counter()
    first_at = time.time()
    for m in models[1:]:
        m.predict_bytes(photo)
    doc = {
        "cold_start_s": round(first_at - spawned_at, 4),
        "models": [m.name for m in models],
        "first_result": first.to_dict()["model"] if first else None,
        "interpreter_s": round(interpreter_ready - spawned_at, 4),
        "import_s": round(imported_at - interpreter_ready, 4),
        "load_s": round(t2 - t1, 4),
        "first_predict_s": round(t3 - t2, 4),
        "rss_after_import_mb": round(rss_import / 1024, 1),
        "peak_rss_mb": round(_vm_kb("VmHWM") / 1024, 1),
        "rss_mb": round(_vm_kb("VmRSS") / 1024, 1),
    }
    sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    sys.stdout.flush()


def probe_process(bundle_dirs: Sequence[str], photo_path: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Peak RSS and cold start (process spawn to first result) of a fresh interpreter with these bundles."""
    import subprocess
    import sys

    t0 = time.perf_counter()
    proc = subprocess.run(  # noqa: S603 - our own interpreter and module, no shell
        [sys.executable, "-c", _PROBE, repr(time.time()), photo_path, *bundle_dirs],
        capture_output=True, timeout=timeout_s, check=False, text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"probe failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    doc: dict[str, Any] = orjson.loads(proc.stdout.strip().splitlines()[-1])
    doc["process_wall_s"] = round(wall, 4)
    return doc
