"""Static INT8 quantization of an ONNX graph: calibration reader, graph preparation, what stays float, QDQ."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundles.bundle import Bundle
from edge_agent.bundles.manifest import Manifest, decoder_feeds
from edge_agent.errors import EdgeAgentError, InputNotFoundError, ManifestError, QuantizationGateError
from edge_agent.toolchain import detector_heads
from edge_agent.toolchain.evaluate import IMAGE_SUFFIXES
from edge_agent.vision.decode import decode_image
from edge_agent.vision.preprocess import Preprocessor

log = logging.getLogger(__name__)


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
    pre-processing renames fused nodes, which otherwise slip out of the exclusion. Names may hold "/"
    (``s128/pc_cross`` -> ``s128/pc_cross/MatMulAddFusion``).
    """
    from onnx import numpy_helper

    listed = set(options.nodes_to_exclude)
    if options.float_tail:
        listed |= tail_nodes(model, options.float_last_convs)
    inits = {i.name: i for i in model.graph.initializer}
    kept: list[str] = []
    for node in model.graph.node:
        name = node.name
        if name in listed or ("Fusion" in name and name.rsplit("/", 1)[0] in listed):
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


