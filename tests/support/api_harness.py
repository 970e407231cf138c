"""A real crop pipeline behind the HTTP API, for tests, the browser test and the load benchmark.

The model is the real :class:`edge_agent.vision.model.Model` (real decode, EXIF, pixel cap, preprocess,
softmax decoder) over a :class:`FakeRuntime` whose answer is a function of the pixels:

- a (nearly) black photo is out of domain -> "not a recognised leaf";
- upper half brighter than the lower half -> ``Bean___bean_rust`` (so EXIF orientation is visible);
- otherwise -> ``Bean___healthy``.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI
from PIL import Image as PILImage
from prometheus_client import CollectorRegistry

from edge_agent.api import ApiContext, create_app
from edge_agent.bundles.manifest import parse_manifest
from edge_agent.config import HttpConfig
from edge_agent.delivery.outbox import Outbox
from edge_agent.flow.pipeline import InputItem, Pipeline, PipelineOutput
from edge_agent.sectors.advice import CROP_LABELS, AdviceBook, load_advice
from edge_agent.sectors.crop import crop_verdict
from edge_agent.types import Image, Result
from edge_agent.vision.model import Model
from edge_agent.vision.runtime import FakeRuntime

LABELS = list(CROP_LABELS)
RUST = LABELS.index("Bean___bean_rust")
HEALTHY = LABELS.index("Bean___healthy")
ANGULAR = LABELS.index("Bean___angular_leaf_spot")
T = 10.0
LOCAL = "http://localhost"
"""Base URL for TestClient: its default host name (testserver) is not one the agent answers for."""


def fake_crop_model(size: int = 32, max_pixels: int = 40_000_000) -> Model:
    doc = {
        "schema_version": 1,
        "name": "fake_crop",
        "version": "0.0.1",
        "task": "classification",
        "model_file": "fake.onnx",
        "sha256": "0" * 64,
        "license": "Apache-2.0",
        "source": "tests/support/api_harness.py",
        "input": {
            "name": "input",
            "width": size,
            "height": size,
            "color": "RGB",
            "resize": {"mode": "stretch"},
            "normalize": {"scale": 1 / 255, "mean": [0, 0, 0], "std": [1, 1, 1]},
        },
        "decoder": {"type": "softmax", "output": "logits", "top_k": 3, "ood_output": "ood"},
        "labels": LABELS,
        "thresholds": {"ood": 0.5},
    }

    def fn(feeds: Mapping[str, Any]) -> dict[str, Any]:
        x = np.asarray(feeds["input"], dtype=np.float32)
        h = x.shape[2]
        top, bottom = float(x[:, :, : h // 2].mean()), float(x[:, :, h // 2 :].mean())
        logits = np.zeros((1, len(LABELS)), np.float32)
        logits[0, RUST if top > bottom + 0.05 else HEALTHY] = 4.0
        logits[0, ANGULAR] = 2.0
        ood = np.array([[1.0 if float(x.mean()) < 0.03 else 0.0]], np.float32)
        return {"logits": logits, "ood": ood}

    manifest = parse_manifest(json.dumps(doc))
    return Model(manifest, FakeRuntime(("input",), ("logits", "ood"), fn), max_pixels=max_pixels)


class GatedModel:
    """Holds every prediction until ``gate`` is set (for the 202 / pending path)."""

    def __init__(self, model: Model, gate: threading.Event) -> None:
        self.model = model
        self.gate = gate

    def predict(self, image: Image) -> Result:
        assert self.gate.wait(T)
        return self.model.predict(image)

    def predict_bytes(self, data: bytes) -> Result:
        assert self.gate.wait(T)
        return self.model.predict_bytes(data)


def leaf_jpeg(size: tuple[int, int] = (320, 240), top_bright: bool = True, quality: int = 90) -> bytes:
    """A synthetic JPEG: bright upper half (rust) or bright lower half (healthy)."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[...] = (40, 120, 40)
    if top_bright:
        arr[: h // 2] = (200, 230, 200)
    else:
        arr[h // 2 :] = (200, 230, 200)
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@dataclass
class Harness:
    app: FastAPI
    outbox: Outbox
    pipeline: Pipeline
    spool_dir: Path
    registry: CollectorRegistry
    ready: threading.Event
    submitted: list[InputItem] = field(default_factory=list)

    def close(self) -> None:
        self.pipeline.stop(T)
        self.outbox.close()


_BOOK: list[AdviceBook] = []


def advice_book() -> AdviceBook:
    """The shipped advice, loaded once per test session."""
    if not _BOOK:
        _BOOK.append(load_advice())
    return _BOOK[0]


def build(
    tmp: Path,
    settings: HttpConfig | None = None,
    *,
    model: Any = None,
    workers: int = 1,
    queue_size: int = 16,
    submit: Callable[[InputItem], Future[PipelineOutput]] | None = None,
    ready: bool = True,
) -> Harness:
    """Outbox + started crop pipeline + API app under ``tmp``."""
    spool = tmp / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    outbox = Outbox(tmp / "outbox.db", "test-device")
    models = [model if model is not None else fake_crop_model() for _ in range(workers)]
    pipeline = Pipeline(
        "crop",
        models,
        outbox,
        kind="crop",
        sector=lambda result, item: crop_verdict(result, item.hints),
        queue_size=queue_size,
    )
    pipeline.start()
    registry = CollectorRegistry()
    ready_flag = threading.Event()
    if ready:
        ready_flag.set()
    submitted: list[InputItem] = []

    def default_submit(item: InputItem) -> Future[PipelineOutput]:
        submitted.append(item)
        return pipeline.submit(item)

    ctx = ApiContext(
        settings=settings or HttpConfig(),
        spool_dir=spool,
        outbox=outbox,
        submit=submit or default_submit,
        models=lambda: [
            {"name": "fake_crop", "version": "0.0.1", "task": "classification", "labels": LABELS, "license": "MIT"}
        ],
        is_ready=ready_flag.is_set,
        registry=registry,
        pipeline="crop",
        advice=advice_book(),
    )
    return Harness(create_app(ctx), outbox, pipeline, spool, registry, ready_flag, submitted)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], bool], timeout: float = T, what: str = "condition") -> None:
    """Wait until ``cond()`` holds (re-checked every 10 ms), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def serve(app: FastAPI, **config: Any) -> Iterator[int]:
    """Run ``app`` under a real uvicorn server on a free loopback port, in a thread; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, what="uvicorn to start")
        yield port
    finally:
        server.should_exit = True
        thread.join(T)
        sock.close()
