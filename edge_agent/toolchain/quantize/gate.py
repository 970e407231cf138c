"""The INT8 gate: quantize a bundle, evaluate and time FP32 against INT8 side by side, ship only if it is faster and
as accurate (within budget)."""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundles.bundle import MANIFEST_NAME, Bundle, load_bundle
from edge_agent.bundles.manifest import Manifest
from edge_agent.errors import ManifestError, QuantizationGateError, require_extra
from edge_agent.fsutil import sha256_file
from edge_agent.toolchain.anomaly_fit import fitted_here, refit_banks
from edge_agent.toolchain.evaluate import Progress, evaluate, public
from edge_agent.toolchain.quantize.graph import QuantizeOptions, calibration_images, preprocess_file, quantize_onnx
from edge_agent.vision.model import Model
from edge_agent.vision.preprocess import Preprocessor
from edge_agent.vision.runtime import OrtRuntime, RuntimeOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateConfig:
    max_accuracy_drop: float = 0.01
    max_auroc_drop: float = 0.01
    latency_runs: int = 30
    threads: int = 0
    max_calibration_images: int = 200
    calibration: str | None = None  # minmax | percentile | entropy; None: the manifest's (default percentile)


@dataclass
class GateReport:
    passed: bool
    reason: str
    metric: str
    fp32: float
    int8: float
    drop: float
    budget: float
    fp32_latency_ms: float
    int8_latency_ms: float
    speedup: float
    n_eval: int
    n_calibration: int
    fp32_report: dict[str, Any] = field(default_factory=dict)
    int8_report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



def compare_latency(
    a: Model, b: Model, sample: np.ndarray, runs: int
) -> tuple[float, float]:
    """Median ``runtime.run`` time (ms) of two models on the same tensor, interleaved so noise hits both."""
    feeds_a = a.feeds(sample)
    feeds_b = b.feeds(sample)
    for _ in range(3):
        a.runtime.run(feeds_a)
        b.runtime.run(feeds_b)
    ta: list[float] = []
    tb: list[float] = []
    for i in range(runs):
        order = ((a, feeds_a, ta), (b, feeds_b, tb)) if i % 2 == 0 else ((b, feeds_b, tb), (a, feeds_a, ta))
        for model, feeds, times in order:
            t0 = time.perf_counter()
            model.runtime.run(feeds)
            times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(ta), statistics.median(tb)


def decide(
    metric: str, fp32: float, int8: float, fp32_ms: float, int8_ms: float, config: GateConfig
) -> tuple[bool, str, float, float]:
    """Pure gate rule: returns (passed, reason, drop, budget)."""
    budget = config.max_auroc_drop if metric == "image_auroc" else config.max_accuracy_drop
    drop = fp32 - int8
    if int8_ms >= fp32_ms:
        return False, f"INT8 is not faster ({int8_ms:.2f} ms vs FP32 {fp32_ms:.2f} ms)", drop, budget
    if drop > budget + 1e-9:
        return False, f"INT8 loses {drop:.4f} {metric} (budget {budget:.4f})", drop, budget
    return True, f"INT8 {fp32_ms / int8_ms:.2f}x faster, {metric} drop {drop:.4f} <= {budget:.4f}", drop, budget


def _metric_of(report: dict[str, Any]) -> tuple[str, float]:
    if "image_auroc" in report:
        return "image_auroc", float(report["image_auroc"])
    if "ap50" in report:
        return "ap50", float(report["ap50"])
    return "accuracy", float(report["accuracy"])


def quantize_and_gate(
    bundle: Bundle,
    calib_dir: Path,
    eval_dir: Path,
    out_dir: Path,
    out_name: str,
    config: GateConfig = GateConfig(),
    progress: Callable[[str], None] | None = None,
    eval_progress: Progress | None = None,
    defects_dir: Path | None = None,
) -> GateReport:
    """Quantize, evaluate both, time both; write ``out_dir`` (a bundle named ``out_name``) only if the gate passes.

    An anomaly bundle made by ``inspect fit`` is refitted on its INT8 features (banks, threshold; its defect head
    too, from ``defects_dir``, which a bundle with a defect head requires).

    Raises QuantizationGateError (with the report in ``.report``) when it refuses.
    """
    require_extra("onnx", "tools", "edge-agent quantize")
    say = progress or (lambda _msg: None)
    calib = calibration_images(calib_dir, config.max_calibration_images)
    options = RuntimeOptions(intra_op_threads=config.threads)
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = Path(tmp) / f"{out_name}.onnx"
        say(f"quantizing with {len(calib)} calibration images")
        quantize_onnx(bundle, calib, int8_path, config.calibration)
        manifest = bundle.manifest
        if manifest.task == "anomaly" and fitted_here(manifest.metadata):
            say("refitting the memory banks and threshold on INT8 features")
            refit = refit_banks(int8_path, calib_dir, manifest.metadata, config.threads, defect_dir=defects_dir)
            update = {"anomaly": round(refit["threshold"], 6)}
            if "region" in refit:
                update["region"] = round(refit["region"], 6)
            thresholds = manifest.thresholds.model_copy(update=update)
            manifest = manifest.model_copy(update={"thresholds": thresholds,
                                                   "metadata": {**manifest.metadata, "fit": refit["fit"]}})
        fp32_model = Model.load(bundle, options)
        int8_model = Model(manifest, OrtRuntime(int8_path, options))
        say("evaluating FP32")
        fp32_report = evaluate(fp32_model, eval_dir, eval_progress)
        say("evaluating INT8")
        int8_report = evaluate(int8_model, eval_dir, eval_progress)
        metric, fp32_value = _metric_of(fp32_report)
        _, int8_value = _metric_of(int8_report)
        say("timing FP32 and INT8")
        sample = preprocess_file(Preprocessor(bundle.manifest.input), calib[0])
        fp32_ms, int8_ms = compare_latency(fp32_model, int8_model, sample, config.latency_runs)
        passed, reason, drop, budget = decide(metric, fp32_value, int8_value, fp32_ms, int8_ms, config)
        report = GateReport(
            passed=passed,
            reason=reason,
            metric=metric,
            fp32=fp32_value,
            int8=int8_value,
            drop=round(drop, 4),
            budget=budget,
            fp32_latency_ms=round(fp32_ms, 3),
            int8_latency_ms=round(int8_ms, 3),
            speedup=round(fp32_ms / int8_ms, 3) if int8_ms > 0 else 0.0,
            n_eval=int(fp32_report["n"]),
            n_calibration=len(calib),
            fp32_report=public(fp32_report),
            int8_report=public(int8_report),
        )
        if not passed:
            raise QuantizationGateError(f"{bundle.name}: gate refused INT8: {reason}", report.to_dict())
        _write_bundle(bundle, int8_path, out_dir, out_name, report, calib_dir, eval_dir, manifest)
    return report


def report_calibration(bundle: Bundle) -> dict[str, Any]:
    opts = QuantizeOptions.from_manifest(bundle.manifest)
    doc: dict[str, Any] = {"nodes_kept_float": list(opts.nodes_to_exclude)}
    if opts.op_types is not None:
        doc["op_types"] = list(opts.op_types)
    if opts.exclude_depthwise:
        doc["depthwise_kept_float"] = True
    return doc


def _write_bundle(
    bundle: Bundle, onnx_path: Path, out_dir: Path, name: str, report: GateReport, calib_dir: Path, eval_dir: Path,
    manifest: Manifest | None = None,
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model_file = f"{name}.onnx"
    dst = out_dir / model_file
    shutil.copyfile(onnx_path, dst)
    doc = (manifest or bundle.manifest).model_dump(mode="json")
    doc["name"] = name
    doc["model_file"] = model_file
    doc["sha256"] = sha256_file(dst)
    metadata = dict(doc.get("metadata") or {})
    gate = {k: v for k, v in report.to_dict().items() if k not in ("fp32_report", "int8_report")}
    metadata["quantization"] = {
        "method": "onnxruntime quantize_static, QDQ, QUInt8 activations, QInt8 per-channel weights (reduce_range)"
        if (opts := QuantizeOptions.from_manifest(bundle.manifest)).per_channel and opts.reduce_range
        else f"onnxruntime quantize_static, QDQ, QUInt8 activations, QInt8 weights, {opts}",
        "calibration": report_calibration(bundle),
        "from": bundle.name,
        "calibration_dir": calib_dir.name,
        "eval_dir": eval_dir.name,
        "gate": gate,
    }
    doc["metadata"] = metadata
    text = json.dumps(doc, indent=2) + "\n"
    (out_dir / MANIFEST_NAME).write_text(text)
    try:
        load_bundle(out_dir)
    except ManifestError:
        dst.unlink(missing_ok=True)
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        raise
