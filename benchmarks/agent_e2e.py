"""Whole-agent throughput: watched folder -> pipeline (tiny ONNX model) -> outbox -> Mosquitto -> coordinator ack.

    .venv/bin/python -m benchmarks.agent_e2e [N] [WORKERS]

Drops N small PNG files into the watched folder of a running ``Service`` (real Mosquitto on a free
loopback port, real coordinator with its SQLite store) and measures the time until the coordinator
holds all N results and the agent's outbox is empty (every result acknowledged end to end).
Reported as results/s and as a ratio to a bare loop of ``model.predict_bytes`` on the same files
in one thread (what the model alone allows), so the figure survives a change of machine.
"""

from __future__ import annotations

import io
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson
from PIL import Image

from edge_agent.agent.service import Service
from edge_agent.bundles.bundle import load_bundle
from edge_agent.config import load_config
from edge_agent.vision.model import Model
from edge_agent.vision.runtime import RuntimeOptions
from tests.support.broker import Broker
from tests.support.delivery import start_coordinator
from tests.support.onnx_models import classifier_manifest, tiny_classifier, write_bundle

LABELS = ["Apple___healthy", "Apple___Apple_scab", "Corn___healthy"]


def _png(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _wait(cond: object, timeout: float) -> bool:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        threading.Event().wait(0.01)
    return bool(cond())


def main(n: int = 1000, workers: int = 2, mqtt: int = 1) -> dict[str, float]:
    """``mqtt=0``: no broker; measures folder -> pipeline -> durable outbox only."""
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        bundle_dir = tmp / "models" / "tiny_leaf"
        bundle_dir.mkdir(parents=True)
        onnx_path = tiny_classifier(bundle_dir / "model.onnx", n_classes=len(LABELS))
        write_bundle(bundle_dir, classifier_manifest(onnx_path, LABELS, name="tiny_leaf", thresholds={"ood": 5.0}))
        images = [_png(i) for i in range(n)]

        model = Model.load(load_bundle(bundle_dir), RuntimeOptions(intra_op_threads=1))
        model.warmup(2)
        t0 = time.perf_counter()
        for data in images:
            model.predict_bytes(data)
        bare_per_s = n / (time.perf_counter() - t0)

        broker = Broker(tmp / "broker")
        broker.start()
        coordinator = start_coordinator(tmp / "coord.db", broker.port)
        cfg_path = tmp / "agent.yaml"
        cfg_path.write_text(
            f"""\
device_id: bench-1
state_dir: state
models_dir: {tmp / "models"}
models: [{{name: leaf, bundle: tiny_leaf}}]
pipelines: [{{name: crop, kind: crop, model: leaf, workers: {workers}, queue_size: 64}}]
sources: [{{type: folder, name: inbox, pipeline: crop, path: inbox, poll_interval_s: 0.02, settle_s: 0.0,
           max_in_flight: 64}}]
mqtt: {{enabled: {"true" if mqtt else "false"}, host: 127.0.0.1, port: {broker.port}, max_inflight: 256,
       heartbeat_s: 5}}
metrics: {{enabled: false}}
"""
        )
        service = Service(load_config(cfg_path))
        service.start()
        try:
            staging = tmp / "staging"
            staging.mkdir()
            for i, data in enumerate(images):
                (staging / f"{i:06d}.png").write_bytes(data)
            inbox = tmp / "inbox"
            t0 = time.perf_counter()
            for p in sorted(staging.iterdir()):
                p.rename(inbox / p.name)  # atomic drop, like a camera app writing then renaming
            assert service.outbox is not None
            outbox = service.outbox
            if mqtt:
                ok = _wait(lambda: coordinator.store.count_results("bench-1") >= n and outbox.stats().backlog == 0, 600)
            else:
                ok = _wait(lambda: outbox.stats().next_seq > n, 600)
            elapsed = time.perf_counter() - t0
        finally:
            service.stop(10)
            coordinator.stop()
            broker.close()
        if not ok:
            raise SystemExit(f"not all {n} results acknowledged within 600 s")
        e2e_per_s = n / elapsed
        out = {
            "n": float(n),
            "workers": float(workers),
            "bare_predict_per_s_1thread": round(bare_per_s, 1),
            "e2e_acked_per_s" if mqtt else "stored_per_s": round(e2e_per_s, 1),
            "ratio_e2e_to_bare": round(e2e_per_s / bare_per_s, 3),
        }
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return out


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:4]]
    main(*args)
