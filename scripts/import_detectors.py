"""Import the pretrained COCO detectors from ../shared/models as edge-agent bundles.

Usage: python scripts/import_detectors.py [SHARED_MODELS_DIR] [MODELS_DIR]
Copies the ONNX files and licences and writes manifest.json with the sha256 of each file.
Both get their post-processing (candidate filter, decode, class-aware NMS) and a uint8 image input (cast and
normalisation) inside the graph (``toolchain.detector_heads``; decoder ``detections``): same detections, less time
per frame.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.fsutil import sha256_file  # noqa: E402
from edge_agent.toolchain import detector_heads  # noqa: E402
from edge_agent.toolchain.quantize import drop_initializer_inputs  # noqa: E402


def _labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


BUNDLES: dict[str, dict[str, Any]] = {
    "yolox_nano": {
        "files": ["yolox_nano.onnx", "LICENSE", "LICENSE.upstream-YOLOX", "SOURCE.md", "coco_classes.txt"],
        "manifest": {
            "schema_version": 1,
            "name": "yolox_nano",
            "version": "1.1.0",
            "task": "detection",
            "model_file": "yolox_nano.onnx",
            "license": "Apache-2.0",
            "source": "Megvii YOLOX-Nano COCO weights (Apache-2.0), ONNX export from "
            "Kazuhito00/YOLOX-ONNX-TFLite-Sample @ 3d4f1119; see SOURCE.md",
            "description": "YOLOX-Nano COCO-80 detector, 416x416, 0.91M parameters; uint8 input, post-processing "
            "(filter, decode, class-aware NMS) in the graph.",
            "input": {
                "name": "images",
                "width": 416,
                "height": 416,
                "layout": "NCHW",
                "dtype": "float32",
                "color": "BGR",
                "resize": {"mode": "letterbox", "pad_value": 114, "placement": "top_left"},
                "normalize": {"scale": 1.0, "mean": [0, 0, 0], "std": [1, 1, 1]},
            },
            "decoder": {"type": "detections"},
            "thresholds": {"score": 0.3, "iou": 0.45, "max_detections": 100},
            # INT8 (edge_agent.toolchain.quantize): the stem's SiLU in 8 bits cost 8 of 18 found animals on coco_demo;
            # the post-processing after the last convolutions stays float
            "metadata": {"quantize": {"nodes_to_exclude": ["Conv_41", "Sigmoid_42", "Mul_43", "Conv_44"],
                                      "float_tail": True}},
            # graph surgery applied after copying (see main)
            "head": {"kind": "yolox", "output": "output", "strides": [8, 16, 32], "uint8_input": "images"},
        },
    },
    "nanodet_m_320": {
        "files": ["nanodet_m_320.onnx", "LICENSE", "LICENSE.repo-MIT", "SOURCE.md", "coco_classes.txt"],
        "manifest": {
            "schema_version": 1,
            "name": "nanodet_m_320",
            "version": "1.1.0",
            "task": "detection",
            "model_file": "nanodet_m_320.onnx",
            "license": "Apache-2.0",
            "source": "RangiLyu/nanodet NanoDet-m (Apache-2.0), ONNX from "
            "Kazuhito00/MOT-Tracking-by-Detection-Pipeline @ e50a76b8; see SOURCE.md",
            "description": "NanoDet-m COCO-80 detector (ShuffleNetV2 0.5x, GFL head), 320x320, 0.95M parameters; "
            "post-processing (filter, decode, class-aware NMS) in the graph.",
            "input": {
                "name": "input.1",
                "width": 320,
                "height": 320,
                "layout": "NCHW",
                "dtype": "float32",
                "color": "BGR",
                "resize": {"mode": "letterbox", "pad_value": 0, "placement": "center"},
                "normalize": {"scale": 1.0, "mean": [103.53, 116.28, 123.675], "std": [57.375, 57.12, 58.395]},
            },
            "decoder": {"type": "detections"},
            "thresholds": {"score": 0.35, "iou": 0.6, "max_detections": 100},
            # graph surgery applied after copying (see main)
            "head": {
                "kind": "nanodet",
                "cls_outputs": ["cls_pred_stride_8", "cls_pred_stride_16", "cls_pred_stride_32"],
                "reg_outputs": ["dis_pred_stride_8", "dis_pred_stride_16", "dis_pred_stride_32"],
                "strides": [8, 16, 32],
                "reg_max": 7,
                "uint8_input": "input.1",
            },
        },
    },
}


def add_head(path: Path, head: dict[str, Any], size: tuple[int, int]) -> None:
    import onnx

    model = onnx.load(str(path))
    if head["kind"] == "yolox":
        detector_heads.add_yolox_postprocess(model, size, tuple(head["strides"]), head["output"])
    else:
        detector_heads.add_nanodet_postprocess(model, size, tuple(head["strides"]), head["reg_max"],
                                               tuple(head["cls_outputs"]), tuple(head["reg_outputs"]))
    if head.get("uint8_input"):
        norm = head.get("normalize", {})
        detector_heads.cast_uint8_input(model, head["uint8_input"], norm.get("scale", 1.0),
                                        norm.get("mean", (0.0, 0.0, 0.0)), norm.get("std", (1.0, 1.0, 1.0)))
    onnx.save(model, str(path))


def main() -> None:
    shared = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "models"
    out_root = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "models"
    if not shared.is_dir():
        raise SystemExit(f"import_detectors: {shared} not found (the shared models; pass SHARED_MODELS_DIR)")
    for name, spec in BUNDLES.items():
        src, dst = shared / name, out_root / name
        dst.mkdir(parents=True, exist_ok=True)
        for f in spec["files"]:
            if f == "SOURCE.md" and (dst / f).is_file():
                continue  # the bundle's SOURCE.md extends the shared one with what importing changed
            shutil.copyfile(src / f, dst / f)
        dropped = drop_initializer_inputs(dst / spec["manifest"]["model_file"])
        if dropped:
            print(f"{name}: {dropped} weights were listed as graph inputs; removed from the inputs")
        manifest = dict(spec["manifest"])
        head = manifest.pop("head", None)
        if head is not None and head.get("uint8_input"):  # the graph takes uint8 pixels and normalises them itself
            head["normalize"] = manifest["input"].get("normalize", {})
            manifest["input"] = {k: v for k, v in manifest["input"].items() if k != "normalize"} | {"dtype": "uint8"}
        if head is not None:
            add_head(dst / manifest["model_file"], head, (manifest["input"]["width"], manifest["input"]["height"]))
            print(f"{name}: post-processing" + (" and uint8 input" if head.get("uint8_input") else "")
                  + " moved into the graph")
        manifest["sha256"] = sha256_file(dst / manifest["model_file"])
        manifest["labels"] = _labels(dst / "coco_classes.txt")
        (dst / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"{name}: {dst}")


if __name__ == "__main__":
    main()
