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

A graph with its post-processing inside (decoder ``detections``, ``edge_agent.toolchain.detector_heads``) is quantized
without it: the calibrator cannot take the variable-length candidate tensors, and the head stays float anyway; the
head is put back on the quantized body.

An anomaly bundle made by ``edge-agent inspect fit`` (``metadata.fit.config``) is refitted after quantization
(:func:`edge_agent.toolchain.anomaly_fit.refit_banks`): its memory banks, scale statistics and threshold are rebuilt
from the quantized graph's own features of the calibration photos, which must then be the good photos it was fitted
on. Against banks of FP32 features the quantized backbone's features score higher, and the FP32 threshold rejected
about 12% of good tiles instead of 5%.

The gate evaluates the FP32 and the INT8 model on the same labelled folder and times both in the same run,
interleaved. It refuses (:class:`~edge_agent.errors.QuantizationGateError`, nothing written) unless INT8 is
faster and loses at most the budget: ``max_accuracy_drop`` (fraction, 0.01 = 1 point) for classifiers,
``max_auroc_drop`` for anomaly models.

The measurements behind the defaults (which layouts were tried on which model, and how fast) are lab notes in
``benchmarks/README.md`` ("INT8 layouts measured").
"""

from edge_agent.toolchain.quantize.gate import (
    GateConfig,
    GateReport,
    compare_latency,
    decide,
    quantize_and_gate,
    report_calibration,
)
from edge_agent.toolchain.quantize.graph import (
    CALIBRATION_METHODS,
    CONV_OPS,
    QuantizeOptions,
    calibration_images,
    drop_initializer_inputs,
    log,
    nodes_kept_float,
    prepare_for_quantization,
    preprocess_file,
    quantize_onnx,
    tail_nodes,
)

__all__ = [
    "CALIBRATION_METHODS",
    "CONV_OPS",
    "GateConfig",
    "GateReport",
    "QuantizeOptions",
    "calibration_images",
    "compare_latency",
    "decide",
    "drop_initializer_inputs",
    "log",
    "nodes_kept_float",
    "prepare_for_quantization",
    "preprocess_file",
    "quantize_and_gate",
    "quantize_onnx",
    "report_calibration",
    "tail_nodes",
]
