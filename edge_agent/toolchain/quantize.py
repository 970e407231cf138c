"""Static INT8 quantization of a bundle, then the gate that decides whether the INT8 bundle may ship.

Quantization (:func:`quantize_onnx`): onnxruntime ``quantize_static``, QDQ format, unsigned 8-bit activations,
signed 8-bit per-channel weights (7-bit range), percentile calibration on images from a folder (pre-processed
exactly as the manifest says). Before quantizing, the graph is prepared (:func:`prepare_for_quantization`: opset
>= 13, no empty ``Resize`` roi) and optimised (``quant_pre_process``).

What gets quantized is per model, from the manifest's ``metadata.quantize`` (all keys optional):

- ``nodes_to_exclude``: node names kept in float (e.g. a distance computation, a sensitive stem). A name also
  covers the nodes onnxruntime's optimiser fuses from it (``pc_cross`` -> ``pc_cross/MatMulAddFusion``).
- ``float_tail`` (bool): keep in float every node after the last convolutions (decoders, concatenations of
  outputs with different ranges); ``float_last_convs`` (bool): those convolutions too.
- ``exclude_depthwise`` (bool): depthwise convolutions stay in float.
- ``op_types``: only these op types are quantized (default: all that onnxruntime can).
- ``per_channel`` (default true), ``reduce_range`` (default true), ``calibration`` (``percentile`` | ``minmax``
  | ``entropy``), ``percentile`` (default 99.999).

Measured on the 2-core Zen 3 (no VNNI), ``session.run`` INT8/FP32 p50, interleaved: NanoDet-m 0.54-0.73x with
the defaults (recall unchanged); the tile anomaly model 0.74-0.8x once its distance search (and the features
feeding it) stayed float and the stem + block 0 stayed float (AUROC 0.926 vs 0.919). Restricting ``op_types`` to
Conv or keeping depthwise convs in float was slower or lost accuracy. YOLOX-Nano (SiLU everywhere) found 0-11 of the 24
coco_demo animals (FP32: 18) until its stem (first two convs and their SiLU) stayed float; then 17/24, but at
0.94-1.09x FP32 at 2 threads (two gate runs): the 8-bit SiLU (QLinearSigmoid + QLinearMul) costs more than the
fused float one, eating the convolutions' gain. It ships no INT8 twin. Re-checked on a 2-core Zen 5 with AVX-512
VNNI (gate runs, FP32 8-9 ms): the same options 0.92x at 2 threads but 1.23x at 1 thread (17/24); Conv only
1.34x; depthwise convolutions in float 1.19x and 14/24. NanoDet-m there: 0.68x at 2 threads, 0.77x at 1.
Per-op profile there (1 thread, per run): FP32 Conv 5.3 ms + fused SiLU (QuickGelu) 1.4 ms; INT8 QLinearConv 2.3 ms
+ QLinearSigmoid 2.2 ms + QLinearMul 1.7 ms + QLinearConcat 0.65 ms (requantizing). Keeping the SiLU in float as
one fused op (Sigmoid + Mul rewritten to ``com.microsoft.QuickGelu`` before quantizing, so each int8 conv hands it
DequantizeLinear -> QuickGelu -> QuantizeLinear) brought 1 thread to 0.99-1.03x (17/24) but 2 threads only to
1.15-1.17x: the graph has twice the nodes, and with spinning off each parallel node wakes the other thread; the
stem still has to stay float (all int8: 9/24). Not kept. Per-tensor weights (1.14x at 1 thread, 1.21x at 2) and
full-range weights (1.16x, 1.24x) change nothing. Where the time goes, per op type and per conv block (8-bit SiLU
and depthwise convolutions): ``python -m benchmarks.int8_silu``, ``benchmarks/README.md``.

A graph with its post-processing inside (decoder ``detections``, ``edge_agent.toolchain.detector_heads``) is quantized
without it: the calibrator cannot take the variable-length candidate tensors, and the head stays float anyway; the
head is put back on the quantized body.

The gate evaluates the FP32 and the INT8 model on the same labelled folder and times both in the same run,
interleaved. It refuses (:class:`~edge_agent.errors.QuantizationGateError`, nothing written) unless INT8 is
faster and loses at most the budget: ``max_accuracy_drop`` (fraction, 0.01 = 1 point) for classifiers,
``max_auroc_drop`` for anomaly models.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundles.bundle import MANIFEST_NAME, Bundle, load_bundle, sha256_file
from edge_agent.bundles.manifest import Manifest, decoder_feeds
from edge_agent.errors import EdgeAgentError, InputNotFoundError, ManifestError, QuantizationGateError
from edge_agent.toolchain import detector_heads
from edge_agent.toolchain.evaluate import IMAGE_SUFFIXES, Progress, evaluate, public
from edge_agent.vision.decode import decode_image
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


def calibration_images(folder: Path, limit: int) -> list[Path]:
    """Images under ``folder`` (recursively), sorted, evenly thinned to at most ``limit``."""
    if not folder.is_dir():
        raise InputNotFoundError(f"{folder}: calibration folder not found")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise InputNotFoundError(f"{folder}: no calibration images")
    if len(paths) > limit:
        step = len(paths) / limit
        paths = [paths[int(i * step)] for i in range(limit)]
    return paths


def preprocess_file(pre: Preprocessor, path: Path) -> np.ndarray:
    image = decode_image(path.read_bytes(), size_hint=pre.required_size)
    tensor, _ = pre.run(image)
    return np.array(tensor, copy=True)


class _FolderReader:
    """onnxruntime CalibrationDataReader over a list of image files."""

    def __init__(self, manifest: Manifest, paths: Sequence[Path], decoder_inputs: bool = True) -> None:
        self._pre = Preprocessor(manifest.input)
        self._name = manifest.input.name
        self._extra = decoder_feeds(manifest) if decoder_inputs else {}
        self._paths = list(paths)
        self._iter: Iterator[Path] = iter(self._paths)

    def get_next(self) -> dict[str, np.ndarray] | None:
        for path in self._iter:
            try:
                return {self._name: preprocess_file(self._pre, path), **self._extra}
            except EdgeAgentError as exc:
                log.warning("calibration: skipping %s: %s", path, exc)
        return None

    def rewind(self) -> None:
        self._iter = iter(self._paths)


@dataclass(frozen=True)
class QuantizeOptions:
    """What :func:`quantize_onnx` quantizes; read from the manifest's ``metadata.quantize`` (see the module doc)."""

    nodes_to_exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] | None = None
    """Only these op types get QDQ (None: every type onnxruntime can quantize)."""
    exclude_depthwise: bool = False
    """Keep depthwise convolutions (group == input channels) in float."""
    float_tail: bool = False
    """Keep in float every node between the last convolutions and the graph outputs (decoders, concatenations of
    outputs with different ranges, distance searches)."""
    float_last_convs: bool = False
    """With ``float_tail``: the convolutions that feed the tail stay in float too (their outputs are the raw
    logits / box offsets)."""
    per_channel: bool = True
    reduce_range: bool = True
    calibration: str = "percentile"
    percentile: float = 99.999
    """With percentile calibration: the share of calibration values (per tensor) that the range covers."""

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> QuantizeOptions:
        doc = manifest.metadata.get("quantize", {})
        if not isinstance(doc, dict):
            raise ManifestError(f"{manifest.name}: metadata.quantize must be an object")
        unknown = set(doc) - {f.name for f in fields(cls)}
        if unknown:
            raise ManifestError(f"{manifest.name}: metadata.quantize: unknown keys {sorted(unknown)}")
        calibration = str(doc.get("calibration", cls.calibration))
        if calibration not in CALIBRATION_METHODS:
            raise ManifestError(f"{manifest.name}: metadata.quantize.calibration must be one of {CALIBRATION_METHODS}")
        op_types = doc.get("op_types")
        return cls(
            nodes_to_exclude=tuple(str(n) for n in doc.get("nodes_to_exclude", [])),
            op_types=tuple(str(t) for t in op_types) if op_types is not None else None,
            exclude_depthwise=bool(doc.get("exclude_depthwise", False)),
            float_tail=bool(doc.get("float_tail", False)),
            float_last_convs=bool(doc.get("float_last_convs", False)),
            per_channel=bool(doc.get("per_channel", True)),
            reduce_range=bool(doc.get("reduce_range", True)),
            calibration=calibration,
            percentile=float(doc.get("percentile", cls.percentile)),
        )


CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def drop_initializer_inputs(path: Path) -> int:
    """Drop graph inputs that are initializers (old PyTorch exports list every weight as an input); returns how many.

    onnxruntime treats such a weight as overridable, so it neither constant-folds it nor fuses the convolutions
    and batch norms around it. On NanoDet-m (185 weights listed as inputs) this made ``session.run`` 9.1 ms instead
    of 6.9 ms on a 2-core Zen 5, with the same outputs (max difference 3e-6). The file is rewritten only if needed.
    """
    import onnx

    model = onnx.load(str(path))
    dropped = _drop_initializer_inputs(model)
    if dropped:
        onnx.save(model, str(path))
    return dropped


def _drop_initializer_inputs(model: Any) -> int:
    weights = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in weights]
    dropped = len(model.graph.input) - len(keep)
    if dropped:
        del model.graph.input[:]
        model.graph.input.extend(keep)
    return dropped


def prepare_for_quantization(model: Any) -> list[str]:
    """Fix an in-memory ``onnx.ModelProto`` so that its QDQ version runs; returns what was changed.

    - Opset < 13 -> 13: per-channel ``DequantizeLinear`` needs the ``axis`` attribute.
    - ``Resize`` with an empty ``roi`` initializer -> roi omitted (``""``). With the roi present, onnxruntime's
      NHWC layout pass for a quantized Resize (ORT_ENABLE_ALL) gathers from the empty tensor and the session
      fails at run time (``Gather ... idx=0 must be within the inclusive range [0,-1]``, NanoDet).
    - Weights listed as graph inputs -> inputs removed (see :func:`drop_initializer_inputs`): otherwise the FP32
      side of the comparison is needlessly slow, and the quantized graph keeps them as inputs too.
    """
    import onnx
    from onnx import numpy_helper, version_converter

    changes: list[str] = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)
    if opset < 13:
        converted = version_converter.convert_version(model, 13)
        model.CopyFrom(converted)
        changes.append(f"opset {opset} -> 13")
    dropped = _drop_initializer_inputs(model)
    if dropped:
        changes.append(f"{dropped} weights listed as graph inputs: removed from the inputs")
    empty = {i.name for i in model.graph.initializer if numpy_helper.to_array(i).size == 0}
    for node in model.graph.node:
        if node.op_type == "Resize" and len(node.input) > 1 and node.input[1] in empty:
            node.input[1] = ""
            changes.append(f"{node.name or node.output[0]}: empty Resize roi dropped")
    if changes:
        onnx.checker.check_model(model)
    return changes


def nodes_kept_float(model: Any, options: QuantizeOptions) -> list[str]:
    """Names of the nodes of ``model`` (after pre-processing) that stay in float.

    A listed name also covers the nodes onnxruntime's optimiser made from it (``name/MatMulAddFusion``): the
    pre-processing renames fused nodes, which otherwise slip out of the exclusion.
    """
    from onnx import numpy_helper

    listed = set(options.nodes_to_exclude)
    if options.float_tail:
        listed |= tail_nodes(model, options.float_last_convs)
    inits = {i.name: i for i in model.graph.initializer}
    kept: list[str] = []
    for node in model.graph.node:
        name = node.name
        if name in listed or (name.split("/", 1)[0] in listed and "Fusion" in name):
            kept.append(name)
        elif options.exclude_depthwise and node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if group > 1 and numpy_helper.to_array(inits[node.input[1]]).shape[1] == 1:
                kept.append(name)
    return kept


CONV_OPS = frozenset({"Conv", "ConvTranspose"})


def tail_nodes(model: Any, with_last_convs: bool = False) -> set[str]:
    """Names of the nodes from which a graph output is reached without passing a convolution."""
    producer = {out: node for node in model.graph.node for out in node.output}
    tail: set[str] = set()
    seen: set[int] = set()
    stack = [o.name for o in model.graph.output]
    while stack:
        tensor = stack.pop()
        node = producer.get(tensor)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in CONV_OPS:
            if with_last_convs:
                tail.add(node.name)
            continue
        tail.add(node.name)
        stack.extend(i for i in node.input if i)
    return tail


def quantize_onnx(
    bundle: Bundle, calib: Sequence[Path], out_path: Path, method: str | None = None,
    options: QuantizeOptions | None = None,
) -> None:
    """Write the static QDQ INT8 version of ``bundle``'s ONNX model to ``out_path``.

    ``options`` default to the manifest's ``metadata.quantize``; ``method`` (activation range calibration)
    overrides ``options.calibration``.
    Weights use 7 bits (``reduce_range``): on x86 without VNNI the U8S8 kernels add pairs of products in 16 bits,
    which saturates with full-range weights (here it cost the steel classifier 22 points of accuracy).
    Percentile (99.999%) calibration is the default: plain MinMax let a few outlier activations widen the ranges
    and cost the steel classifier ~25 points here.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.inner = _FolderReader(bundle.manifest, calib, decoder_inputs=head is None)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return self.inner.get_next()

        def rewind(self) -> None:
            self.inner.rewind()

    opts = options or QuantizeOptions.from_manifest(bundle.manifest)
    method = method or opts.calibration
    with tempfile.TemporaryDirectory() as tmp:
        source = bundle.onnx_path
        model = onnx.load(str(source))
        head = detector_heads.detach_head(model)  # post-processing in the graph: quantize the body, then put it back
        changes = prepare_for_quantization(model)
        if head is not None:
            changes.append("post-processing detached (kept float)")
        if changes:
            log.info("%s: before quantizing: %s", bundle.name, "; ".join(changes))
            source = Path(tmp) / "fixed.onnx"
            onnx.save(model, str(source))
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # pre-processing is an optimisation; quantize the original if it fails
            log.warning("quant_pre_process failed (%s); quantizing the model as it is", exc)
            shutil.copyfile(source, prepared)
        exclude = nodes_kept_float(onnx.load(str(prepared)), opts)
        try:
            quantize_static(
                str(prepared),
                str(out_path),
                Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(opts.op_types) if opts.op_types is not None else None,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=opts.per_channel,
                reduce_range=opts.reduce_range,
                calibrate_method={
                    "minmax": CalibrationMethod.MinMax,
                    "percentile": CalibrationMethod.Percentile,
                    "entropy": CalibrationMethod.Entropy,
                }[method],
                nodes_to_exclude=exclude or None,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                               "CalibPercentile": opts.percentile},
            )
        except Exception as exc:
            raise QuantizationGateError(f"{bundle.name}: quantization failed: {exc}") from exc
        if head is not None:
            quantized = onnx.load(str(out_path))
            detector_heads.attach_head(quantized, head)
            onnx.save(quantized, str(out_path))


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
) -> GateReport:
    """Quantize, evaluate both, time both; write ``out_dir`` (a bundle named ``out_name``) only if the gate passes.

    Raises QuantizationGateError (with the report in ``.report``) when it refuses.
    """
    say = progress or (lambda _msg: None)
    calib = calibration_images(calib_dir, config.max_calibration_images)
    options = RuntimeOptions(intra_op_threads=config.threads)
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = Path(tmp) / f"{out_name}.onnx"
        say(f"quantizing with {len(calib)} calibration images")
        quantize_onnx(bundle, calib, int8_path, config.calibration)
        fp32_model = Model.load(bundle, options)
        int8_model = Model(bundle.manifest, OrtRuntime(int8_path, options))
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
        _write_bundle(bundle, int8_path, out_dir, out_name, report, calib_dir, eval_dir)
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
    bundle: Bundle, onnx_path: Path, out_dir: Path, name: str, report: GateReport, calib_dir: Path, eval_dir: Path
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model_file = f"{name}.onnx"
    dst = out_dir / model_file
    shutil.copyfile(onnx_path, dst)
    doc = bundle.manifest.model_dump(mode="json")
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
