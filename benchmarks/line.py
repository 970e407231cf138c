"""Trigger-to-signal latency of the line: trigger -> decode -> tile_anomaly -> verdict -> Modbus coil write.

    .venv/bin/python -m benchmarks.line [--seconds 40] [--quick]

A real ``Service`` (in this process) runs the shipped ``tile_anomaly`` bundle in an inspection pipeline with two
workers (one onnxruntime thread each), a line recipe (deadline 500 ms, fail-safe reject) and a Modbus TCP output
to pymodbus's own server on loopback (``tests/support/modbus_server.py``). A trigger thread calls the recipe at
a fixed rate with a magnetic-tile photo (JPEG bytes, decoded by the trigger as the HTTP route does); the latency
of one part runs from the trigger call to the moment the PLC acknowledged the coil write (the Modbus output's
lane returned), so it holds the decode, the queue, inference, the verdict and one Modbus round trip.

Conditions, one after the other in one run: triggers alone; triggers while a watched folder feeds the same
pipeline with tile photos (load: the line's parts compete with it for the two workers); and a higher trigger
rate under the same load. Reported: p50/p95/p99/max, fail-safes (deadline missed), and the pipeline's
throughput over the window. Photos: ``../shared/datasets/inspection/magnetic_tile/test`` (never committed);
without it, synthetic tiles. Writes ``benchmarks/results/line.{json,md}``.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from PIL import Image

from edge_agent.agent.service import Service
from edge_agent.config import load_config
from edge_agent.line.outputs import Decision
from tests.support.modbus_server import modbus_server

ROOT = Path(__file__).resolve().parent.parent
TILES = ROOT.parent / "shared" / "datasets" / "inspection" / "magnetic_tile" / "test"
RESULTS = Path(__file__).resolve().parent / "results"

CONFIG = """
device_id: line-bench
state_dir: {state}
models_dir: {models}
log_level: warning
models:
  - {{name: tiles, bundle: tile_anomaly, threads: 1}}
pipelines:
  - {{name: tiles, kind: inspection, model: tiles, workers: 2, queue_size: 64}}
sources:
  - {{type: folder, name: load, pipeline: tiles, path: {inbox}, poll_interval_s: 0.05, settle_s: 0.0,
     max_in_flight: 8}}
mqtt: {{enabled: false}}
metrics: {{enabled: false}}
line:
  recipes:
    - {{id: tile, pipeline: tiles, deadline_ms: 500, fail_safe: reject, outputs: [plc]}}
  outputs:
    - {{type: modbus, name: plc, host: 127.0.0.1, port: {port}, coil: 0}}
"""


def photos(n: int = 64) -> list[bytes]:
    """JPEG bytes of magnetic-tile test photos (good and defective), or synthetic tiles without the dataset."""
    files = sorted(TILES.glob("*/*.jpg"))[:: max(1, len(sorted(TILES.glob("*/*.jpg"))) // n)][:n] if TILES.is_dir() \
        else []
    if files:
        return [f.read_bytes() for f in files]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        px = np.clip(rng.normal(120, 12, (240, 240, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs) * 1000.0
    p50, p95, p99 = (round(float(np.percentile(a, q)), 2) for q in (50, 95, 99))
    return {"n": len(xs), "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": round(float(a.max()), 2)}


def run(seconds: float, quick: bool) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    images = photos()
    conditions = [("triggers alone, 5 Hz", 5.0, 0.0), ("5 Hz + folder load 8 photos/s", 5.0, 8.0),
                  ("10 Hz + folder load 8 photos/s", 10.0, 8.0)]
    out: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
                           "cpus": os.cpu_count(), "photos": "magnetic_tile/test" if TILES.is_dir() else "synthetic",
                           "deadline_ms": 500, "seconds_per_condition": seconds, "conditions": []}
    with modbus_server() as plc, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inbox = work / "inbox"
        inbox.mkdir()
        cfg_path = work / "agent.yaml"
        cfg_path.write_text(CONFIG.format(state=work / "state", models=ROOT / "models", inbox=inbox, port=plc.port))
        service = Service(load_config(cfg_path))
        service.start()
        try:
            line = service.line
            assert line is not None
            signalled: dict[str, float] = {}
            lock = threading.Lock()
            observe = line._observe

            def record(output: str, decision: Decision, done_at: float, ok: bool) -> None:
                observe(output, decision, done_at, ok)
                if ok:
                    with lock:
                        signalled[decision.part_id] = done_at - decision.triggered_at

            for lane in line.lanes.values():
                lane._observe = record
            # warm-up: a few parts and photos
            for i in range(5):
                line.trigger("tile", f"warm-{i}", data=images[i]).result(10)
            # the floor, same process: decode + predict of the same photos by one worker's model, nothing else
            model: Any = service.pipelines["tiles"].models[0]
            bare = []
            for i in range(60 if not quick else 20):
                t0 = time.monotonic()
                model.predict_bytes(images[i % len(images)])
                bare.append(time.monotonic() - t0)
            out["bare_decode_predict"] = percentiles(bare)
            print("bare", out["bare_decode_predict"], flush=True)
            def window(hz: float, secs: float, tag: str) -> list[Decision]:
                futures = []
                t_start = time.monotonic()
                nxt, i = t_start, 0
                while time.monotonic() - t_start < secs:
                    futures.append(line.trigger("tile", f"{tag}-{i}", data=images[i % len(images)]))
                    i += 1
                    nxt += 1.0 / hz
                    time.sleep(max(0.0, nxt - time.monotonic()))
                return [f.result(10) for f in futures]

            def row(name: str, hz: float, load_hz: float, priority: bool, settled: list[Decision],
                    inputs_per_s: float) -> dict[str, Any]:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    with lock:
                        if all(d.part_id in signalled for d in settled):
                            break
                    time.sleep(0.01)
                with lock:
                    lat = [signalled[d.part_id] for d in settled if d.part_id in signalled]
                    overhead = [signalled[d.part_id] - (d.decided_at - d.triggered_at) for d in settled
                                if d.part_id in signalled and d.cause == "verdict"]
                r = {
                    "condition": name, "trigger_hz": hz, "load_photos_per_s": load_hz, "line_priority": priority,
                    "trigger_to_signal": percentiles(lat),
                    "trigger_to_verdict": percentiles([d.decided_at - d.triggered_at for d in settled
                                                       if d.cause == "verdict"]),
                    "verdict_to_signal": percentiles(overhead),
                    # a fail-safe is due at the deadline: how much later did the PLC have it
                    "fail_safe_after_deadline": percentiles([signalled[d.part_id] - d.deadline_ms / 1000.0
                                                             for d in settled if d.cause == "deadline"
                                                             and d.part_id in signalled]),
                    "p50_over_bare": round(percentiles(lat).get("p50_ms", 0.0) / out["bare_decode_predict"]["p50_ms"],
                                           2),
                    "verdict_in_time": sum(d.cause == "verdict" for d in settled),
                    "fail_safe": sum(d.cause != "verdict" for d in settled),
                    "pipeline_inputs_per_s": inputs_per_s,
                }
                print(orjson.dumps(r).decode(), flush=True)
                return r

            for name, hz, load_hz in conditions:
                if quick and load_hz and hz > 5:
                    continue
                stop = threading.Event()

                def feed(rate: float = load_hz, stop: threading.Event = stop) -> None:
                    k = 0
                    nxt = time.monotonic()
                    while not stop.is_set():
                        if len(list(inbox.glob("*.jpg"))) < 16:  # a camera-like steady stream, not a flood
                            (inbox / f"l{k}.tmp").write_bytes(images[k % len(images)])
                            os.replace(inbox / f"l{k}.tmp", inbox / f"l{k}.jpg")
                        k += 1
                        nxt += 1.0 / rate
                        stop.wait(max(0.0, nxt - time.monotonic()))

                feeder = threading.Thread(target=feed, daemon=True) if load_hz else None
                if feeder is not None:
                    feeder.start()
                    time.sleep(2.0)  # let the load settle
                # with a load: first come first served vs line first, alternating in rounds of equal length so that
                # load from other processes on the machine hits both alike
                modes = [True] if feeder is None else [False, True]
                rounds = 1 if feeder is None else 4
                got: dict[bool, list[Decision]] = {m: [] for m in modes}
                done: dict[bool, tuple[int, float]] = {m: (0, 0.0) for m in modes}
                for k in range(rounds):
                    for mode in (modes if k % 2 == 0 else modes[::-1]):
                        line.cfg = line.cfg.model_copy(update={"priority": mode})
                        n0, t0 = service.pipelines["tiles"].processed, time.monotonic()
                        got[mode] += window(hz, seconds / rounds, f"{name[:3]}-{int(mode)}-{k}")
                        n, t = done[mode]
                        done[mode] = (n + service.pipelines["tiles"].processed - n0, t + time.monotonic() - t0)
                stop.set()
                if feeder is not None:
                    feeder.join(5)
                for mode in modes:
                    n, t = done[mode]
                    out["conditions"].append(row(name, hz, load_hz, mode, got[mode], round(n / t, 1)))
                line.cfg = line.cfg.model_copy(update={"priority": True})
                for f in inbox.glob("*.jpg"):  # what the feeder left: not part of the next condition
                    f.unlink(missing_ok=True)
                time.sleep(1.0)
            out["modbus_writes"] = len(plc.writes)
        finally:
            service.stop(10)
            shutil.rmtree(work / "state", ignore_errors=True)
    return out


def report(res: dict[str, Any]) -> str:
    lines = [f"# Line: trigger-to-signal latency ({res['when']}, {res['cpus']} CPUs, photos {res['photos']})", "",
             "tile_anomaly (FP32), 2 workers x 1 thread, deadline 500 ms, Modbus TCP coil on loopback "
             "(pymodbus server); latency = trigger call -> PLC acknowledged the write.", "",
             f"Floor (same run, one worker's model alone): decode + predict p50 "
             f"{res['bare_decode_predict']['p50_ms']} ms, p99 {res['bare_decode_predict']['p99_ms']} ms.", "",
             "| condition | queue | parts | p50 ms | p95 ms | p99 ms | max ms | p50 / floor "
             "| verdict->signal p50 / p99 ms | fail-safe | fail-safe after deadline p50 / max ms | pipeline inputs/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["conditions"]:
        t, v, late = r["trigger_to_signal"], r["verdict_to_signal"], r["fail_safe_after_deadline"]
        queue = "line first" if r["line_priority"] else "first come"
        lines.append(f"| {r['condition']} | {queue} | {t['n']} | {t.get('p50_ms')} | {t.get('p95_ms')} | "
                     f"{t.get('p99_ms')} | {t.get('max_ms')} | {r['p50_over_bare']} | "
                     f"{v.get('p50_ms')} / {v.get('p99_ms')} | {r['fail_safe']} | "
                     f"{late.get('p50_ms', '-')} / {late.get('max_ms', '-')} | {r['pipeline_inputs_per_s']} |")
    return "\n".join(lines) + "\n"


def figure(runs: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    """p50 and p99 per condition and queue order, one panel per run (matplotlib, the ``plot`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 3.6), sharey=True, squeeze=False)
    for ax, (title, res) in zip(axes[0], runs, strict=True):
        rows = res["conditions"]
        labels = [f"{r['condition'].replace(' + folder load 8 photos/s', ' + load').replace('triggers alone, ', '')}"
                  f"\n{'line first' if r['line_priority'] else 'first come'}" for r in rows]
        x = np.arange(len(rows))
        p50 = [r["trigger_to_signal"]["p50_ms"] for r in rows]
        p99 = [r["trigger_to_signal"]["p99_ms"] for r in rows]
        ax.bar(x - 0.2, p50, 0.4, label="p50")
        ax.bar(x + 0.2, p99, 0.4, label="p99")
        ax.axhline(res["deadline_ms"], color="red", linestyle="--", linewidth=1, label="deadline")
        for i, r in enumerate(rows):
            if r["fail_safe"]:
                ax.annotate(f"{r['fail_safe']} fail-safe", (x[i] + 0.2, p99[i]), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0][0].set_ylabel("trigger -> PLC ack, ms")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Line: tile_anomaly + Modbus TCP on loopback, 2 shared vCPUs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="line")
    ap.add_argument("--figure-only", action="store_true", help="redraw results/line.png from the stored runs")
    args = ap.parse_args()
    if args.figure_only:
        runs = [(f"{name} ({json['when']})", json) for name, json in (
            ("quiet run", orjson.loads((RESULTS / "line.json").read_bytes())),
            ("busy run", orjson.loads((RESULTS / "line-busy.json").read_bytes())),
            ("busiest run", orjson.loads((RESULTS / "line-contended.json").read_bytes())))]
        figure(runs, RESULTS / "line.png")
        return
    res = run(args.seconds if not args.quick else min(args.seconds, 10.0), args.quick)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))
    (RESULTS / f"{args.out}.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
