"""Tiny ONNX models built with onnx.helper at test time, and manifests to go with them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.opset_import[0].version = 13
    model.ir_version = 7
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def tiny_classifier(path: Path, n_classes: int = 3, size: int = 8, seed: int = 0) -> Path:
    """(1, 3, size, size) float -> logits (1, n_classes) via global average pool + Gemm,
    and ``ood`` (1, 1) = mean absolute input (a stand-in out-of-domain score)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_classes, 3)).astype(np.float32)
    b = np.zeros(n_classes, np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1),
        helper.make_node("Abs", ["input"], ["absx"]),
        helper.make_node("ReduceMean", ["absx"], ["ood4"], keepdims=1),
        helper.make_node("Reshape", ["ood4", "shape11"], ["ood"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, n_classes]),
            helper.make_tensor_value_info("ood", TensorProto.FLOAT, [1, 1]),
        ],
        [
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(b, "B"),
            numpy_helper.from_array(np.array([1, 1], np.int64), "shape11"),
        ],
    )
    return _save(helper.make_model(graph), path)


def tiny_passthrough(path: Path, out_shape: list[int], name: str = "output", size: int = 8) -> Path:
    """(1, 3, size, size) -> a constant-shaped output ``name`` = zeros + mean(input) (for decoder plumbing)."""
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["m"], keepdims=0),
        helper.make_node("ConstantOfShape", ["shp"], ["z"], value=numpy_helper.from_array(np.zeros(1, np.float32))),
        helper.make_node("Add", ["z", "m"], [name]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_passthrough",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(np.array(out_shape, np.int64), "shp")],
    )
    return _save(helper.make_model(graph), path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def classifier_manifest(onnx_path: Path, labels: list[str], size: int = 8, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "name": "tiny_cls",
        "version": "0.0.1",
        "task": "classification",
        "model_file": onnx_path.name,
        "sha256": sha256(onnx_path),
        "license": "Apache-2.0",
        "source": "built by tests/support/onnx_models.py",
        "input": {
            "name": "input",
            "width": size,
            "height": size,
            "color": "RGB",
            "resize": {"mode": "stretch"},
            "normalize": {"scale": 1.0, "mean": [127, 127, 127], "std": [128, 128, 128]},
        },
        "decoder": {
            "type": "softmax",
            "output": "logits",
            "top_k": 3,
            "ood_output": "ood",
            "ood_label": "not_recognised",
        },
        "labels": labels,
        "thresholds": {"ood": 0.9},
    }
    doc.update(overrides)
    return doc


def write_bundle(directory: Path, manifest: dict[str, Any]) -> Path:
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory
