"""Build the INT8 twins of the COCO detector bundles: models/<name>_int8, gated on recall and speed.

Usage: python scripts/quantize_detectors.py [--models-dir models] [--shared ../shared] [--only NAME] [--dry-run]

For each FP32 detector bundle (yolox_nano, nanodet_m_320):
1. Static QDQ INT8 with ``edge_agent.toolchain.quantize.quantize_onnx`` (options from the FP32 manifest's
   ``metadata.quantize``), calibrated on livestock and field photos from ../shared/datasets: every 3rd cattle_chute
   training frame and every 20th iBean field photo. None of the coco_demo photos the gate evaluates on.
2. Gate: cows + horses found on coco_demo (IoU >= 0.5, as tests/test_detectors.py counts) may drop by at most
   ``--max-recall-drop`` (1 of 24) and INT8 ``session.run`` must be faster than FP32 at 2 threads and at 1 thread
   (median, interleaved, spinning off).
3. Passing models are written as a bundle with the FP32 bundle's licence, source and class files, the manifest
   of the FP32 bundle renamed, and ``metadata.quantization`` (``from`` = the FP32 name, so
   ``edge_agent.toolchain.bench.int8_pairs`` pairs them; the gate figures). Refused models write nothing; exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.bundles.bundle import MANIFEST_NAME, Bundle, load_bundle  # noqa: E402
from edge_agent.fsutil import sha256_file  # noqa: E402
from edge_agent.toolchain.quantize import (  # noqa: E402
    QuantizeOptions,
    compare_latency,
    drop_initializer_inputs,
    preprocess_file,
    quantize_onnx,
)
from edge_agent.vision.model import Model  # noqa: E402
from edge_agent.vision.postprocess import box_iou  # noqa: E402
from edge_agent.vision.preprocess import Preprocessor  # noqa: E402
from edge_agent.vision.runtime import OrtRuntime, RuntimeOptions  # noqa: E402

log = logging.getLogger("quantize_detectors")
DETECTORS = ("yolox_nano", "nanodet_m_320")
EXTRA_FILES = ("LICENSE", "LICENSE.repo-MIT", "LICENSE.upstream-YOLOX", "SOURCE.md", "coco_classes.txt")


def calibration_photos(shared: Path) -> list[Path]:
    """Every 3rd cattle_chute training frame and every 20th iBean photo, sorted (deterministic)."""
    data = shared / "datasets"
    cattle = sorted((data / "livestock" / "cattle_chute" / "train" / "images").glob("*.jpg"))[::3]
    beans = sorted((data / "crops" / "ibean" / "train").rglob("*.jpg"))[::20]
    return cattle + beans


def coco_recall(model: Model, coco_dir: Path, classes: tuple[str, ...] = ("cow", "horse")) -> tuple[int, int]:
    """(found, total) annotated ``classes`` boxes matched by a same-class detection at IoU >= 0.5."""
    doc: dict[str, Any] = json.loads((coco_dir / "annotations.json").read_text())
    cats = {c["id"]: c["name"] for c in doc["categories"]}
    total = found = 0
    for img in doc["images"]:
        result = model.predict_bytes((coco_dir / "images" / img["file_name"]).read_bytes())
        for ann in doc["annotations"]:
            name = cats[ann["category_id"]]
            if ann["image_id"] != img["id"] or name not in classes:
                continue
            total += 1
            x, y, w, h = ann["bbox"]
            boxes = [d.box for d in result.detections if d.label == name]
            truth = np.array([[x, y, x + w, y + h]], np.float32)
            if boxes and box_iou(truth, np.array(boxes, np.float32)).max() >= 0.5:
                found += 1
    return found, total


def gate(fp32: Bundle, int8_path: Path, coco_dir: Path, runs: int, max_drop: int) -> dict[str, Any]:
    """Recall and latency of both models; ``passed`` when INT8 is faster at 2 and 1 threads and recall holds."""
    report: dict[str, Any] = {}
    sample = preprocess_file(Preprocessor(fp32.manifest.input), coco_dir / "images" / "000000573455.jpg")
    for threads in (2, 1):
        opts = RuntimeOptions(intra_op_threads=threads, allow_spinning=False)
        a = Model.load(fp32, opts)
        b = Model(fp32.manifest, OrtRuntime(int8_path, opts))
        fp_ms, q_ms = compare_latency(a, b, sample, runs)
        report[f"run_ms_{threads}t"] = {"fp32": round(fp_ms, 3), "int8": round(q_ms, 3),
                                        "ratio": round(q_ms / fp_ms, 3)}
        if threads == 2:
            report["recall_fp32"] = list(coco_recall(a, coco_dir))
            report["recall_int8"] = list(coco_recall(b, coco_dir))
    found_fp, total = report["recall_fp32"]
    found_q = report["recall_int8"][0]
    faster = all(report[f"run_ms_{t}t"]["ratio"] < 1.0 for t in (2, 1))
    report["passed"] = faster and found_fp - found_q <= max_drop
    report["rule"] = f"INT8 faster at 2 and 1 threads; at most {max_drop} of {total} fewer cows/horses found"
    return report


def write_bundle(fp32: Bundle, int8_path: Path, out_dir: Path, report: dict[str, Any], calib: list[Path]) -> Bundle:
    name = f"{fp32.name}_int8"
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.onnx"):
        old.unlink()
    model_file = f"{name}.onnx"
    shutil.copyfile(int8_path, out_dir / model_file)
    drop_initializer_inputs(out_dir / model_file)  # the quantizer lists some constants as inputs too
    for f in EXTRA_FILES:
        if (fp32.directory / f).is_file():
            shutil.copyfile(fp32.directory / f, out_dir / f)
    doc = fp32.manifest.model_dump(mode="json")
    opts = QuantizeOptions.from_manifest(fp32.manifest)
    doc.update(name=name, model_file=model_file, sha256=sha256_file(out_dir / model_file))
    doc["description"] = f"{doc['description']} INT8 (static QDQ) twin of {fp32.name}."
    metadata = dict(doc.get("metadata") or {})
    metadata["quantization"] = {
        "method": "onnxruntime quantize_static, QDQ, QUInt8 activations, QInt8 weights"
        + (" per-channel" if opts.per_channel else " per-tensor") + (" (reduce_range)" if opts.reduce_range else ""),
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in opts.__dict__.items()},
        "from": fp32.name,
        "calibration_images": f"{len(calib)}: every 3rd cattle_chute train frame, every 20th iBean train photo",
        "eval": "coco_demo cows + horses, IoU >= 0.5",
        "gate": report,
        "built_by": "scripts/quantize_detectors.py",
    }
    doc["metadata"] = metadata
    (out_dir / MANIFEST_NAME).write_text(json.dumps(doc, indent=2) + "\n")
    return load_bundle(out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=ROOT / "models")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--only", action="append", default=[], help="only these FP32 bundles")
    ap.add_argument("--runs", type=int, default=40, help="timed runs per model and thread count")
    ap.add_argument("--max-recall-drop", type=int, default=1)
    ap.add_argument("--dry-run", action="store_true", help="gate only; write no bundle")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs per tensor on the root logger
    log.setLevel(logging.INFO)
    if not (args.shared / "datasets").is_dir():
        raise SystemExit(f"quantize_detectors: {args.shared / 'datasets'} not found (shared datasets; pass --shared)")
    coco_dir = args.shared / "datasets" / "livestock" / "coco_demo"
    calib = calibration_photos(args.shared)
    status = 0
    for name in args.only or DETECTORS:
        fp32 = load_bundle(args.models_dir / name)
        with tempfile.TemporaryDirectory() as tmp:
            int8_path = Path(tmp) / f"{name}_int8.onnx"
            log.info("%s: quantizing on %d photos", name, len(calib))
            quantize_onnx(fp32, calib, int8_path)
            report = gate(fp32, int8_path, coco_dir, args.runs, args.max_recall_drop)
            log.info("%s: %s", name, json.dumps(report))
            if not report["passed"]:
                log.warning("%s: INT8 refused (%s)", name, report["rule"])
                status = 1
            elif not args.dry_run:
                bundle = write_bundle(fp32, int8_path, args.models_dir / f"{name}_int8", report, calib)
                log.info("%s: wrote %s", name, bundle.directory)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
