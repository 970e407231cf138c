"""Post-processing inside the detector graph (``edge_agent.toolchain.detector_heads``, decoder ``detections``).

Given the shipped YOLOX-Nano and NanoDet-m bundles, whose graphs filter, decode and NMS their candidates, when
they run on the annotated COCO demo photos at several score and IoU thresholds fed at run time, then they return
the same detections, in the same order, as the numpy decoders + Python NMS on the raw head outputs of the same graph
with its post-processing taken off (``detach_head``: the exported network, as the import script received it, behind
the uint8 input cast). The cast and normalisation moved into the graph compute what the float export was fed. A graph
without the threshold inputs is refused at load; a graph that is not a YOLOX export is refused by the surgery.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent.bundles.bundle import find_bundle
from edge_agent.bundles.manifest import DetectionsDecoder, Thresholds
from edge_agent.errors import ManifestError
from edge_agent.toolchain import detector_heads
from edge_agent.vision import postprocess as pp
from edge_agent.vision.model import Model
from edge_agent.vision.preprocess import map_box_to_original
from edge_agent.vision.runtime import OrtRuntime

from .conftest import COCO_DEMO, MODELS


@pytest.fixture
def yolox() -> Model:
    model = Model.load(find_bundle("yolox_nano", MODELS))
    assert isinstance(model.manifest.decoder, DetectionsDecoder)
    return model


@pytest.fixture(scope="module")
def bodies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, OrtRuntime]:
    """Each shipped detector graph with its post-processing head detached: it ends at the raw head tensors."""
    out: dict[str, OrtRuntime] = {}
    for name in ("yolox_nano", "nanodet_m_320"):
        graph = onnx.load(str(find_bundle(name, MODELS).onnx_path))
        head = detector_heads.detach_head(graph)
        assert head is not None and head.raw
        path = tmp_path_factory.mktemp("bodies") / f"{name}_body.onnx"
        onnx.save(graph, str(path))
        out[name] = OrtRuntime(path)
    return out


def _reference(name: str, body: OrtRuntime, tensor: np.ndarray, score: float) -> pp.Boxes:
    """The numpy decoder on the raw head outputs, turned back into the export's (1, N, C) layout."""
    raw = [np.transpose(v, (0, 2, 1)) for v in body.run({body.input_names[0]: tensor}).values()]
    if name == "yolox_nano":
        (output,) = raw
        assert output.shape == (1, 3549, 85)
        return pp.decode_yolox(output, (416, 416), (8, 16, 32), score)
    by_size = sorted(raw, key=lambda a: -a.shape[1])  # stride 8, 16, 32 (1600, 400, 100 cells)
    cls = [a for a in by_size if a.shape[2] == 80]
    bins = [a for a in by_size if a.shape[2] == 32]
    assert [a.shape[1] for a in cls] == [a.shape[1] for a in bins] == [1600, 400, 100]
    return pp.decode_nanodet(cls, bins, (320, 320), (8, 16, 32), 7, score)


@pytest.mark.parametrize("name", ["yolox_nano", "nanodet_m_320"])
@pytest.mark.parametrize(("score", "iou"), [(0.3, 0.45), (0.1, 0.3), (0.5, 0.7)])
def test_graph_post_processing_matches_numpy_decode_and_python_nms(
    bodies: dict[str, OrtRuntime], name: str, score: float, iou: float
) -> None:
    model = Model.load(find_bundle(name, MODELS))
    assert isinstance(model.manifest.decoder, DetectionsDecoder)
    original = bodies[name]
    model.set_thresholds(score=score, iou=iou)
    m = model.manifest
    compared = 0
    for path in sorted((COCO_DEMO / "images").glob("*.jpg")):
        image = model.decode(path.read_bytes())
        tensor, meta = model.preprocessor.run(image)
        boxes = _reference(name, original, tensor, score)
        xyxy, scores, cls = boxes.xyxy.tolist(), boxes.scores.tolist(), boxes.class_ids.tolist()
        keep = pp.batched_nms_keep(xyxy, scores, cls, iou, m.thresholds.max_detections)
        got = model.predict(image).detections
        assert [d.class_id for d in got] == [cls[k] for k in keep]
        for d, k in zip(got, keep, strict=True):
            assert abs(d.score - scores[k]) <= 1e-5
            assert np.abs(np.array(d.box) - np.array(map_box_to_original(xyxy[k], meta))).max() <= 1e-3
        compared += len(got)
    assert compared >= 10


@pytest.mark.parametrize(
    ("scale", "mean", "std"),
    [
        (1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # YOLOX: 0..255 floats
        (1.0, (103.53, 116.28, 123.675), (57.375, 57.12, 58.395)),  # NanoDet-m
        (1.0 / 255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet-style
    ],
)
def test_uint8_input_cast_computes_what_the_float_export_was_fed(
    tmp_path: Path, scale: float, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> None:
    shape = [1, 3, 4, 5]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "float.onnx"))
    cast = onnx.load(str(tmp_path / "float.onnx"))
    detector_heads.cast_uint8_input(cast, "x", scale, mean, std)
    onnx.save(cast, str(tmp_path / "uint8.onnx"))
    pixels = np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)
    m, s = np.array(mean, np.float32).reshape(1, 3, 1, 1), np.array(std, np.float32).reshape(1, 3, 1, 1)
    want = OrtRuntime(tmp_path / "float.onnx").run({"x": (pixels.astype(np.float32) * np.float32(scale) - m) / s})["y"]
    got = OrtRuntime(tmp_path / "uint8.onnx").run({"x": pixels})["y"]
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


def test_max_detections_is_fed_to_the_graph(yolox: Model) -> None:
    capped = yolox.manifest.model_copy(update={"thresholds": Thresholds(score=0.1, iou=0.45, max_detections=2)})
    model = Model(capped, yolox.runtime)
    cows = (COCO_DEMO / "images" / "000000573455.jpg").read_bytes()
    assert len(model.predict_bytes(cows).detections) == 2
    assert len(yolox.predict_bytes(cows).detections) > 2


def _identity_detections_graph(path: Path) -> None:
    """A stand-in graph with the three detection outputs but no threshold inputs."""
    nodes = [helper.make_node("Identity", ["images"], ["boxes"]),
             helper.make_node("Identity", ["images"], ["scores"]),
             helper.make_node("Identity", ["images"], ["class_ids"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("images", TensorProto.UINT8, [1, 3, 416, 416])],
        [helper.make_tensor_value_info(n, TensorProto.UINT8, [1, 3, 416, 416])
         for n in ("boxes", "scores", "class_ids")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_a_detections_graph_without_threshold_inputs_is_refused(yolox: Model, tmp_path: Path) -> None:
    _identity_detections_graph(tmp_path / "g.onnx")
    with pytest.raises(ManifestError, match=r"inputs \['score_threshold', 'iou_threshold', 'max_detections'\]"):
        Model(yolox.manifest, OrtRuntime(tmp_path / "g.onnx"))


def test_surgery_refuses_a_graph_that_is_not_a_yolox_export(tmp_path: Path) -> None:
    _identity_detections_graph(tmp_path / "g.onnx")
    model = onnx.load(str(tmp_path / "g.onnx"))
    with pytest.raises(ManifestError, match=r"not the .* Transpose of a YOLOX head"):
        detector_heads.add_yolox_postprocess(model, (416, 416), (8, 16, 32), "boxes")
    with pytest.raises(ManifestError, match="not float32"):
        detector_heads.cast_uint8_input(model, "images")
