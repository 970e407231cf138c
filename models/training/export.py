"""Build the shipped ONNX graphs from the shared backbone plus trained parameters (onnx.helper, no torch export)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_agent.fsutil import sha256_file
from training.common import T_7A, T_7B, T_14, T_FEAT, uint8_backbone, write_json

POOLED = {"p14": T_14, "p7a": T_7A, "p7b": T_7B}


def _replace_inits(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> None:
    for init in model.graph.initializer:
        if init.name in arrays:
            init.CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))


B14_PREFIX = "/_blocks.14/"
FT14_PREFIX = "/ft_blocks.14/"


def finetuned_block14(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> None:
    """Give block 15 its own fine-tuned copy of block 14 (initializers ``heads.FT14_INITS``), in place.

    The original block 14 stays frozen (ImageNet) and keeps feeding pool(block 14) for the classifier's fixed
    features and the open-set head; only block 15 + head conv read the copy."""
    from training.heads import B14_INITS, FT14_INITS

    g = model.graph
    rename_init = {B14_INITS[k]: FT14_INITS[k] for k in B14_INITS}
    copies = []
    for node in g.node:
        if node.name.startswith(B14_PREFIX):
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.name = FT14_PREFIX + node.name[len(B14_PREFIX):]
            del new.input[:]
            new.input.extend([rename_init.get(i, FT14_PREFIX + i[len(B14_PREFIX):] if i.startswith(B14_PREFIX)
                                              else i) for i in node.input])
            del new.output[:]
            new.output.extend([FT14_PREFIX + o[len(B14_PREFIX):] for o in node.output])
            copies.append(new)
    assert len(copies) > 5, "block 14 not found"
    frozen_out, ft_out = B14_PREFIX + "Add_output_0", FT14_PREFIX + "Add_output_0"
    nodes = list(g.node)
    first15 = next(i for i, n in enumerate(nodes) if n.name.startswith("/_blocks.15/"))
    for n in nodes[first15:]:
        if n.name.startswith("/_blocks.15/"):
            for j, i in enumerate(n.input):
                if i == frozen_out:
                    n.input[j] = ft_out
    del g.node[:]
    g.node.extend(nodes[:first15] + copies + nodes[first15:])
    g.initializer.extend([numpy_helper.from_array(arrays[v], v) for v in FT14_INITS.values()])


def classifier_graph(
    parts: Sequence[str],
    weight: np.ndarray,
    bias: np.ndarray,
    tail_arrays: dict[str, np.ndarray] | None = None,
    ood: tuple[np.ndarray, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """uint8 pixels -> embedding = concat(parts) -> ``logits``; optional ``ood`` output.

    ``parts`` names pooled stage outputs (p14, p7a, p7b) or ``features`` (1280, after the tail).
    ``ood`` = (L (D, k), M (C, k)): score = min_c ||emb @ L - M_c||^2 / k (Mahalanobis to the class means
    in a whitened subspace).
    """
    tensors = [POOLED.get(p, T_FEAT) for p in parts]
    model = uint8_backbone(tensors)
    if tail_arrays:
        _replace_inits(model, tail_arrays)
        if any(k.startswith("ft14_") for k in tail_arrays):
            finetuned_block14(model, tail_arrays)
    g = model.graph
    del g.output[:]
    names = []
    for p, t in zip(parts, tensors, strict=True):
        if p in POOLED:
            g.node.append(helper.make_node("ReduceMean", [t], [p], axes=[2, 3], keepdims=0, name=f"pool_{p}"))
            names.append(p)
        else:
            names.append(t)
    g.node.append(helper.make_node("Concat", names, ["embedding"], axis=1, name="concat_embedding"))
    g.initializer.extend([
        numpy_helper.from_array(weight.astype(np.float32), "head_w"),
        numpy_helper.from_array(bias.astype(np.float32), "head_b"),
    ])
    g.node.append(helper.make_node("Gemm", ["embedding", "head_w", "head_b"], ["logits"], transB=1, name="head_fc"))
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", weight.shape[0]]))
    if ood is not None:
        proj, means = ood
        k = proj.shape[1]
        g.initializer.extend([
            numpy_helper.from_array(proj.astype(np.float32), "ood_proj"),
            numpy_helper.from_array((-2.0 * means.T).astype(np.float32), "ood_means_t2"),
            numpy_helper.from_array((means**2).sum(1).astype(np.float32), "ood_means_sq"),
            numpy_helper.from_array(np.array(1.0 / k, np.float32), "ood_inv_k"),
        ])
        g.node.extend([
            helper.make_node("MatMul", ["embedding", "ood_proj"], ["ood_z"], name="ood_project"),
            helper.make_node("MatMul", ["ood_z", "ood_means_t2"], ["ood_cross"], name="ood_cross"),
            helper.make_node("ReduceSumSquare", ["ood_z"], ["ood_zz"], axes=[1], keepdims=1, name="ood_norm"),
            helper.make_node("Add", ["ood_cross", "ood_zz"], ["ood_d0"], name="ood_add1"),
            helper.make_node("Add", ["ood_d0", "ood_means_sq"], ["ood_d"], name="ood_add2"),
            helper.make_node("ReduceMin", ["ood_d"], ["ood_min"], axes=[1], keepdims=1, name="ood_min"),
            helper.make_node("Mul", ["ood_min", "ood_inv_k"], ["ood"], name="ood_scale"),
        ])
        g.output.append(helper.make_tensor_value_info("ood", TensorProto.FLOAT, ["N", 1]))
    model.producer_name = "edge-agent models/training"
    onnx.checker.check_model(model)
    return model


OOD_NODES = ["ood_project", "ood_cross", "ood_norm", "ood_add1", "ood_add2", "ood_min", "ood_scale"]


def write_bundle(out_dir: Path, model: onnx.ModelProto, manifest: dict[str, Any], model_file: str) -> Path:
    """Write ``model_file`` + manifest.json (sha256 filled in) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / model_file
    onnx.save(model, str(onnx_path))
    doc = dict(manifest)
    doc["model_file"] = model_file
    doc["sha256"] = sha256_file(onnx_path)
    write_json(out_dir / "manifest.json", doc)
    return onnx_path


def classifier_manifest(
    name: str,
    labels: Sequence[str],
    license_: str,
    source: str,
    description: str,
    ood_threshold: float | None = None,
    label_aliases: dict[str, str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    decoder: dict[str, Any] = {"type": "softmax", "output": "logits", "apply_softmax": True, "top_k": 5}
    thresholds: dict[str, Any] = {}
    if ood_threshold is not None:
        decoder["ood_output"] = "ood"
        decoder["ood_label"] = "not_recognised"
        thresholds["ood"] = round(float(ood_threshold), 6)
    return {
        "schema_version": 1,
        "name": name,
        "version": "1.0.0",
        "task": "classification",
        "model_file": "model.onnx",
        "sha256": "0" * 64,
        "license": license_,
        "source": source,
        "description": description,
        "input": {
            "name": "pixels",
            "width": 224,
            "height": 224,
            "layout": "NCHW",
            "dtype": "uint8",
            "color": "RGB",
            "resize": {"mode": "stretch", "interpolation": "linear"},
            "normalize": {"scale": 1.0, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        },
        "decoder": decoder,
        "labels": list(labels),
        "label_aliases": label_aliases or {},
        "thresholds": thresholds,
        "metadata": metadata or {},
    }


FT_PREFIX = "ft/"


def finetuned_branch(model: onnx.ModelProto, start: int, arrays: dict[str, np.ndarray]) -> str:
    """Add a fine-tuned copy of blocks ``start``..15 + head conv + pooling next to the frozen ones, in place.

    The copy reads the frozen block ``start - 1`` output; its conv initializers are ``ft/<name>`` (``arrays``
    keyed by the original initializer names); everything else (shape constants, padding subgraphs) is copied
    with renamed outputs. The frozen blocks stay for pool(block 10) / pool(block 14) of the open-set head.
    Returns the name of the branch's pooled 1280-d features."""
    g = model.graph
    nodes = list(g.node)
    first = next(i for i, n in enumerate(nodes) if n.name.startswith(f"/_blocks.{start}/"))
    last = next(i for i, n in enumerate(nodes) if T_FEAT in n.output)
    produced: set[str] = set()
    copies = []
    for node in nodes[first : last + 1]:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = FT_PREFIX + node.name
        del new.input[:]
        new.input.extend([FT_PREFIX + i if (i in produced or i in arrays) else i for i in node.input])
        del new.output[:]
        new.output.extend([FT_PREFIX + o for o in node.output])
        produced.update(node.output)
        copies.append(new)
    g.node.extend(copies)
    g.initializer.extend([numpy_helper.from_array(a.astype(np.float32), FT_PREFIX + k) for k, a in arrays.items()])
    return FT_PREFIX + T_FEAT


def finetuned_classifier_graph(start: int, arrays: dict[str, np.ndarray], weight: np.ndarray,
                               bias: np.ndarray) -> onnx.ModelProto:
    """uint8 pixels -> ``logits`` from the fine-tuned branch; pooled frozen ``p14`` / ``p7a`` kept for the
    open-set head (``open_set.add_to_graph(model, ["p14", "p7a"], ...)``)."""
    model = uint8_backbone([T_14, T_7A, T_FEAT])
    feats = finetuned_branch(model, start, arrays)
    g = model.graph
    del g.output[:]
    for p in ("p14", "p7a"):
        g.node.append(helper.make_node("ReduceMean", [POOLED[p]], [p], axes=[2, 3], keepdims=0, name=f"pool_{p}"))
    g.initializer.extend([
        numpy_helper.from_array(weight.astype(np.float32), "head_w"),
        numpy_helper.from_array(bias.astype(np.float32), "head_b"),
    ])
    g.node.append(helper.make_node("Gemm", [feats, "head_w", "head_b"], ["logits"], transB=1, name="head_fc"))
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", weight.shape[0]]))
    model.producer_name = "edge-agent models/training"
    return model
