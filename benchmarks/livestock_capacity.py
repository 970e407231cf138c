"""Livestock capacity: how many cameras at 5 fps one board sustains with ``models/cattle_overhead``.

    nice -n 10 .venv/bin/python -m benchmarks.livestock_capacity [--streams 1,2,4,...] [--seconds 20]
        [--size native|720p|1080p] [--workers 2] [--json out.json]

Everything after the camera is the agent's own code, wired as ``agent/service.py`` wires it: N
:class:`~edge_agent.flow.sources.camera.CameraSource` (reader thread each, latest-frame-wins drop
policy: a frame is submitted only while the camera has fewer than ``max_in_flight`` frames unfinished,
else dropped as ``superseded``; a full pipeline queue drops it as ``overloaded``) -> one
:class:`~edge_agent.flow.pipeline.Pipeline` of kind ``livestock`` (``workers`` model sessions of one
thread each, the sector of ``deploy/examples/livestock.yaml``: the Kalman tracker, line, zones) -> the
durable :class:`~edge_agent.delivery.outbox.Outbox` (SQLite, WAL, ``synchronous=FULL``, group commit).

The camera is simulated: :class:`JpegCamera` holds the chute frames of ``../shared`` as JPEG bytes (at
their own 300x500, or resized to 1280x720 / 1920x1080 and re-encoded at run time; nothing is copied into
the repository) and, on each tick of its 5 fps clock, decodes the next one with ``cv2.imdecode`` on its
reader thread, as a camera's decoder delivers frames. A tick the reader thread reaches more than one period
late is skipped and counted (``late``): the camera's frame was lost before the agent saw it.

For each N: a warm-up, then ``seconds`` of streaming. Reported per N: offered fps (N x 5), achieved fps
(results committed to the outbox per second in the window), frames dropped by reason, out-of-order frames
skipped by the tracker, per-stage p50/p95 (decode on the camera thread; preprocess, inference,
postprocess, track and commit from the pipeline's own stage timings; commit is the wait for the outbox's
group commit, mostly fsync, not CPU), process CPU (cores busy) and the load average. Floors measured in the
same process: ``session.run`` alone on a prepared tensor (one thread), and ``cv2.imdecode`` alone.
**Sustained**: achieved >= 95% of offered and under 1% of the frames dropped.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import orjson
import yaml

from edge_agent.bundles.bundle import load_bundle
from edge_agent.config import CameraSourceConfig, ModelConfig, PipelineConfig
from edge_agent.delivery.outbox import Outbox
from edge_agent.flow.pipeline import InputItem, Pipeline, PipelineOutput, make_sector
from edge_agent.flow.sources.camera import CameraSource
from edge_agent.metrics import Metrics
from edge_agent.types import Image, U8Image
from edge_agent.vision.model import Model
from edge_agent.vision.runtime import RuntimeOptions

log = logging.getLogger("benchmarks.livestock_capacity")

ROOT = Path(__file__).resolve().parent.parent
CHUTE = Path("datasets/livestock/cattle_chute/train/images")
SHARED_CANDIDATES = (ROOT.parent / "shared", Path("/work/shared"))
EXAMPLE = ROOT / "deploy" / "examples" / "livestock.yaml"
SIZES = {"native": None, "720p": (1280, 720), "1080p": (1920, 1080)}
FPS = 5.0


def decode(data: bytes) -> U8Image:
    frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if frame is None:
        raise ValueError("undecodable JPEG")
    return np.asarray(frame, dtype=np.uint8)


def load_jpegs(size: str, limit: int = 120) -> list[bytes]:
    """The chute frames in frame order, as JPEG bytes (re-encoded at ``size`` unless native)."""
    for shared in SHARED_CANDIDATES:
        paths = sorted((shared / CHUTE).glob("frame_*.jpg"))[:limit]
        if paths:
            break
    else:
        raise SystemExit(f"no chute frames under {' or '.join(str(s / CHUTE) for s in SHARED_CANDIDATES)}")
    target = SIZES[size]
    if target is None:
        return [p.read_bytes() for p in paths]
    out = []
    for p in paths:
        img = decode(p.read_bytes())
        ok, buf = cv2.imencode(".jpg", cv2.resize(img, target, interpolation=cv2.INTER_LINEAR),
                               [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        out.append(buf.tobytes())
    return out


class JpegCamera:
    """A ``Capture``: decodes the next JPEG on each tick of a ``fps`` clock; ticks missed by > 1 period are lost."""

    def __init__(self, jpegs: Sequence[bytes], fps: float, offset: int, stats: Stats) -> None:
        self._jpegs, self._period, self._k = jpegs, 1.0 / fps, offset
        self._stats = stats
        self._next = 0.0
        self._stop = threading.Event()

    def open(self) -> bool:
        self._next = time.monotonic() + self._period
        return True

    def read(self) -> tuple[bool, U8Image | None]:
        now = time.monotonic()
        if now < self._next:
            self._stop.wait(self._next - now)
        now = time.monotonic()
        late = int((now - self._next) / self._period)
        if late > 0:
            self._stats.count("late", late)
        self._next += self._period * (late + 1)
        data = self._jpegs[self._k % len(self._jpegs)]
        self._k += 1
        t0 = time.perf_counter()
        frame = decode(data)
        self._stats.observe("camera_decode", time.perf_counter() - t0)
        return True, frame

    def release(self) -> None:
        self._stop.set()


def camera(jpegs: Sequence[bytes], offset: int, stats: Stats, url: str) -> JpegCamera:
    """The capture factory: each camera starts at its own frame so the streams differ."""
    return JpegCamera(jpegs, FPS, offset, stats)


class Stats(Metrics):
    """The agent's Metrics, also keeping every stage time and drop in memory for percentiles."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.recording = False
        self.samples: dict[str, list[float]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)

    def observe(self, stage: str, seconds: float) -> None:
        if self.recording:
            with self._lock:
                self.samples[stage].append(seconds)

    def count(self, what: str, n: int = 1) -> None:
        if self.recording:
            with self._lock:
                self.counts[what] += n

    def observe_stages(self, pipeline: str, seconds: Mapping[str, float]) -> None:
        super().observe_stages(pipeline, seconds)
        for stage, value in seconds.items():
            if stage != "decode":  # frames arrive decoded (the camera thread's decode is "camera_decode")
                self.observe(stage, value)
        self.count("committed")

    def frame_dropped(self, source: str, reason: str, count: int = 1) -> None:
        super().frame_dropped(source, reason, count)
        self.count(f"dropped_{reason}", count)

    def frame_read(self, source: str) -> None:
        super().frame_read(source)
        self.count("frames_read")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def floors(model: Model, jpegs: Sequence[bytes], rounds: int = 60) -> dict[str, float]:
    """session.run alone on a prepared tensor and cv2.imdecode alone (p50, ms), one thread, this process."""
    tensor, _ = model.preprocessor.run(Image.from_array(decode(jpegs[0]), "BGR"))
    feeds = model.feeds(tensor)
    run, dec = [], []
    for i in range(rounds):
        t0 = time.perf_counter()
        model.runtime.run(feeds)
        t1 = time.perf_counter()
        cv2.imdecode(np.frombuffer(jpegs[i % len(jpegs)], np.uint8), cv2.IMREAD_COLOR)
        t2 = time.perf_counter()
        run.append(t1 - t0)
        dec.append(t2 - t1)
    return {"session_run_p50_ms": round(pct(run, 50), 3), "imdecode_p50_ms": round(pct(dec, 50), 3)}


def trial(n: int, jpegs: Sequence[bytes], models: Sequence[Model], pcfg: PipelineConfig, seconds: float,
          max_in_flight: int, warmup: float, tmp: Path) -> dict[str, Any]:
    stats = Stats()
    outbox = Outbox(tmp / f"outbox-{n}.db", "bench-barn")
    pipeline = Pipeline(pcfg.name, models, outbox, kind="livestock", sector=make_sector(pcfg),
                        queue_size=pcfg.queue_size, metrics=stats)
    def order(out: PipelineOutput, item: InputItem) -> None:
        if out.sector.get("skipped"):
            stats.count("out_of_order")

    pipeline.add_sink("order", order)
    pipeline.start()
    cams = []
    for i in range(n):
        cfg = CameraSourceConfig.model_validate({
            "type": "camera", "name": f"cam{i}", "pipeline": pcfg.name, "url": f"rtsp://192.0.2.{i + 1}/live",
            "max_fps": FPS * 1.2,  # the camera itself sends 5 fps: the cap must not bite on clock jitter
            "max_in_flight": max_in_flight,
        })
        cams.append(CameraSource(cfg, submit=pipeline.submit, metrics=stats,
                                 capture_factory=functools.partial(camera, jpegs, (i * 37) % len(jpegs), stats)))
    for cam in cams:
        cam.start()
    try:
        threading.Event().wait(warmup)
        load0 = os.getloadavg()[0]
        cpu0, t0 = os.times(), time.monotonic()
        stats.recording = True
        threading.Event().wait(seconds)
        stats.recording = False
        elapsed = time.monotonic() - t0
        cpu1 = os.times()
        load1 = os.getloadavg()[0]
    finally:
        for cam in cams:
            cam.stop()
        pipeline.stop(10.0)
        outbox.close()
    c, s = stats.counts, stats.samples
    offered = n * FPS
    achieved = c["committed"] / elapsed
    dropped = {k[len("dropped_"):]: v for k, v in c.items() if k.startswith("dropped_")}
    dropped["late"] = c["late"]
    ticks = c["frames_read"] + c["late"]
    drop_share = sum(dropped.values()) / max(ticks, 1)
    cpu = (cpu1.user - cpu0.user + cpu1.system - cpu0.system) / elapsed
    return {
        "streams": n,
        "offered_fps": offered,
        "achieved_fps": round(achieved, 2),
        "achieved_share": round(achieved / offered, 4),
        "frames_offered": ticks,
        "dropped": dropped,
        "dropped_share": round(drop_share, 4),
        "out_of_order_skipped": c["out_of_order"],
        "sustained": achieved >= 0.95 * offered and drop_share < 0.01,
        "stage_ms": {
            stage: {"p50": round(pct(s[stage], 50), 3), "p95": round(pct(s[stage], 95), 3)}
            for stage in ("camera_decode", "preprocess", "inference", "postprocess", "sector", "outbox", "total")
        },
        "process_cpu_cores": round(cpu, 3),
        "cpu_ms_per_frame": round(1000.0 * cpu / max(achieved, 1e-9), 2),
        "loadavg_1m": [round(load0, 2), round(load1, 2)],
        "seconds": round(elapsed, 2),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", default="1,2,4,6,8,10,12,14,16,20")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--size", choices=sorted(SIZES), default="native")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max-in-flight", type=int, default=2,
                    help="per camera, as camera sources default to (1: frames of a camera never overtake each other)")
    ap.add_argument("--floor-rounds", type=int, default=60)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    doc = yaml.safe_load(EXAMPLE.read_text())
    mcfg = ModelConfig.model_validate(doc["models"][0])
    pcfg = PipelineConfig.model_validate({**doc["pipelines"][0], "workers": args.workers, "queue_size": 64})
    bundle = load_bundle(ROOT / "models" / mcfg.bundle)
    models = []
    for _ in range(args.workers):  # as the service builds them: one session of one thread per worker
        m = Model.load(bundle, RuntimeOptions(intra_op_threads=mcfg.threads, allow_spinning=False))
        if mcfg.score_threshold is not None:
            m.set_thresholds(score=mcfg.score_threshold)
        m.warmup(2)
        models.append(m)
    jpegs = load_jpegs(args.size)
    h, w = decode(jpegs[0]).shape[:2]
    report: dict[str, Any] = {
        "what": "livestock capacity: N cameras at 5 fps -> decode -> cattle_overhead -> tracker -> outbox",
        "model": bundle.manifest.name,
        "frame": f"{w}x{h} JPEG ({args.size}), {len(jpegs)} chute frames from ../shared, decoded per frame",
        "workers": args.workers,
        "max_in_flight": args.max_in_flight,
        "cpus": os.cpu_count(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "floors_before": floors(models[0], jpegs, args.floor_rounds),
        "trials": [],
    }
    with tempfile.TemporaryDirectory() as tmp_s:
        for n in (int(v) for v in args.streams.split(",")):
            r = trial(n, jpegs, models, pcfg, args.seconds, args.max_in_flight, args.warmup, Path(tmp_s))
            report["trials"].append(r)
            st = r["stage_ms"]
            print(f"N={n:3d} offered {r['offered_fps']:6.1f} achieved {r['achieved_fps']:6.1f} "
                  f"({r['achieved_share']:.3f}) dropped {r['dropped']} cpu {r['process_cpu_cores']} "
                  f"load {r['loadavg_1m']} decode {st['camera_decode']['p50']} infer {st['inference']['p50']} "
                  f"track {st['sector']['p50']} commit {st['outbox']['p50']} total {st['total']['p50']}", flush=True)
            if not r["sustained"] and n > 1 and not report["trials"][-2]["sustained"]:
                break  # two in a row beyond capacity: stop
    report["floors_after"] = floors(models[0], jpegs, args.floor_rounds)
    ok = [t["streams"] for t in report["trials"] if t["sustained"]]
    report["max_sustained_streams"] = max(ok) if ok else 0
    # What the same work needs without other tenants: every core busy with this process alone. From the CPU time
    # per committed frame (decode, inference, tracking, commit, threads) over the trials that kept up.
    per_frame = [t["cpu_ms_per_frame"] for t in report["trials"] if t["achieved_share"] >= 0.95]
    if per_frame:
        cost = statistics.median(per_frame)
        report["cpu_ms_per_frame_median"] = cost
        report["streams_per_board_if_cpu_bound"] = round((os.cpu_count() or 1) * 1000.0 / (cost * FPS), 1)
    report["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    if args.json:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"max sustained streams at {FPS:g} fps: {report['max_sustained_streams']}; CPU per frame "
          f"{report.get('cpu_ms_per_frame_median')} ms -> {report.get('streams_per_board_if_cpu_bound')} streams "
          f"if this process had all {os.cpu_count()} cores")
    return report


if __name__ == "__main__":
    main()
