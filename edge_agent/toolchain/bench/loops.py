"""Per-model measurements: the real loop (photo, frame) against its floor, stage by stage, with an optional sink."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import orjson

from edge_agent.bundles.bundle import Bundle
from edge_agent.toolchain.bench.common import ResultSink, Stages, Step
from edge_agent.toolchain.bench.inputs import BenchInputs, jpeg_size, reduction_for
from edge_agent.toolchain.bench.int8 import is_quantized
from edge_agent.toolchain.bench.naive import NaiveLoop, resize_size
from edge_agent.toolchain.bench.pipelined import bench_pipelined
from edge_agent.toolchain.bench.settings import BenchConfig, cpu_count, session_of
from edge_agent.toolchain.bench.stats import Budget, sample_interleaved
from edge_agent.types import Image, Result
from edge_agent.vision import imaging
from edge_agent.vision.model import Model


# ------------------------------------------------------------------ per-model measurements
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


