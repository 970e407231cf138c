"""Upload load test and upload-to-answer timings against a real agent process (issue 5, RELIABILITY R13).

    .venv/bin/python -m benchmarks.load_upload [--bundle DIR] [--uploads 50] [--mb 3] [--json OUT]

Starts ``edge-agent run`` (HTTP on a free loopback port, MQTT off) with the crop model: ``--bundle``,
else the first crop bundle under ``models/`` (classification, ``<Crop>___<condition>`` labels), else a
stand-in built from the shared EfficientNet-Lite0 ImageNet classifier (same backbone and input size
a Lite0-based crop model has, so the timings are representative; its verdicts are not). Then:

1. upload -> answer time (median of N sequential POSTs) for a 12 MP phone-sized JPEG and for the
   1024 px JPEG the farmer page sends;
2. ``--uploads`` concurrent uploads of ``--mb`` MB photos: no 5xx allowed, every 2xx must have a
   result (202s are polled), and the agent's peak RSS (VmHWM) is reported next to its idle RSS.

Prints figures (no pass/fail timing thresholds: performance claims are ratios and figures, not tests).
Exit status 1 when a 5xx was seen or a 2xx had no result.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image as PILImage

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
LEAF = SHARED / "datasets" / "crops" / "plantvillage" / "train" / "Apple___Apple_scab"
LITE0 = SHARED / "models" / "efficientnet_lite0_imagenet"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_crop_bundle() -> Path | None:
    for manifest in sorted((ROOT / "models").glob("*/manifest.json")):
        doc = json.loads(manifest.read_text())
        labels = doc.get("labels", [])
        if doc.get("task") == "classification" and labels and sum("___" in str(x) for x in labels) >= len(labels) // 2:
            return manifest.parent
    return None


def lite0_stand_in(directory: Path) -> Path:
    """A bundle of the shared EfficientNet-Lite0 (ImageNet labels): crop-model compute, not crop verdicts."""
    import hashlib

    directory.mkdir(parents=True, exist_ok=True)
    onnx = directory / "efficientnet_lite0.onnx"
    shutil.copyfile(LITE0 / "efficientnet_lite0.onnx", onnx)
    labels = [line.strip() for line in (LITE0 / "imagenet_labels.txt").read_text().splitlines() if line.strip()]
    manifest = {
        "schema_version": 1,
        "name": "lite0_stand_in",
        "version": "0.0.0",
        "task": "classification",
        "model_file": onnx.name,
        "sha256": hashlib.sha256(onnx.read_bytes()).hexdigest(),
        "license": "Apache-2.0",
        "source": "shared/models/efficientnet_lite0_imagenet (benchmark stand-in for the crop model)",
        "input": {
            "name": "input",
            "width": 224,
            "height": 224,
            "color": "RGB",
            "resize": {"mode": "stretch"},
            "normalize": {"scale": 1.0, "mean": [127, 127, 127], "std": [128, 128, 128]},
        },
        "decoder": {"type": "softmax", "output": "logits", "top_k": 5},
        "labels": labels,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def phone_photo(size: tuple[int, int], target_bytes: int | None, seed: int = 0) -> bytes:
    """A leaf photo from the shared set, resized to ``size``, with sensor-like noise to reach ~``target_bytes``."""
    leaf = PILImage.open(sorted(LEAF.iterdir())[0]).convert("RGB").resize(size, PILImage.Resampling.BICUBIC)
    base = np.asarray(leaf, dtype=np.int16)
    rng = np.random.default_rng(seed)
    amplitude = 0
    while True:
        noisy = base + rng.integers(-amplitude, amplitude + 1, base.shape, dtype=np.int16) if amplitude else base
        buf = io.BytesIO()
        PILImage.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        if target_bytes is None or len(data) >= target_bytes or amplitude >= 64:
            return data
        amplitude = max(2, round(amplitude * 1.4))


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


class Agent:
    """``edge-agent run`` in a subprocess, ended by PID."""

    def __init__(self, bundle: Path, workdir: Path, workers: int, queue_size: int) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = workdir / "agent.yaml"
        config.write_text(
            f"""\
device_id: load-test
state_dir: {workdir / "state"}
models_dir: {bundle.parent}
shutdown_timeout_s: 10
log_level: warning
models:
  - name: crop
    bundle: {bundle.name}
pipelines:
  - name: crop
    kind: crop
    model: crop
    workers: {workers}
    queue_size: {queue_size}
mqtt:
  enabled: false
metrics:
  enabled: false
http:
  enabled: true
  port: {self.port}
  rate_limit_per_minute: 100000
  rate_limit_burst: 1000
  result_timeout_s: 60
  queue_wait_s: 60
"""
        )
        self.log = (workdir / "agent.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError((workdir / "agent.log").read_text())
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("agent not ready after 120 s")
            time.sleep(0.2)

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()


def time_uploads(base: str, photo: bytes, runs: int) -> dict[str, float]:
    times: list[float] = []
    with httpx.Client(base_url=base, timeout=120) as c:
        c.post("/v1/diagnose", content=photo, headers={"content-type": "image/jpeg"})  # warm the path
        for _ in range(runs):
            t0 = time.perf_counter()
            r = c.post("/v1/diagnose", files={"image": ("photo.jpg", photo, "image/jpeg")})
            times.append((time.perf_counter() - t0) * 1000.0)
            assert r.status_code == 200, r.text
    return {"median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1), "runs": runs,
            "bytes": len(photo)}


async def burst(base: str, photos: list[bytes], pid: int) -> dict[str, Any]:
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    ids: list[str] = []
    pending: list[str] = []
    missing: list[str] = []
    peak_sampled = [rss_kb(pid, "VmRSS")]
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            peak_sampled.append(rss_kb(pid, "VmRSS"))
            await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=len(photos), max_keepalive_connections=len(photos))
    async with httpx.AsyncClient(base_url=base, timeout=180, limits=limits) as c:

        async def one(photo: bytes) -> None:
            t0 = time.perf_counter()
            r = await c.post("/v1/diagnose", files={"image": ("photo.jpg", photo, "image/jpeg")})
            latencies.append((time.perf_counter() - t0) * 1000.0)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                ids.append(r.json()["id"])
            elif r.status_code == 202:
                pending.append(r.json()["location"])

        sampler = asyncio.create_task(sample())
        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in photos))
        wall = time.perf_counter() - t0
        done.set()
        await sampler
        for location in pending:  # every 2xx must end with a result
            for _ in range(600):
                r = await c.get(location)
                if r.status_code != 202:
                    break
                await asyncio.sleep(0.1)
            if r.status_code == 200:
                ids.append(r.json()["id"])
            else:
                missing.append(location)
        for rid in ids:
            if (await c.get(f"/v1/results/{rid}")).status_code != 200:
                missing.append(rid)
    latencies.sort()
    return {
        "uploads": len(photos),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "wall_s": round(wall, 2),
        "uploads_per_s": round(len(photos) / wall, 2),
        "latency_ms_p50": round(latencies[len(latencies) // 2], 1),
        "latency_ms_p95": round(latencies[int(len(latencies) * 0.95) - 1], 1),
        "latency_ms_max": round(latencies[-1], 1),
        "results_ok": len(ids),
        "missing_results": missing,
        "rss_peak_sampled_mb": round(max(peak_sampled) / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="crop model bundle (default: auto)")
    if not LEAF.is_dir():
        raise SystemExit(f"load_upload: {LEAF} not found (leaf photos from ../shared beside the repo)")
    parser.add_argument("--uploads", type=int, default=50)
    parser.add_argument("--mb", type=float, default=3.0, help="size of each burst photo in MB")
    parser.add_argument("--runs", type=int, default=10, help="sequential uploads per timing")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="load_upload-") as tmp:
        work = Path(tmp)
        bundle = args.bundle or find_crop_bundle()
        model_note = f"crop bundle {bundle}" if bundle else "stand-in: shared EfficientNet-Lite0 (ImageNet labels)"
        if bundle is None:
            bundle = lite0_stand_in(work / "lite0")
        print(f"model: {model_note}")
        heavy = [phone_photo((4000, 3000), int(args.mb * 1e6), seed=i) for i in range(4)]
        phone = heavy[0]  # a 12 MP phone photo of realistic size (sensor noise included)
        small = phone_photo((1024, 768), None)  # what the farmer page sends after its in-browser downscale
        agent = Agent(bundle.resolve(), work, args.workers, args.queue_size)
        try:
            idle_mb = rss_kb(agent.proc.pid, "VmRSS") / 1024
            out: dict[str, Any] = {"model": model_note, "cpu_count": os.cpu_count()}
            out["upload_to_answer_12mp"] = time_uploads(agent.base, phone, args.runs)
            out["upload_to_answer_1024px"] = time_uploads(agent.base, small, args.runs)
            photos = [heavy[i % len(heavy)] for i in range(args.uploads)]
            out["burst"] = asyncio.run(burst(agent.base, photos, agent.proc.pid))
            out["burst"]["photo_mb"] = round(sum(len(p) for p in photos) / len(photos) / 1e6, 2)
            out["rss_idle_mb"] = round(idle_mb, 1)
            out["rss_peak_mb_vmhwm"] = round(rss_kb(agent.proc.pid, "VmHWM") / 1024, 1)
        finally:
            agent.stop()
    print(json.dumps(out, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    b = out["burst"]
    bad = sum(v for k, v in b["statuses"].items() if k.startswith("5")) + len(b["missing_results"])
    print(
        f"12 MP upload->answer {out['upload_to_answer_12mp']['median_ms']} ms (median), "
        f"1024 px {out['upload_to_answer_1024px']['median_ms']} ms; burst of {b['uploads']} x {b['photo_mb']} MB: "
        f"statuses {b['statuses']}, {b['wall_s']} s, p95 {b['latency_ms_p95']} ms; "
        f"RSS idle {out['rss_idle_mb']} MB, peak {out['rss_peak_mb_vmhwm']} MB"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
