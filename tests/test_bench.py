"""Smoke tests of the benchmark code on a tiny model: report structure, never timings."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from benchmarks import report
from edge_agent.bundles.bundle import Bundle, load_bundle
from edge_agent.bundles.manifest import InputSpec
from edge_agent.cli import app
from edge_agent.toolchain import bench
from edge_agent.types import Result
from tests.support.onnx_models import classifier_manifest, tiny_classifier, write_bundle

TINY = bench.Budget(seconds=0.02, min_reps=4, max_reps=8, warmup=1)
SIZES = {"1080p": (96, 64), "12mp": (200, 150)}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    fp32 = root / "tiny_cls"
    fp32.mkdir()
    onnx_path = tiny_classifier(fp32 / "model.onnx", n_classes=3, size=16)
    write_bundle(fp32, classifier_manifest(onnx_path, ["a", "b", "c"], size=16))
    int8 = root / "tiny_cls_int8"  # same graph, named as an INT8 twin: exercises the pairing
    int8.mkdir()
    shutil.copy(onnx_path, int8 / "model.onnx")
    write_bundle(int8, classifier_manifest(int8 / "model.onnx", ["a", "b", "c"], size=16, name="tiny_cls_int8"))
    return root


@pytest.fixture(scope="module")
def inputs() -> bench.BenchInputs:
    return bench.make_inputs(bench.synthetic_sources(count=2, size=32), stream_len=2, sizes=SIZES)


def _bundles(models_dir: Path) -> list[Bundle]:
    return [load_bundle(models_dir / "tiny_cls"), load_bundle(models_dir / "tiny_cls_int8")]


def test_stats_percentiles_and_empty() -> None:
    s = bench.Stats.of([float(v) for v in range(1, 102)])
    assert (s.n, s.p50, s.min) == (101, 51.0, 1.0)
    assert s.p95 == pytest.approx(96.0)
    assert bench.Stats.of([]).n == 0


def test_sampling_interleaves_rounds_and_honours_min_reps() -> None:
    order: list[str] = []

    def step_a() -> bench.Stages:
        order.append("a")
        return {"x": 1.0}

    def step_b() -> None:
        order.append("b")

    steps: dict[str, bench.Step] = {"a": step_a, "b": step_b}
    series = bench.sample_interleaved(steps, bench.Budget(seconds=0.0, min_reps=4, max_reps=4, warmup=1))
    assert len(series["a"].total) == len(series["b"].total) == len(series["a"].cpu) == 4
    assert series["a"].stages["x"] == [1.0] * 4 and series["b"].stages == {}
    timed = order[2:]  # after one warm-up each
    assert timed == ["a", "b", "b", "a"] * 2  # call by call, the order reversed every round
    assert set(series["a"].to_dict()) == {"total", "cpu", "stages"}


def test_overlapped_sink_keeps_order_and_one_write_in_flight() -> None:
    import threading

    seen: list[str] = []
    active = [0, 0]  # now, max
    lock = threading.Lock()

    def slow_sink(input_id: str, result: Any, doc: dict[str, Any]) -> None:
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        seen.append(input_id)
        with lock:
            active[0] -= 1

    sink = bench.OverlappedSink(slow_sink)
    for i in range(20):
        sink(f"i{i}", None, {})  # type: ignore[arg-type]
    sink.close()
    assert seen == [f"i{i}" for i in range(20)] and active[1] == 1


def test_resize_size_follows_the_preprocessing_geometry() -> None:
    spec = InputSpec.model_validate({"name": "x", "width": 320, "height": 320, "resize": {"mode": "letterbox"}})
    assert bench.resize_size(spec, (1920, 1080)) == (320, 180)
    stretch = spec.model_copy(update={"resize": spec.resize.model_copy(update={"mode": "stretch"})})
    assert bench.resize_size(stretch, (1920, 1080)) == (320, 320)
    crop = spec.model_copy(update={"resize": spec.resize.model_copy(update={"mode": "center_crop"})})
    assert bench.resize_size(crop, (1920, 1080)) == (650, 366)  # 320 is 0.875 of the short side (366)


def test_reduction_matches_decoder_rule() -> None:
    assert bench.reduction_for((4000, 3000), (416, 312)) == 8
    assert bench.reduction_for((1920, 1080), (416, 234)) == 4
    assert bench.reduction_for((640, 480), (416, 312)) == 1


def test_bench_model_report_structure(models_dir: Path, inputs: bench.BenchInputs) -> None:
    written: list[tuple[str, Result]] = []
    cfg = bench.BenchConfig(budget=TINY, pipelined_workers=2, pipelined_seconds=0.2)
    doc = bench.bench_model(_bundles(models_dir)[0], inputs, cfg, sink=lambda i, r, d: written.append((i, r)))
    assert doc["name"] == "tiny_cls" and doc["provider"] == "CPUExecutionProvider" and not doc["quantized"]
    assert set(doc["frame"]) == {"floor_run", "loop", "naive", "loop_write_waited", "floor_run_for_waited",
                                 "run_then_resize"}
    assert set(doc["frame"]["run_then_resize"]["stages"]) == {"inference", "resize"}
    loop = doc["frame"]["loop"]
    assert set(loop["stages"]) == {"decode", "preprocess", "inference", "postprocess", "encode", "outbox"}
    assert loop["total"]["n"] >= TINY.min_reps and loop["total"]["p50"] > 0
    for kind in ("1080p", "12mp"):
        assert set(doc[kind]) == {"floor_decode", "floor_run", "loop", "naive", "reduction", "loop_write_waited",
                                   "floor_decode_for_waited", "floor_run_for_waited"}
        assert doc[kind]["loop"]["stages"]["decode"]["p50"] > 0
        assert doc[kind]["naive"]["stages"]["inference"]["n"] == doc[kind]["naive"]["total"]["n"]
    assert doc["12mp"]["reduction"] == 8  # 200x150 -> 16x16 needs 1/8 only
    assert written and len({i for i, _ in written}) == len(written)  # every result written once, unique ids
    pl = doc["pipelined"]
    assert pl["workers"] == 2 and pl["frames"] > 0 and pl["fps"] > 0 and pl["bound_fps"] > 0
    assert pl["ratio"] == pytest.approx(pl["fps"] / pl["bound_fps"], rel=1e-3)
    orjson.dumps(doc)  # JSON-ready


def test_int8_pairing_reads_quantize_metadata(models_dir: Path, tmp_path: Path) -> None:
    fp32 = load_bundle(models_dir / "tiny_cls")
    q = tmp_path / "anything"
    q.mkdir()
    shutil.copy(fp32.onnx_path, q / "model.onnx")
    meta = {"quantization": {"method": "QDQ, QUInt8 activations, QInt8 weights", "from": "tiny_cls"}}
    write_bundle(q, classifier_manifest(q / "model.onnx", ["a", "b", "c"], size=16, name="leafy", metadata=meta))
    int8 = load_bundle(q)
    assert bench.is_quantized(int8) and not bench.is_quantized(fp32)
    assert bench.int8_pairs([int8, fp32]) == [(fp32, int8)]


def test_int8_pairing_and_comparison(models_dir: Path, inputs: bench.BenchInputs) -> None:
    fp32, int8 = _bundles(models_dir)
    assert bench.int8_pairs([fp32, int8]) == [(fp32, int8)]
    assert bench.int8_pairs([fp32]) == []
    res = bench.bench_int8(fp32, int8, inputs, bench.BenchConfig(budget=TINY))
    assert res["latency"]["run_ratio"] > 0 and res["1thread"]["threads"] == 1
    assert {"fp32_run", "int8_run", "fp32_loop", "int8_loop"} <= set(res["latency"])


def test_probe_reports_memory_and_cold_start(models_dir: Path, inputs: bench.BenchInputs, tmp_path: Path) -> None:
    photo = tmp_path / "p.jpg"
    photo.write_bytes(inputs.photos["1080p"])
    doc = bench.probe_process([str(models_dir / "tiny_cls")], str(photo))
    assert doc["models"] == ["tiny_cls"] and doc["first_result"] == "tiny_cls"
    assert doc["peak_rss_mb"] >= doc["rss_after_import_mb"] > 10
    assert 0 < doc["cold_start_s"] <= doc["process_wall_s"]


def test_report_renders_targets_markdown_and_chart(
    models_dir: Path, inputs: bench.BenchInputs, tmp_path: Path
) -> None:
    cfg = bench.BenchConfig(budget=TINY, pipelined_workers=1, pipelined_seconds=0.1)
    fp32, int8 = _bundles(models_dir)
    doc: dict[str, Any] = {
        "mode": "test", "started_at": "now", "machine": bench.machine_info(),
        "settings": {"latency_session": "default"},
        "models": [bench.bench_model(fp32, inputs, cfg)],
        "int8_vs_fp32": [bench.bench_int8(fp32, int8, inputs, cfg)],
        "memory": {"three_models": {"models": ["tiny_cls"], "peak_rss_mb": 100.0, "rss_after_import_mb": 90.0,
                                    "cold_start_s": 1.0, "import_s": 0.5, "load_s": 0.1, "first_predict_s": 0.1}},
    }
    names = [t["target"] for t in report.targets(doc)]
    assert "frame loop/floor tiny_cls" in names and "12mp naive/loop tiny_cls" in names
    assert "pipelined/CPU bound tiny_cls" in names and "agent peak RSS, 3 models" in names
    assert any(n.startswith("INT8/FP32") for n in names)
    md = report.markdown(doc)
    assert "| tiny_cls |" in md and "## Targets (issue 6)" in md
    png = tmp_path / "chart.png"
    report.chart(doc, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_json(models_dir: Path) -> None:
    res = CliRunner().invoke(
        app, ["bench", "--models-dir", str(models_dir), "-m", "tiny_cls", "--workers", "-1", "--no-naive", "--json"]
    )
    assert res.exit_code == 0, res.output
    doc = orjson.loads(res.stdout.strip().splitlines()[-1])
    assert [m["name"] for m in doc["models"]] == ["tiny_cls"]
    assert doc["summary"][0]["frame_ratio"] > 0 and "pipelined" not in doc["models"][0]


def test_cli_bench_unknown_model_is_one_line_error(models_dir: Path) -> None:
    res = CliRunner().invoke(app, ["bench", "--models-dir", str(models_dir), "-m", "nope"])
    assert res.exit_code == 2
    assert "model_not_found" in res.output or "unknown model" in res.output
