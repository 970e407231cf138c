"""The shipped COCO detectors on the annotated COCO demo photos.

Given the real bundles, when they run on the five demo photos, then they find at least 70% of the
annotated cows and horses at IoU >= 0.5, and their decoders agree with an independent
reference implementation on the real raw outputs (1 px, 1e-4).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from edge_agent.bundles.bundle import find_bundle
from edge_agent.bundles.manifest import DetectionsDecoder, NanodetDecoder, YoloxDecoder
from edge_agent.toolchain import detector_heads
from edge_agent.vision.model import Model
from edge_agent.vision.postprocess import box_iou
from edge_agent.vision.preprocess import map_boxes_to_original
from edge_agent.vision.runtime import OrtRuntime, RuntimeOptions

from .conftest import COCO_DEMO, MODELS
from .test_postprocess import _ref_nanodet, _ref_yolox

DETECTORS = ["yolox_nano", "nanodet_m_320", "nanodet_m_320_int8"]  # the INT8 twin: scripts/quantize_detectors.py


@pytest.fixture(scope="module")
def coco() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((COCO_DEMO / "annotations.json").read_text())
    return doc


@pytest.fixture(scope="module", params=DETECTORS)
def detector(request: pytest.FixtureRequest) -> Model:
    m = Model.load(find_bundle(request.param, MODELS), RuntimeOptions(intra_op_threads=2))
    m.warmup(1)
    return m


def test_detectors_find_most_cows_and_horses(detector: Model, coco: dict[str, Any]) -> None:
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    total = found = 0
    for img in coco["images"]:
        result = detector.predict_bytes((COCO_DEMO / "images" / img["file_name"]).read_bytes())
        assert result.image_size == (img["width"], img["height"])
        for ann in coco["annotations"]:
            name = cats[ann["category_id"]]
            if ann["image_id"] != img["id"] or name not in ("cow", "horse"):
                continue
            total += 1
            x, y, w, h = ann["bbox"]
            boxes = [d.box for d in result.detections if d.label == name]
            if (
                boxes
                and box_iou(np.array([[x, y, x + w, y + h]], np.float32), np.array(boxes, np.float32)).max() >= 0.5
            ):
                found += 1
    assert total == 24
    assert found / total >= 0.70, f"{detector.name}: recall {found}/{total}"
    if detector.name.endswith("_int8"):  # the quantization gate's rule: at most one fewer than FP32 (18/24)
        assert found >= 17, f"{detector.name}: recall {found}/{total}"


def _raw_head_outputs(detector: Model, tensor: np.ndarray, tmp: Path) -> tuple[dict[str, np.ndarray], Any]:
    """Run the bundle's graph with its post-processing detached; raw tensors in the exports' (1, N, C) layout."""
    model = onnx.load(str(MODELS / detector.name / detector.manifest.model_file))
    head = detector_heads.detach_head(model)
    assert head is not None
    onnx.save(model, str(tmp / "body.onnx"))
    outs = OrtRuntime(tmp / "body.onnx").run({detector.manifest.input.name: tensor})
    raw = [np.ascontiguousarray(outs[r].transpose(0, 2, 1)) for r in head.raw]
    if len(raw) == 1:  # YOLOX: (1, 5 + C, N)
        return {"output": raw[0]}, YoloxDecoder(type="yolox", output="output")
    names = [f"{kind}_pred_stride_{s}" for kind in ("cls", "dis") for s in (8, 16, 32)]
    return dict(zip(names, raw, strict=True)), NanodetDecoder(
        type="nanodet", cls_outputs=tuple(names[:3]), reg_outputs=tuple(names[3:]))


def test_decoder_matches_reference_on_real_outputs(detector: Model, tmp_path: Path) -> None:
    data = (COCO_DEMO / "images" / "000000573455.jpg").read_bytes()
    image = detector.decode(data)
    tensor, meta = detector.preprocessor.run(image)
    dec = detector.manifest.decoder
    if isinstance(dec, DetectionsDecoder):
        # post-processing in the graph: the reference decodes the raw head tensors of the same graph without it
        raw, dec = _raw_head_outputs(detector, tensor, tmp_path)
    else:
        raw = detector.runtime.run({detector.manifest.input.name: tensor})
    thr = detector.manifest.thresholds.score
    size = detector.manifest.input.width
    if isinstance(dec, YoloxDecoder):
        ref = _ref_yolox(raw[dec.output], size, dec.strides, thr)
    else:
        assert isinstance(dec, NanodetDecoder)
        ref = _ref_nanodet(
            [raw[n] for n in dec.cls_outputs], [raw[n] for n in dec.reg_outputs], size, dec.strides, dec.reg_max, thr
        )
    ref_boxes = np.array([r[:4] for r in ref], np.float32)
    ref_scores = np.array([r[4] for r in ref], np.float32)
    ref_cls = np.array([r[5] for r in ref])
    # independent class-aware greedy NMS, loop style
    keep: list[int] = []
    for i in np.argsort(-ref_scores, kind="stable"):
        same = [k for k in keep if ref_cls[k] == ref_cls[i]]
        if not same or box_iou(ref_boxes[i : i + 1], ref_boxes[same]).max() <= detector.manifest.thresholds.iou:
            keep.append(int(i))
    ref_mapped = map_boxes_to_original(ref_boxes[keep], meta)
    result = detector.predict(image)
    got = sorted(((d.score, d.box, d.class_id) for d in result.detections), key=lambda t: -t[0])
    assert len(got) == len(keep) >= 10
    for (score, box, cls), k, rb in zip(got, keep, ref_mapped, strict=True):
        assert abs(score - float(ref_scores[k])) <= 1e-4
        assert cls == int(ref_cls[k])
        assert np.abs(np.array(box) - rb).max() <= 1.0


def test_reduced_decode_gives_the_same_detections_as_full_decode(detector: Model) -> None:
    """A photo upscaled 4x is decoded at 1/4 and gives boxes 4x larger, within a few pixels."""
    import cv2

    small = cv2.imread(str(COCO_DEMO / "images" / "000000214753.jpg"))
    assert small is not None
    big = cv2.resize(small, (small.shape[1] * 4, small.shape[0] * 4), interpolation=cv2.INTER_CUBIC)
    ok, enc = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    r_small = detector.predict_bytes((COCO_DEMO / "images" / "000000214753.jpg").read_bytes())
    r_big = detector.predict_bytes(enc.tobytes())
    assert r_big.image_size == (small.shape[1] * 4, small.shape[0] * 4)
    horses_small = sorted(d.box[0] for d in r_small.detections if d.label == "horse")
    horses_big = sorted(d.box[0] / 4 for d in r_big.detections if d.label == "horse")
    assert len(horses_small) == len(horses_big) == 2
    assert np.abs(np.array(horses_small) - np.array(horses_big)).max() < 6
