"""Shared helpers for the training scripts: data listing, deterministic splits, pixels, ONNX surgery.

Everything here is deterministic: file lists are sorted and splits use a fixed seed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper
from PIL import Image, ImageOps

from edge_agent.toolchain.anomaly_fit import fold_uint8_input, prune_graph

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("EDGE_AGENT_SHARED", str(REPO.parent / "shared")))
DATASETS = SHARED / "datasets"
BACKBONE = SHARED / "models" / "efficientnet_lite0_imagenet" / "efficientnet_lite0.onnx"
CACHE = REPO / "var" / "training"


def require_shared() -> None:
    """``make models`` reads the datasets and the backbone from ../shared: one line naming what is missing."""
    for path in (DATASETS, BACKBONE):
        if not path.exists():
            raise SystemExit(f"make models: {path} not found (the shared datasets and models; "
                             "set EDGE_AGENT_SHARED to the folder that holds datasets/ and models/)")
SIZE = 224
SEED = 20261123
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

# Intermediate tensors of the shared EfficientNet-Lite0 export (stage outputs).
T_28 = "/_blocks.4/Add_output_0"  # (N, 40, 28, 28)
T_14 = "/_blocks.10/Add_output_0"  # (N, 112, 14, 14)
T_13 = "/_blocks.13/Add_output_0"  # (N, 192, 7, 7)
T_7A = "/_blocks.14/Add_output_0"  # (N, 192, 7, 7)
T_7B = "/_blocks.15/_project_conv/Conv_output_0"  # (N, 320, 7, 7)
T_FEAT = "features"  # (N, 1280)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    group: str


def list_class_folder(root: Path, groups: dict[str, str] | None = None) -> list[Sample]:
    """``root/<class>/*`` sorted; ``groups`` maps a relative path to a group id (e.g. the physical leaf)."""
    out: list[Sample] = []
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(cls_dir.iterdir()):
            if f.suffix.lower() in IMAGE_EXTS:
                rel = f"{cls_dir.name}/{f.name}"
                group = groups.get(rel, rel) if groups else rel
                out.append(Sample(f, cls_dir.name, f"{cls_dir.name}:{group}"))
    return out


def plantvillage_groups(root: Path) -> dict[str, str]:
    """Leaf groups from the dataset's MANIFEST.csv, so one physical leaf never sits on both sides of a split."""
    manifest = root / "MANIFEST.csv"
    groups: dict[str, str] = {}
    if manifest.exists():
        with manifest.open(newline="") as fh:
            for row in csv.DictReader(fh):
                rel = row["file"].split("/", 1)[1] if row["file"].startswith("train/") else row["file"]
                groups[rel] = row["group"]
    return groups


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{SEED}:{text}".encode()).digest()[:8], "big")


def split_groups(samples: Sequence[Sample], holdout: float = 0.2) -> tuple[list[Sample], list[Sample]]:
    """Deterministic group-aware stratified split: per class, whole groups go to the held-out side."""
    train: list[Sample] = []
    held: list[Sample] = []
    by_class: dict[str, dict[str, list[Sample]]] = {}
    for s in samples:
        by_class.setdefault(s.label, {}).setdefault(s.group, []).append(s)
    for label in sorted(by_class):
        groups = sorted(by_class[label], key=_stable_hash)
        total = sum(len(v) for v in by_class[label].values())
        taken = 0
        for g in groups:
            members = by_class[label][g]
            if taken < holdout * total:
                held.extend(members)
                taken += len(members)
            else:
                train.extend(members)
    return train, held


def load_rgb(path: Path) -> np.ndarray:
    """Decode like the agent does (Pillow, EXIF orientation applied) -> HxWx3 uint8 RGB."""
    with Image.open(path) as raw:
        im = ImageOps.exif_transpose(raw)
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def to_input(rgb: np.ndarray, flip: bool = False) -> np.ndarray:
    """Stretch-resize to 224x224 (bilinear) and return CHW uint8: the bundle's input layout."""
    img = cv2.resize(rgb, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    if flip:
        img = img[:, ::-1]
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def uint8_backbone(outputs: Iterable[str]) -> onnx.ModelProto:
    """The shared backbone with a uint8 NCHW input (``pixels``), (x-127)/128 folded in, and the given outputs."""
    model = onnx.load(str(BACKBONE))
    fold_uint8_input(model, SIZE)
    g = model.graph
    del g.output[:]
    for name in outputs:
        g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return prune(model)


def prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers that no graph output depends on."""
    return prune_graph(model, (o.name for o in model.graph.output))


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
