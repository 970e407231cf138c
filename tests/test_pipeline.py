"""Pipeline (contract 4): bounded queue, workers, sector logic, outbox write, rejections, sinks, shutdown."""

from __future__ import annotations

import threading
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from edge_agent.config import PipelineConfig
from edge_agent.delivery.interface import StoredResult
from edge_agent.errors import (
    EdgeAgentError,
    ImageEmptyError,
    InputNotFoundError,
    OverloadedError,
    StorageFullError,
)
from edge_agent.flow.pipeline import InputItem, Pipeline, PipelineOutput, make_sector
from edge_agent.metrics import Metrics
from edge_agent.types import Classification, Detection, Image, Result, Timings

T = 10.0  # generous timeout for waits on conditions


class FakeModel:
    """Classifies every image as 'good' (or 'crack' when the bytes say so); b'' is an empty image."""

    def __init__(self, gate: threading.Event | None = None, name: str = "fake") -> None:
        self.gate = gate
        self.name = name
        self.threads: set[str] = set()
        self.started = threading.Event()
        self.calls = 0

    def predict(self, image: Image) -> Result:
        return self._result("good", image.original_size)

    def predict_bytes(self, data: bytes) -> Result:
        self.calls += 1
        self.started.set()
        self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            assert self.gate.wait(T)
        if not data:
            raise ImageEmptyError("empty file")
        if data == b"boom":
            raise RuntimeError("model exploded")
        return self._result(data.decode(errors="replace"), (64, 48))

    def _result(self, label: str, size: tuple[int, int]) -> Result:
        return Result(self.name, "1.0", "classification", (Classification(label, 0.9, 0),), size, Timings(1, 2, 3, 4))


class FakeOutbox:
    def __init__(self, fail_with: EdgeAgentError | None = None) -> None:
        self.results: dict[str, StoredResult] = {}
        self.rejected: dict[str, str] = {}
        self.fail_with = fail_with
        self.lock = threading.Lock()

    def add_result(
        self, input_id: str, *, pipeline: str, model: str, model_version: str, body: dict[str, Any]
    ) -> StoredResult:
        if self.fail_with is not None:
            raise self.fail_with
        with self.lock:
            if input_id not in self.results:
                self.results[input_id] = StoredResult(
                    f"r-{input_id}", len(self.results) + 1, input_id, pipeline, model, model_version, 0.0, body
                )
            return self.results[input_id]

    def reject_input(self, input_id: str, code: str, message: str) -> None:
        with self.lock:
            self.rejected[input_id] = code


def item(i: int | str, data: bytes | None = b"good", **kw: Any) -> InputItem:
    return InputItem(input_id=f"in-{i}", pipeline="p", source="test", data=data, **kw)


def outcome(fut: Future[PipelineOutput]) -> PipelineOutput:
    return fut.result(timeout=T)


def test_results_are_stored_and_futures_resolve_with_body_and_sector() -> None:
    outbox = FakeOutbox()
    registry = CollectorRegistry()
    cfg = PipelineConfig(name="p", kind="inspection", model="m")
    pipe = Pipeline("p", [FakeModel(), FakeModel()], outbox, kind="inspection", sector=make_sector(cfg),
                    metrics=Metrics(registry), queue_size=50)
    pipe.start()
    futs = [pipe.submit(item(i, b"crack" if i % 2 else b"good")) for i in range(20)]
    outs = [outcome(f) for f in futs]
    assert pipe.stop(T)
    assert len(outbox.results) == 20
    assert {o.stored.input_id for o in outs} == {f"in-{i}" for i in range(20)}
    verdicts = [o.sector["verdict"] for o in outs]
    assert verdicts == ["pass", "fail"] * 10
    body = outbox.results["in-1"].body
    assert body["kind"] == "inspection" and body["source"] == "test"
    assert body["sector"]["signal"] == "reject" and body["timings_ms"]["inference"] == 3
    assert registry.get_sample_value("edge_agent_inputs_total", {"pipeline": "p", "outcome": "ok"}) == 20
    assert registry.get_sample_value("edge_agent_stage_seconds_count", {"pipeline": "p", "stage": "total"}) == 20


def test_each_worker_uses_its_own_model() -> None:
    gate = threading.Event()
    models = [FakeModel(gate), FakeModel(gate)]
    pipe = Pipeline("p", models, FakeOutbox(), queue_size=10)
    pipe.start()
    futs = [pipe.submit(item(i)) for i in range(2)]
    assert models[0].started.wait(T) and models[1].started.wait(T)  # both busy at once: one input each
    gate.set()
    wait(futs, timeout=T)
    assert all(len(m.threads) == 1 for m in models)
    assert models[0].threads != models[1].threads
    pipe.stop(T)


def test_bad_input_is_rejected_in_the_outbox_and_the_future() -> None:
    outbox = FakeOutbox()
    pipe = Pipeline("p", [FakeModel()], outbox)
    pipe.start()
    bad = pipe.submit(item(1, b""))
    missing = pipe.submit(item(2, data=None, spool_path="/nonexistent/spool/x.jpg"))
    good = pipe.submit(item(3))
    with pytest.raises(ImageEmptyError):
        bad.result(T)
    with pytest.raises(InputNotFoundError):
        missing.result(T)
    assert outcome(good).stored.input_id == "in-3"
    assert outbox.rejected == {"in-1": "image_empty", "in-2": "input_not_found"}
    pipe.stop(T)


def test_storage_and_unexpected_errors_leave_input_pending() -> None:
    outbox = FakeOutbox(fail_with=StorageFullError("disk full"))
    pipe = Pipeline("p", [FakeModel()], outbox)
    pipe.start()
    with pytest.raises(StorageFullError):
        pipe.submit(item(1)).result(T)
    outbox.fail_with = None
    with pytest.raises(EdgeAgentError, match="internal error"):
        pipe.submit(item(2, b"boom")).result(T)
    assert outbox.rejected == {}  # not the input's fault: a restart retries it
    assert outcome(pipe.submit(item(3))).stored.seq == 1  # the worker survived
    pipe.stop(T)


def test_spool_file_and_decoded_frames_are_accepted(tmp_path: Path) -> None:
    spool = tmp_path / "x.jpg"
    spool.write_bytes(b"good")
    pipe = Pipeline("p", [FakeModel()], FakeOutbox())
    pipe.start()
    pred = outcome(pipe.submit(item(1, data=None, spool_path=str(spool)))).result.predictions[0]
    assert isinstance(pred, Classification) and pred.label == "good"
    frame = Image.from_array(np.zeros((48, 64, 3), np.uint8))
    assert outcome(pipe.submit(item(2, data=None, image=frame))).result.image_size == (64, 48)
    pipe.stop(T)


def test_full_queue_raises_overloaded_at_submit() -> None:
    gate = threading.Event()
    model = FakeModel(gate)
    registry = CollectorRegistry()
    pipe = Pipeline("p", [model], FakeOutbox(), queue_size=2, metrics=Metrics(registry))
    pipe.start()
    first = pipe.submit(item(0))
    assert model.started.wait(T)  # the worker holds input 0; the queue is empty again
    queued = [pipe.submit(item(1)), pipe.submit(item(2))]
    assert pipe.depth == 2
    assert registry.get_sample_value("edge_agent_queue_depth", {"pipeline": "p"}) == 2
    with pytest.raises(OverloadedError) as info:
        pipe.submit(item(3))
    assert info.value.code == "overloaded"
    assert registry.get_sample_value("edge_agent_overloaded_total", {"pipeline": "p"}) == 1
    gate.set()
    for f in [first, *queued]:
        outcome(f)
    pipe.stop(T)


def test_one_failing_sink_does_not_stop_the_others() -> None:
    seen: list[str] = []
    registry = CollectorRegistry()

    def broken(out: PipelineOutput, it: InputItem) -> None:
        raise ValueError("sink down")

    def good(out: PipelineOutput, it: InputItem) -> None:
        seen.append(it.input_id)

    sinks = [("broken", broken), ("good", good)]
    pipe = Pipeline("p", [FakeModel()], FakeOutbox(), metrics=Metrics(registry), sinks=sinks)
    pipe.start()
    for i in range(3):
        outcome(pipe.submit(item(i)))
    pipe.stop(T)
    assert seen == ["in-0", "in-1", "in-2"]
    assert registry.get_sample_value("edge_agent_sink_errors_total", {"pipeline": "p", "sink": "broken"}) == 3


def test_stop_drains_queue_then_refuses_new_inputs() -> None:
    outbox = FakeOutbox()
    pipe = Pipeline("p", [FakeModel()], outbox, queue_size=100)
    pipe.start()
    futs = [pipe.submit(item(i)) for i in range(30)]
    assert pipe.stop(T)
    assert all(f.done() and f.exception() is None for f in futs)
    assert len(outbox.results) == 30
    with pytest.raises(OverloadedError, match="stopping"):
        pipe.submit(item(99))


def test_stop_past_its_timeout_fails_the_rest_without_storing() -> None:
    gate = threading.Event()
    model = FakeModel(gate)
    outbox = FakeOutbox()
    pipe = Pipeline("p", [model], outbox, queue_size=10)
    pipe.start()
    futs = [pipe.submit(item(i)) for i in range(5)]
    assert model.started.wait(T)
    assert pipe.stop(0.05) is False
    gate.set()  # the input in progress finishes, the rest is failed: still pending in the real outbox
    wait(futs, timeout=T)
    assert outcome(futs[0]).stored.input_id == "in-0"
    for f in futs[1:]:
        assert isinstance(f.exception(T), OverloadedError)
    assert list(outbox.results) == ["in-0"]


def test_livestock_sector_tracks_per_source() -> None:
    class Detector(FakeModel):
        def predict_bytes(self, data: bytes) -> Result:
            x = float(data.decode())
            det = Detection("cow", 0.9, 19, (x, 10.0, x + 20.0, 30.0))
            return Result("det", "1", "detection", (det,), (200, 100), Timings())

    cfg = PipelineConfig.model_validate(
        {"name": "herd", "kind": "livestock", "model": "det", "livestock": {"min_hits": 1}}
    )
    pipe = Pipeline("herd", [Detector()], FakeOutbox(), kind="livestock", sector=make_sector(cfg))
    pipe.start()
    outs = [outcome(pipe.submit(item(i, str(10 + i).encode()))) for i in range(5)]
    pipe.stop(T)
    assert [o.sector["tracks"][0]["id"] for o in outs] == [1] * 5
    assert outs[-1].sector["counts"]["unique"] == 1


def test_crop_sector_uses_hints() -> None:
    class Leaf(FakeModel):
        def predict_bytes(self, data: bytes) -> Result:
            preds = (Classification("Apple___Apple_scab", 0.7, 0), Classification("Corn___healthy", 0.3, 1))
            return Result("leaf", "1", "classification", preds, (64, 64), Timings())

    cfg = PipelineConfig(name="crop", kind="crop", model="leaf")
    pipe = Pipeline("crop", [Leaf()], FakeOutbox(), kind="crop", sector=make_sector(cfg))
    pipe.start()
    out = outcome(pipe.submit(item(1, hints={"crop": "apple"})))
    pipe.stop(T)
    assert out.sector["crop"] == "Apple" and out.sector["healthy"] is False


def test_livestock_sector_skips_frames_that_arrive_out_of_order() -> None:
    cfg = PipelineConfig.model_validate({"name": "herd", "kind": "livestock", "model": "det"})
    sector = make_sector(cfg)
    res = Result("det", "1", "detection", (Detection("cow", 0.9, 19, (0.0, 0.0, 10.0, 10.0)),), (100, 100), Timings())

    def frame(n: int) -> InputItem:
        return InputItem(input_id=f"c-{n}", pipeline="herd", source="cam", hints={"frame": str(n)})

    assert "tracks" in sector(res, frame(5))
    assert sector(res, frame(3)) == {"skipped": "out_of_order_frame"}
    assert "tracks" in sector(res, frame(6))
    assert "tracks" in sector(res, InputItem(input_id="photo", pipeline="herd", source="inbox"))


def test_metrics_scrape_never_raises_when_the_outbox_is_gone() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    def broken() -> tuple[int, int, float]:
        raise RuntimeError("closed")

    metrics.bind_outbox(broken)
    metrics.bind_publisher(lambda: {"published": 3, "rejected": 1, "errors": 0, "acked": 2, "state": "degraded"})
    assert registry.get_sample_value("edge_agent_outbox_backlog") == -1
    assert registry.get_sample_value("edge_agent_published_total") == 3
    assert registry.get_sample_value("edge_agent_publish_failures_total", {"reason": "refused"}) == 1
    assert registry.get_sample_value("edge_agent_mqtt_connected") == 0


def test_worker_infers_the_next_input_while_a_result_waits_for_the_disk() -> None:
    disk = threading.Event()

    class SlowDisk(FakeOutbox):
        def add_result(
            self, input_id: str, *, pipeline: str, model: str, model_version: str, body: dict[str, Any]
        ) -> StoredResult:
            assert disk.wait(T)
            return super().add_result(input_id, pipeline=pipeline, model=model, model_version=model_version, body=body)

    model = FakeModel()
    outbox = SlowDisk()
    pipe = Pipeline("p", [model], outbox, queue_size=10, commit_concurrency=4)
    pipe.start()
    futs = [pipe.submit(item(i)) for i in range(3)]
    deadline = threading.Event()
    for _ in range(500):
        if model.calls == 3:
            break
        deadline.wait(0.01)
    assert model.calls == 3  # one worker inferred all three while none was durable yet
    assert not any(f.done() for f in futs) and pipe.in_flight == 3
    disk.set()
    assert [outcome(f).stored.input_id for f in futs] == ["in-0", "in-1", "in-2"]
    assert pipe.stop(T) and pipe.in_flight == 0


def test_urgent_inputs_go_before_everything_queued() -> None:
    gate = threading.Event()
    model = FakeModel(gate)
    done: list[str] = []
    pipe = Pipeline("p", [model], FakeOutbox(), queue_size=10, sinks=[("order", lambda o, i: done.append(i.input_id))])
    pipe.start()
    first = pipe.submit(item(0))
    assert model.started.wait(T)  # the worker holds input 0
    futures = [pipe.submit(item(i)) for i in (1, 2)] + [pipe.submit(item("u", urgent=True))]
    gate.set()
    for fut in [first, *futures]:
        outcome(fut)
    assert done == ["in-0", "in-u", "in-1", "in-2"]
    pipe.stop()
