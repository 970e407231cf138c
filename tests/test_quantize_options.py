"""toolchain.quantize: the per-model options (manifest ``metadata.quantize``) and the graph fixes before QDQ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_agent.bundles.bundle import Bundle, load_bundle
from edge_agent.errors import ManifestError
from edge_agent.toolchain.quantize import (
    QuantizeOptions,
    drop_initializer_inputs,
    nodes_kept_float,
    prepare_for_quantization,
    quantize_onnx,
    tail_nodes,
)
from tests.support.color_models import write_bundle, write_images

RNG = np.random.default_rng(0)


def _w(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * 0.2).astype(np.float32), name)


def _resize_model(path: Path) -> Path:
    """pixels uint8 (1,3,16,16) -> Conv -> stride-2 Conv -> Resize x2 (roi = empty initializer) -> Add -> Conv;
    opset 11, shaped like NanoDet's FPN (upsample + add)."""
    nodes = [
        helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "wd", "bd"], ["d"], name="down", strides=[2, 2]),
        helper.make_node("Resize", ["d", "roi", "scales"], ["up"], name="up", mode="linear",
                         coordinate_transformation_mode="pytorch_half_pixel"),
        helper.make_node("Add", ["c1", "up"], ["s"], name="add"),
        helper.make_node("Conv", ["s", "w2", "b2"], ["logits4"], name="conv2"),
        helper.make_node("ReduceMean", ["logits4"], ["logits"], name="pool", axes=[2, 3], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "resize",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
        [_w("w1", 8, 3, 3, 3), _w("b1", 8), _w("wd", 8, 8, 1, 1), _w("bd", 8), _w("w2", 3, 8, 1, 1), _w("b2", 3),
         numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
         numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_prepare_upgrades_opset_and_drops_empty_resize_roi(tmp_path: Path) -> None:
    model = onnx.load(str(_resize_model(tmp_path / "m.onnx")))
    changes = prepare_for_quantization(model)
    assert any("opset 11 -> 13" in c for c in changes) and any("roi" in c for c in changes)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 13
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    assert resize.input[1] == ""
    assert prepare_for_quantization(model) == []  # idempotent


def test_weights_listed_as_inputs_are_dropped_and_outputs_unchanged(tmp_path: Path) -> None:
    """Old exports list weights as graph inputs, which keeps onnxruntime from folding and fusing them."""
    path = _resize_model(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    model.graph.input.extend(
        helper.make_tensor_value_info(i.name, TensorProto.FLOAT, list(i.dims)) for i in model.graph.initializer
    )
    onnx.save(model, str(path))
    x = np.random.default_rng(0).integers(0, 255, (1, 3, 16, 16)).astype(np.uint8)
    before = _session(path).run(None, {"pixels": x})[0]
    assert drop_initializer_inputs(path) == 8  # w1 b1 wd bd w2 b2 roi scales
    after_model = onnx.load(str(path))
    assert [i.name for i in after_model.graph.input] == ["pixels"]
    np.testing.assert_array_equal(_session(path).run(None, {"pixels": x})[0], before)
    assert drop_initializer_inputs(path) == 0  # idempotent: nothing rewritten
    listed = onnx.load(str(path))
    listed.graph.input.extend([helper.make_tensor_value_info("w1", TensorProto.FLOAT, [8, 3, 3, 3])])
    assert any("1 weights listed as graph inputs" in c for c in prepare_for_quantization(listed))
    assert [i.name for i in listed.graph.input] == ["pixels"]


def test_quantized_resize_model_runs_with_all_optimisations(tmp_path: Path) -> None:
    """A QDQ model with an upsampling Resize (roi dropped by the preparation) runs at ORT_ENABLE_ALL and stays
    close to FP32. (This small graph does not trigger onnxruntime's empty-roi failure; the NanoDet test does.)"""
    base = load_bundle(write_bundle(tmp_path / "colors"))
    onnx_path = _resize_model(tmp_path / "colors" / "resize.onnx")
    bundle = Bundle(directory=base.directory, manifest=base.manifest.model_copy(update={"model_file": onnx_path.name}))
    images = sorted(write_images(tmp_path / "data", per_class=2).rglob("*.png"))
    out = tmp_path / "int8.onnx"
    quantize_onnx(bundle, images, out)
    q = onnx.load(str(out))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in q.graph.node}
    feeds = {"pixels": RNG.integers(0, 255, (1, 3, 16, 16), dtype=np.uint8)}
    got = _session(out).run(None, feeds)[0]
    want = _session(onnx_path).run(None, feeds)[0]
    assert got.shape == want.shape == (1, 3)
    assert np.abs(got - want).max() < 0.1 * (np.abs(want).max() + 1e-3) + 0.05


def _graph(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], outputs: list[str]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_kept_float_covers_fused_names_and_depthwise_convs() -> None:
    model = _graph(
        [
            helper.make_node("Conv", ["x", "dw"], ["a"], name="dw_conv", group=4),
            helper.make_node("Conv", ["a", "pw"], ["b"], name="pw_conv"),
            helper.make_node("Gemm", ["f", "bank", "c"], ["d"], name="pc_cross/MatMulAddFusion"),
            helper.make_node("Gemm", ["f", "bank", "c"], ["e"], name="head/MatMulAddFusion"),
            helper.make_node("Relu", ["e"], ["g"], name="pc_cross_relu"),
        ],
        [_w("dw", 4, 1, 3, 3), _w("pw", 4, 4, 1, 1), _w("bank", 4, 4)],
        ["b", "d", "g"],
    )
    assert nodes_kept_float(model, QuantizeOptions(nodes_to_exclude=("pc_cross",))) == ["pc_cross/MatMulAddFusion"]
    both = nodes_kept_float(model, QuantizeOptions(nodes_to_exclude=("pc_cross",), exclude_depthwise=True))
    assert both == ["dw_conv", "pc_cross/MatMulAddFusion"]


def test_kept_float_covers_fused_names_that_hold_a_slash() -> None:
    """Multi-scale anomaly graphs name nodes per scale (``s128/pc_cross``); their fusions stay float too."""
    model = _graph(
        [
            helper.make_node("Gemm", ["f", "bank", "c"], ["d"], name="s128/pc_cross/MatMulAddFusion"),
            helper.make_node("Gemm", ["f", "bank", "c"], ["e"], name="s128/head/MatMulAddFusion"),
        ],
        [_w("bank", 4, 4)],
        ["d", "e"],
    )
    kept = nodes_kept_float(model, QuantizeOptions(nodes_to_exclude=("s128/pc_cross",)))
    assert kept == ["s128/pc_cross/MatMulAddFusion"]


def test_tail_is_everything_after_the_last_convolutions() -> None:
    model = _graph(
        [
            helper.make_node("Conv", ["x", "w"], ["trunk"], name="trunk"),
            helper.make_node("Conv", ["trunk", "w"], ["box"], name="box_conv"),
            helper.make_node("Conv", ["trunk", "w"], ["cls"], name="cls_conv"),
            helper.make_node("Sigmoid", ["cls"], ["prob"], name="sig"),
            helper.make_node("Concat", ["box", "prob"], ["cat"], name="cat", axis=1),
            helper.make_node("Transpose", ["cat"], ["out"], name="tr", perm=[0, 2, 3, 1]),
        ],
        [_w("w", 4, 4, 1, 1)],
        ["out"],
    )
    assert tail_nodes(model) == {"sig", "cat", "tr"}
    assert tail_nodes(model, with_last_convs=True) == {"sig", "cat", "tr", "box_conv", "cls_conv"}
    opts = QuantizeOptions(float_tail=True)
    assert sorted(nodes_kept_float(model, opts)) == ["cat", "sig", "tr"]


def test_options_from_manifest(tmp_path: Path) -> None:
    def opts(quantize: object) -> QuantizeOptions:
        d = write_bundle(tmp_path / f"b{len(list(tmp_path.iterdir()))}", metadata={"quantize": quantize})
        return QuantizeOptions.from_manifest(load_bundle(d).manifest)

    assert opts({}) == QuantizeOptions()
    got = opts({"nodes_to_exclude": ["a"], "op_types": ["Conv"], "exclude_depthwise": True, "float_tail": True,
                "calibration": "minmax", "percentile": 99.9})
    assert got.nodes_to_exclude == ("a",) and got.op_types == ("Conv",) and got.exclude_depthwise and got.float_tail
    assert got.calibration == "minmax" and got.percentile == 99.9 and got.per_channel and got.reduce_range
    with pytest.raises(ManifestError, match="unknown keys"):
        opts({"nodes_to_exlude": ["typo"]})
    with pytest.raises(ManifestError, match="calibration"):
        opts({"calibration": "kl"})


def test_nanodet_quantizes_to_a_model_that_runs(tmp_path: Path) -> None:
    """The real failure (NanoDet, opset 11, four Resize nodes with an empty roi): before the fix the QDQ model
    failed at run time under ORT_ENABLE_ALL (``Gather ... idx=0 must be within the inclusive range [0,-1]``)."""
    from .conftest import COCO_DEMO, MODELS

    bundle = load_bundle(MODELS / "nanodet_m_320")
    out = tmp_path / "int8.onnx"
    quantize_onnx(bundle, sorted((COCO_DEMO / "images").glob("*.jpg"))[:2], out, method="minmax")
    sess = _session(out)
    feeds = {"input.1": np.zeros((1, 3, 320, 320), np.uint8), "score_threshold": np.array(0.0, np.float32),
             "iou_threshold": np.array(0.6, np.float32), "max_detections": np.array(7, np.int64)}
    boxes, scores, class_ids = sess.run(["boxes", "scores", "class_ids"], feeds)
    assert boxes.shape == (7, 4) and scores.shape == (7,) and class_ids.shape == (7,)  # threshold 0: every anchor


def test_yolox_with_post_processing_in_the_graph_quantizes_and_keeps_its_head(tmp_path: Path) -> None:
    """The calibrator cannot take the head's variable-length candidate tensors: the body is quantized alone and
    the float post-processing put back; the INT8 model takes the thresholds and still finds the cows."""
    from edge_agent.vision.model import Model
    from edge_agent.vision.runtime import OrtRuntime

    from .conftest import COCO_DEMO, MODELS

    bundle = load_bundle(MODELS / "yolox_nano")
    out = tmp_path / "int8.onnx"
    photos = sorted((COCO_DEMO / "images").glob("*.jpg"))
    quantize_onnx(bundle, photos[:2], out)
    graph = onnx.load(str(out)).graph
    assert {i.name for i in graph.input} == {"images", "score_threshold", "iou_threshold", "max_detections"}
    assert [o.name for o in graph.output] == ["boxes", "scores", "class_ids"]
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0].startswith("pp_") for n in graph.node)
    model = Model(bundle.manifest, OrtRuntime(out))
    cows = model.predict_bytes((COCO_DEMO / "images" / "000000573455.jpg").read_bytes()).detections
    assert sum(d.label == "cow" for d in cows) >= 3
