"""Post-processing inside the detector graph (``edge_agent.detector_heads``, decoder ``detections``).

Given the shipped YOLOX-Nano bundle, whose graph filters, decodes and NMS-es its candidates, when it runs on the
annotated COCO demo photos at several score and IoU thresholds fed at run time, then it returns the same
detections, in the same order, as the numpy decoder + Python NMS on the original export's raw output. A graph
without the threshold inputs is refused at load; a graph that is not a YOLOX export is refused by the surgery.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edge_agent import detector_heads
from edge_agent import postprocess as pp
from edge_agent.bundle import find_bundle
from edge_agent.errors import ManifestError
from edge_agent.manifest import DetectionsDecoder, Thresholds
from edge_agent.model import Model
from edge_agent.preprocess import map_box_to_original
from edge_agent.runtime import OrtRuntime

from .conftest import COCO_DEMO, MODELS, SHARED

ORIGINAL = SHARED / "models" / "yolox_nano" / "yolox_nano.onnx"


@pytest.fixture
def yolox() -> Model:
    model = Model.load(find_bundle("yolox_nano", MODELS))
    assert isinstance(model.manifest.decoder, DetectionsDecoder)
    return model


@pytest.mark.parametrize(("score", "iou"), [(0.3, 0.45), (0.1, 0.3), (0.5, 0.7)])
def test_graph_post_processing_matches_numpy_decode_and_python_nms(yolox: Model, score: float, iou: float) -> None:
    original = OrtRuntime(ORIGINAL)
    yolox.set_thresholds(score=score, iou=iou)
    m = yolox.manifest
    compared = 0
    for path in sorted((COCO_DEMO / "images").glob("*.jpg")):
        image = yolox.decode(path.read_bytes())
        tensor, meta = yolox.preprocessor.run(image)
        raw = original.run({"images": tensor.astype(np.float32)})["output"]
        boxes = pp.decode_yolox(raw, (416, 416), (8, 16, 32), score)
        xyxy, scores, cls = boxes.xyxy.tolist(), boxes.scores.tolist(), boxes.class_ids.tolist()
        keep = pp.batched_nms_keep(xyxy, scores, cls, iou, m.thresholds.max_detections)
        got = yolox.predict(image).detections
        assert [d.class_id for d in got] == [cls[k] for k in keep]
        for d, k in zip(got, keep, strict=True):
            assert abs(d.score - scores[k]) <= 1e-5
            assert np.abs(np.array(d.box) - np.array(map_box_to_original(xyxy[k], meta))).max() <= 1e-3
        compared += len(got)
    assert compared >= 10


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
