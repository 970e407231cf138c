"""Measure the inference loop against its physical floor, side by side, in one process.

Reusable by ``benchmarks/run.py`` (the full report) and ``edge-agent bench`` (a board in the
field). Nothing here is a pass/fail test: it returns numbers, and ratios measured in the same
run (interleaved rounds, warm-ups, medians), because absolute timings on shared machines drift.

What is measured per bundle (see issue 6):
- ``floor``: ``session.run`` alone on a prepared tensor, same session; for photos also the fastest
  JPEG decode that still yields the pixels the model needs (OpenCV reduced decode);
- ``loop``: the real path (``Model.predict``/``predict_bytes`` + orjson of ``Result.to_dict()`` +
  an optional result sink such as the outbox) with per-stage percentiles;
- ``naive``: the tutorial loop (Pillow full decode, Pillow resize, numpy normalise, run, numpy
  post-processing that decodes every anchor and runs a per-class NMS);
- ``pipelined``: N worker threads, each with its own single-thread session, on a JPEG stream.

One module per concern: ``stats``, ``settings``, ``inputs``, ``naive``, ``loops``, ``pipelined``, ``int8``, ``machine``;
this package re-exports their public names.
"""

from edge_agent.toolchain.bench.common import PHOTO_SIZES, ResultSink, Stages, Step
from edge_agent.toolchain.bench.inputs import (
    BenchInputs,
    compose,
    encode_jpeg,
    jpeg_size,
    make_inputs,
    reduction_for,
    synthetic_sources,
)
from edge_agent.toolchain.bench.int8 import bench_int8, int8_pairs, is_quantized
from edge_agent.toolchain.bench.loops import OverlappedSink, bench_model
from edge_agent.toolchain.bench.machine import _PROBE, machine_info, probe_child, probe_process
from edge_agent.toolchain.bench.naive import NaiveLoop, resize_size
from edge_agent.toolchain.bench.pipelined import bench_pipelined
from edge_agent.toolchain.bench.settings import BenchConfig, cpu_count, session_of
from edge_agent.toolchain.bench.stats import FULL, QUICK, Budget, Series, Stats, sample_interleaved

__all__ = [
    "FULL",
    "PHOTO_SIZES",
    "QUICK",
    "_PROBE",
    "BenchConfig",
    "BenchInputs",
    "Budget",
    "NaiveLoop",
    "OverlappedSink",
    "ResultSink",
    "Series",
    "Stages",
    "Stats",
    "Step",
    "bench_int8",
    "bench_model",
    "bench_pipelined",
    "compose",
    "cpu_count",
    "encode_jpeg",
    "int8_pairs",
    "is_quantized",
    "jpeg_size",
    "machine_info",
    "make_inputs",
    "probe_child",
    "probe_process",
    "reduction_for",
    "resize_size",
    "sample_interleaved",
    "session_of",
    "synthetic_sources",
]
