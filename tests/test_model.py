"""Model = manifest + runtime + pre/post-processing, on tiny ONNX models built at test time."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_agent.bundles.bundle import find_bundle, list_bundle_dirs, load_bundle
from edge_agent.bundles.manifest import parse_manifest
from edge_agent.errors import ChecksumError, ManifestError, ModelNotFoundError
from edge_agent.types import AnomalyScore, Classification, Image
from edge_agent.vision.model import Model
from edge_agent.vision.runtime import FakeRuntime, OrtRuntime, RuntimeOptions, select_providers

from .support.onnx_models import classifier_manifest, tiny_classifier, write_bundle


@pytest.fixture()
def tiny_bundle(tmp_path: Path) -> Path:
    d = tmp_path / "tiny_cls"
    d.mkdir()
    onnx_path = tiny_classifier(d / "tiny.onnx")
    return write_bundle(d, classifier_manifest(onnx_path, ["Apple___healthy", "Apple___scab", "Corn___rust"]))


def test_classifier_returns_top_k_with_timings(tiny_bundle: Path) -> None:
    model = Model.load(load_bundle(tiny_bundle), RuntimeOptions(intra_op_threads=1))
    img = Image.from_array(np.full((20, 30, 3), 140, np.uint8), "RGB")
    result = model.predict(img)
    assert result.task == "classification" and result.model == "tiny_cls"
    assert len(result.predictions) == 3
    assert all(isinstance(p, Classification) for p in result.predictions)
    scores = [p.score for p in result.predictions]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5
    assert result.timings.inference_ms > 0 and result.timings.total_ms >= result.timings.inference_ms
    assert not result.rejected
    doc = result.to_dict()
    assert set(doc["timings_ms"]) == {"decode", "preprocess", "inference", "postprocess", "total"}


def test_out_of_domain_input_is_rejected(tiny_bundle: Path) -> None:
    model = Model.load(load_bundle(tiny_bundle))
    bright = Image.from_array(np.full((8, 8, 3), 255, np.uint8), "RGB")  # |(255-127)/128| = 1.0 > 0.9
    assert model.predict(bright).rejected


def test_checksum_mismatch_is_refused(tiny_bundle: Path) -> None:
    onnx_path = tiny_bundle / "tiny.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    with pytest.raises(ChecksumError, match="sha256"):
        load_bundle(tiny_bundle)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"task": "detection"}, "(root)"),
        ({"schema_version": "one"}, "schema_version"),
        ({"schema_version": 99}, "schema_version"),
        ({"sha256": "xyz"}, "sha256"),
        ({"labels": []}, "labels"),
        ({"model_file": "../../etc/passwd"}, "model_file"),
        ({"colour": "RGB"}, "colour"),
        ({"input": {"name": "input", "width": -1, "height": 8, "resize": {"mode": "stretch"}}}, "input.width"),
        ({"decoder": {"type": "magic"}}, "decoder"),
    ],
)
def test_malformed_manifest_names_file_and_field(tiny_bundle: Path, patch: dict[str, object], field: str) -> None:
    doc = json.loads((tiny_bundle / "manifest.json").read_text())
    doc.update(patch)
    (tiny_bundle / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError) as info:
        load_bundle(tiny_bundle)
    assert "manifest.json" in info.value.message and field in info.value.message


def test_manifest_that_is_not_json() -> None:
    with pytest.raises(ManifestError, match=r"m\.json: not valid JSON"):
        parse_manifest(b"{nope", source="m.json")


def test_manifest_naming_a_missing_output_is_refused(tiny_bundle: Path) -> None:
    doc = json.loads((tiny_bundle / "manifest.json").read_text())
    doc["decoder"]["output"] = "probs"
    (tiny_bundle / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="probs"):
        Model.load(load_bundle(tiny_bundle))


def test_find_bundle_by_folder_or_name_and_unknown(tiny_bundle: Path) -> None:
    root = tiny_bundle.parent
    assert find_bundle("tiny_cls", root).name == "tiny_cls"
    assert list_bundle_dirs(root) == [tiny_bundle]
    with pytest.raises(ModelNotFoundError, match="known: tiny_cls"):
        find_bundle("nope", root)


def test_anomaly_decoder_with_fake_runtime(tiny_bundle: Path) -> None:
    doc = json.loads((tiny_bundle / "manifest.json").read_text())
    doc.update(
        task="anomaly",
        decoder={"type": "anomaly", "score_output": "score", "map_output": "map"},
        thresholds={"anomaly": 0.5},
        labels=["good", "anomalous"],
    )
    manifest = parse_manifest(json.dumps(doc))

    def fn(feeds: object) -> dict[str, np.ndarray]:
        x = feeds["input"]  # type: ignore[index]
        return {
            "score": np.array([[float(np.abs(x).mean())]], np.float32),
            "map": np.abs(x).mean(axis=1, keepdims=True),
        }

    model = Model(manifest, FakeRuntime(("input",), ("score", "map"), fn))
    good = model.predict(Image.from_array(np.full((8, 8, 3), 127, np.uint8), "RGB")).predictions[0]
    bad = model.predict(Image.from_array(np.full((8, 8, 3), 255, np.uint8), "RGB")).predictions[0]
    assert isinstance(good, AnomalyScore) and isinstance(bad, AnomalyScore)
    assert not good.is_anomalous and bad.is_anomalous
    assert bad.heatmap is not None and bad.heatmap.shape == (8, 8)


def test_predict_is_thread_safe(tiny_bundle: Path) -> None:
    model = Model.load(load_bundle(tiny_bundle), RuntimeOptions(intra_op_threads=1))
    images = [Image.from_array(np.full((16, 16, 3), v, np.uint8), "RGB") for v in (0, 60, 120, 200)]
    expected = [model.predict(i).predictions[0].label for i in images]
    errors: list[str] = []

    def work() -> None:
        for _ in range(50):
            for img, label in zip(images, expected, strict=True):
                if model.predict(img).predictions[0].label != label:
                    errors.append(label)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_provider_preference_falls_back_to_cpu() -> None:
    chosen, skipped = select_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"]
    assert skipped == ["CUDAExecutionProvider not available in this onnxruntime build"]
    chosen, _ = select_providers(["TensorrtExecutionProvider"], ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    assert chosen == ["TensorrtExecutionProvider", "CPUExecutionProvider"]


def test_ort_runtime_reports_a_broken_file(tmp_path: Path) -> None:
    from edge_agent.errors import RuntimeBackendError

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(RuntimeBackendError, match=r"bad\.onnx"):
        OrtRuntime(bad)
