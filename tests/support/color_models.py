"""A tiny uint8-input colour classifier (red/green/blue + an OOD score) and labelled image folders for it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

LABELS = ["red", "green", "blue"]
SIZE = 16


def color_classifier(path: Path) -> Path:
    """pixels (1,3,16,16) uint8 -> Conv 1x1 (two copies of each channel) -> ReLU -> mean -> logits (1,3);
    ``ood`` (1,1) = 255 - brightest channel mean (grey or dark photos score high)."""
    eye = np.eye(3, dtype=np.float32)
    conv_w = np.concatenate([eye, eye])[:, :, None, None]  # (6, 3, 1, 1)
    fc_w = (np.concatenate([eye, eye], axis=1) * 0.05).astype(np.float32)  # (3, 6)
    nodes = [
        helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("ReduceMean", ["r"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("Gemm", ["pooled", "fc_w", "fc_b"], ["logits"], transB=1),
        helper.make_node("ReduceMean", ["x"], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("ReduceMax", ["means"], ["brightest"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["full", "brightest"], ["ood"]),
    ]
    graph = helper.make_graph(
        nodes,
        "color",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, [1, 3, SIZE, SIZE])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3]),
            helper.make_tensor_value_info("ood", TensorProto.FLOAT, [1, 1]),
        ],
        [
            numpy_helper.from_array(conv_w, "conv_w"),
            numpy_helper.from_array(np.zeros(6, np.float32), "conv_b"),
            numpy_helper.from_array(fc_w, "fc_w"),
            numpy_helper.from_array(np.zeros(3, np.float32), "fc_b"),
            numpy_helper.from_array(np.array(255.0, np.float32), "full"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def write_bundle(directory: Path, name: str = "colors", **overrides: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = color_classifier(directory / f"{name}.onnx")
    doc: dict[str, Any] = {
        "schema_version": 1,
        "name": name,
        "task": "classification",
        "model_file": onnx_path.name,
        "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "license": "Apache-2.0",
        "source": "tests",
        "input": {
            "name": "pixels", "width": SIZE, "height": SIZE, "dtype": "uint8", "color": "RGB",
            "resize": {"mode": "stretch"},
        },
        "decoder": {"type": "softmax", "output": "logits", "ood_output": "ood"},
        "labels": LABELS,
        "label_aliases": {"rouge": "red"},
        "thresholds": {"ood": 100.0},
        "metadata": {"quantize": {"nodes_to_exclude": []}},
    }
    doc.update(overrides)
    (directory / "manifest.json").write_text(json.dumps(doc))
    return directory


COLORS = {"red": (210, 30, 20), "rouge": (200, 40, 30), "green": (20, 200, 40), "blue": (30, 20, 220)}


def write_images(root: Path, per_class: int = 4, grey: int = 2, seed: int = 0) -> Path:
    """root/<colour>/*.png (plus an aliased ``rouge`` folder and an off-domain ``grey`` folder)."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            px = np.clip(np.array(rgb) + rng.integers(-15, 15, size=(24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / name / f"{i}.png")
    (root / "grey").mkdir(exist_ok=True)
    for i in range(grey):
        Image.fromarray(np.full((24, 24, 3), 90 + i, np.uint8)).save(root / "grey" / f"{i}.png")
    return root
