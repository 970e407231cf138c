"""Pipelined throughput: N worker threads, each with its own single-thread session, against the CPU bound."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import orjson

from edge_agent.bundles.bundle import Bundle
from edge_agent.toolchain.bench.common import Stages, Step
from edge_agent.toolchain.bench.inputs import jpeg_size, reduction_for
from edge_agent.toolchain.bench.settings import BenchConfig, cpu_count, session_of
from edge_agent.toolchain.bench.stats import FULL, Budget, sample_interleaved
from edge_agent.vision import imaging
from edge_agent.vision.model import Model
from edge_agent.vision.runtime import RuntimeOptions


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


