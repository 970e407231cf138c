"""SiLU in 8 bits on onnxruntime's CPU kernels: why YOLOX-Nano's INT8 twin is not faster than its FP32 model.

    .venv/bin/python -m benchmarks.int8_silu [--quick] [--int8 PATH] [--out benchmarks/results]

Writes ``results/int8_silu[-quick][-TAG].{json,md}``. Two parts, each measured side by side in one run:

1. **One activation** (YOLOX-Nano's 1x64x52x52 head tensor), every way onnxruntime can apply SiLU to it, timed
   call by call in alternating rounds (``edge_agent.toolchain.bench.sample_interleaved``), same thread settings:

   - ``fp32_quickgelu``: float in, ``QuickGelu`` (what onnxruntime fuses the FP32 graph's Sigmoid * Mul into);
   - ``int8_sigmoid_mul``: uint8 in, ``QLinearSigmoid`` then ``QLinearMul`` (what the quantizer's QDQ graph
     becomes);
   - ``int8_float_island``: uint8 in, ``DequantizeLinear`` -> ``QuickGelu`` -> ``QuantizeLinear`` (SiLU left in
     float between int8 convolutions);
   - ``int8_gather_table``: uint8 in, ``Cast`` to int32 -> ``Gather`` from a 256-entry table: the only exact
     one-table 8-bit SiLU that standard operators can express;
   - ``int8_one_table``: ``QLinearLeakyRelu``, one pass of onnxruntime's own 256-entry table kernel: what an
     8-bit SiLU kernel would cost if onnxruntime had one. It has none: its table kernels are fixed to sigmoid
     and leaky ReLU, and ``Swish``/``HardSwish`` take float only.

2. **The model**: onnxruntime's profiler on YOLOX-Nano FP32 and its INT8 twin (quantized here with the
   project's ``toolchain.quantize``, as ``make bench`` does, unless ``--int8`` names one), runs alternating, at
   1 thread and at one thread per core, spinning off (as the agent runs): kernels per run, median kernel time
   per op type, and per convolution block (a Conv plus its SiLU), split into depthwise and pointwise/full
   convolutions.

A benchmark, not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks.run import RESULTS, unshipped_int8
from edge_agent.bundles.bundle import default_models_dir, load_bundle
from edge_agent.toolchain import bench

log = logging.getLogger("benchmarks.int8_silu")
SHAPE = (1, 64, 52, 52)
MODEL = "yolox_nano"


# ------------------------------------------------------------------ part 1: one activation
def _session(model: bytes | str, threads: int, profile: str | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def silu_graphs() -> dict[str, bytes]:
    """The five one-activation graphs (see the module doc), uint8 or float in, same shape."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: Any, dtype: Any) -> Any:
        return numpy_helper.from_array(np.array(value, dtype), name)

    x_scale, x_zero, y_scale, y_zero = 0.05, 128, 0.04, 7  # an activation in [-6.4, 6.35]; SiLU out >= -0.28
    q = [const("xs", x_scale, np.float32), const("xz", x_zero, np.uint8),
         const("ys", y_scale, np.float32), const("yz", y_zero, np.uint8),
         const("ss", 1 / 255, np.float32), const("sz", 0, np.uint8)]
    codes = np.arange(256, dtype=np.float32)
    real = (codes - x_zero) * x_scale
    silu = real / (1 + np.exp(-real))
    table = np.clip(np.round(silu / y_scale) + y_zero, 0, 255).astype(np.uint8)

    def graph(nodes: list[Any], inits: list[Any], dtype: int = TensorProto.UINT8) -> bytes:
        g = helper.make_graph(nodes, "silu", [helper.make_tensor_value_info("x", dtype, list(SHAPE))],
                              [helper.make_tensor_value_info("y", dtype, None)], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        m.ir_version = 8
        return bytes(m.SerializeToString())

    ms = "com.microsoft"
    return {
        "fp32_quickgelu": graph([helper.make_node("QuickGelu", ["x"], ["y"], domain=ms, alpha=1.0)], [],
                                TensorProto.FLOAT),
        "int8_sigmoid_mul": graph([
            helper.make_node("QLinearSigmoid", ["x", "xs", "xz", "ss", "sz"], ["s"], domain=ms),
            helper.make_node("QLinearMul", ["x", "xs", "xz", "s", "ss", "sz", "ys", "yz"], ["y"], domain=ms)], q),
        "int8_float_island": graph([
            helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["f"]),
            helper.make_node("QuickGelu", ["f"], ["g"], domain=ms, alpha=1.0),
            helper.make_node("QuantizeLinear", ["g", "ys", "yz"], ["y"])], q[:4]),
        "int8_gather_table": graph([
            helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT32),
            helper.make_node("Gather", ["table", "i"], ["y"], axis=0)], [numpy_helper.from_array(table, "table")]),
        "int8_one_table": graph([
            helper.make_node("QLinearLeakyRelu", ["x", "xs", "xz", "ys", "yz"], ["y"], domain=ms, alpha=0.1)],
            q[:4]),
    }


def bench_activation(threads: int, budget: bench.Budget) -> dict[str, Any]:
    """Part 1 at ``threads``: p50 microseconds, nanoseconds per element, ratio to fp32_quickgelu."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, SHAPE, dtype=np.uint8)
    real = ((codes.astype(np.float32) - 128) * 0.05).astype(np.float32)
    steps: dict[str, bench.Step] = {}
    for name, graph in silu_graphs().items():
        sess = _session(graph, threads)
        feed = {"x": real if name.startswith("fp32") else codes}
        steps[name] = lambda s=sess, f=feed: (s.run(None, f), None)[1]  # type: ignore[misc]
    res = bench.sample_interleaved(steps, budget)
    base = res["fp32_quickgelu"].p50
    n = int(np.prod(SHAPE))
    return {name: {"p50_us": round(s.p50 * 1000, 1), "ns_per_element": round(s.p50 * 1e6 / n, 3),
                   "vs_fp32_quickgelu": round(s.p50 / base, 3), "n": len(s.total)} for name, s in res.items()}


# ------------------------------------------------------------------ part 2: the model
_TOKEN = re.compile(r"^(.+?)_token_\d+$")
_FUSED = re.compile(r"^(.+?)/\w+Fusion/$")
_NCHWC = re.compile(r"^(.+)_nchwc$")


def _node_of(kernel: str, producer: Mapping[str, str]) -> str:
    """The source graph node a profiled kernel came from (onnxruntime renames fused and re-laid-out nodes)."""
    for pattern in (_TOKEN, _FUSED):
        m = pattern.match(kernel)
        if m:
            return m.group(1)
    m = _NCHWC.match(kernel)
    if m and m.group(1) in producer:
        return producer[m.group(1)]
    return kernel


def conv_blocks(onnx_path: Path) -> dict[str, tuple[str, list[str]]]:
    """Conv name -> (kind, [conv, its Sigmoid, its Mul]); kind ``depthwise`` (group = channels, one input channel
    per filter) or ``conv``."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(onnx_path)).graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    blocks: dict[str, tuple[str, list[str]]] = {}
    for n in g.node:
        if n.op_type != "Conv" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        kind = "depthwise" if group > 1 and numpy_helper.to_array(inits[n.input[1]]).shape[1] == 1 else "conv"
        silu = [c.name for c in consumers[n.output[0]] if c.op_type in ("Sigmoid", "Mul")]
        blocks[n.name] = (kind, [n.name, *silu])
    return blocks


def _feeds(sess: Any) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    for i in sess.get_inputs():
        if len(i.shape):
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            dtype = np.uint8 if "uint8" in i.type else np.float32
            feeds[i.name] = rng.integers(0, 256, shape).astype(dtype)
        else:  # the detection head's thresholds
            feeds[i.name] = np.array(100 if "int" in i.type else 0.3, np.int64 if "int" in i.type else np.float32)
    return feeds


def profile_pair(fp32: Path, int8: Path, threads: int, runs: int) -> dict[str, Any]:
    """Both models profiled in alternating runs at ``threads``; medians per run."""
    import onnx

    producer = {out: n.name for n in onnx.load(str(fp32)).graph.node for out in n.output}
    blocks = conv_blocks(fp32)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {tag: _session(str(p), threads, profile=str(Path(tmp) / tag))
                    for tag, p in (("fp32", fp32), ("int8", int8))}
        feeds = {tag: _feeds(s) for tag, s in sessions.items()}
        warm = 5
        for _ in range(warm + runs):
            for tag, s in sessions.items():
                s.run(None, feeds[tag])
        out: dict[str, Any] = {"threads": threads, "runs": runs}
        per_node: dict[str, dict[str, float]] = {}
        for tag, s in sessions.items():
            events = json.loads(Path(s.end_profiling()).read_text())
            kernels: dict[str, list[float]] = defaultdict(list)
            op_of: dict[str, str] = {}
            run_ms: list[float] = []
            for e in events:
                if e.get("cat") == "Session" and e.get("name") == "model_run":
                    run_ms.append(e["dur"] / 1000)
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    name = e["name"][: -len("_kernel_time")]
                    kernels[name].append(e["dur"] / 1000)
                    op_of[name] = e["args"]["op_name"]
            count = {k: len(v) // (warm + runs) for k, v in kernels.items()}
            med = {k: float(np.median(v[-runs * max(1, count[k]):])) * max(1, count[k]) for k, v in kernels.items()}
            by_op: dict[str, float] = defaultdict(float)
            for k, v in med.items():
                by_op[op_of[k]] += v
            nodes: dict[str, float] = defaultdict(float)
            for k, v in med.items():
                nodes[_node_of(k, producer)] += v
            per_node[tag] = nodes
            out[tag] = {
                "run_ms_p50": round(float(np.median(run_ms[warm:])), 3),
                "kernels_per_run": sum(count.values()),
                "kernel_ms_by_op": {k: round(v, 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]},
            }
    split: dict[str, dict[str, float]] = {}
    for kind in ("conv", "depthwise"):
        members = [names for k, names in blocks.values() if k == kind]

        def ms(tag: str, part: slice, members: list[list[str]] = members) -> list[float]:
            return [sum(per_node[tag].get(n, 0.0) for n in names[part]) for names in members]

        conv_f, conv_q = ms("fp32", slice(0, 1)), ms("int8", slice(0, 1))
        silu_f, silu_q = ms("fp32", slice(1, None)), ms("int8", slice(1, None))
        split[kind] = {
            "blocks": len(members),
            "conv_fp32_ms": round(sum(conv_f), 3), "conv_int8_ms": round(sum(conv_q), 3),
            "silu_fp32_ms": round(sum(silu_f), 3), "silu_int8_ms": round(sum(silu_q), 3),
            "int8_minus_fp32_ms": round(sum(conv_q) + sum(silu_q) - sum(conv_f) - sum(silu_f), 3),
            "convs_slower_in_int8": sum(1 for a, b in zip(conv_f, conv_q, strict=True) if b > a),
            "blocks_slower_in_int8": sum(1 for a, b, c, d in zip(conv_f, conv_q, silu_f, silu_q, strict=True)
                                         if b + d > a + c),
        }
    out["blocks"] = split
    out["run_ratio_int8_fp32"] = round(out["int8"]["run_ms_p50"] / out["fp32"]["run_ms_p50"], 3)
    return out


# ------------------------------------------------------------------ report
def render(doc: dict[str, Any]) -> str:
    lines = [f"# 8-bit SiLU on onnxruntime's CPU kernels ({doc['when']})", "",
             f"{doc['machine']['cpu']}, {doc['machine']['cores']} cores, onnxruntime "
             f"{doc['machine']['versions'].get('onnxruntime', '?')}. Spinning off. p50, side by side.", "",
             f"## One activation, {'x'.join(map(str, SHAPE))} ({int(np.prod(SHAPE)):,} values)", "",
             "| threads | way | p50 µs | ns/value | vs fp32 QuickGelu |", "| --- | --- | --- | --- | --- |"]
    for t, rows in doc["activation"].items():
        for name, r in rows.items():
            lines.append(f"| {t} | {name} | {r['p50_us']} | {r['ns_per_element']} | {r['vs_fp32_quickgelu']} |")
    if doc.get("model"):
        lines += ["", f"## {doc['model_name']}: FP32 vs INT8 (onnxruntime profiler)", "",
                  "Run times here are with the profiler on, which costs per kernel (INT8 runs more kernels); the "
                  "unprofiled INT8/FP32 ratio is `make bench`'s.", "",
                  "| threads | run p50 FP32 / INT8 ms | ratio | kernels per run FP32 / INT8 | blocks"
                  " | conv FP32 / INT8 ms | their SiLU FP32 / INT8 ms | block INT8-FP32 ms"
                  " | convs / blocks slower in INT8 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p in doc["model"]:
            for kind, b in p["blocks"].items():
                lines.append(
                    f"| {p['threads']} | {p['fp32']['run_ms_p50']} / {p['int8']['run_ms_p50']} | "
                    f"{p['run_ratio_int8_fp32']} | {p['fp32']['kernels_per_run']} / {p['int8']['kernels_per_run']} | "
                    f"{b['blocks']} {kind} | {b['conv_fp32_ms']} / {b['conv_int8_ms']} | "
                    f"{b['silu_fp32_ms']} / {b['silu_int8_ms']} | {b['int8_minus_fp32_ms']:+.3f} | "
                    f"{b['convs_slower_in_int8']} / {b['blocks_slower_in_int8']} |")
        lines += ["", "Kernel time by op type (ms per run):", ""]
        for p in doc["model"]:
            for tag in ("fp32", "int8"):
                ops = ", ".join(f"{k} {v}" for k, v in p[tag]["kernel_ms_by_op"].items())
                lines.append(f"- {p['threads']} thread(s), {tag}: {ops}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short budgets (about a minute with quantization)")
    ap.add_argument("--models-dir", type=Path, default=default_models_dir())
    ap.add_argument("--model", default=MODEL, help="the FP32 bundle of part 2 (default: yolox_nano)")
    ap.add_argument("--int8", type=Path, help="its INT8 ONNX file (default: quantize one here)")
    ap.add_argument("--no-model", action="store_true", help="part 1 only")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tag", default="", help="suffix of the result files: results/int8_silu[-quick][-TAG].{json,md}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs per tensor on the root logger
    log.setLevel(logging.INFO)
    budget = bench.QUICK if args.quick else bench.Budget(seconds=4.0, min_reps=50)
    cores = os.cpu_count() or 1
    threads = sorted({1, cores})
    doc: dict[str, Any] = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                           "machine": bench.machine_info(), "shape": list(SHAPE)}
    doc["activation"] = {}
    for t in threads:
        log.info("one activation, %d thread(s)", t)
        doc["activation"][str(t)] = bench_activation(t, budget)
    if not args.no_model:
        fp32 = load_bundle(args.models_dir / args.model)
        with tempfile.TemporaryDirectory() as tmp:
            int8 = args.int8
            if int8 is None:
                log.info("quantizing %s with edge_agent.toolchain.quantize (as make bench does)", fp32.name)
                pairs = unshipped_int8([fp32], Path(tmp))
                if not pairs:
                    raise SystemExit(f"{fp32.name}: could not quantize (no calibration photos under ../shared?)")
                int8 = pairs[0][1].onnx_path
            doc["model_name"] = fp32.name
            doc["model"] = []
            for t in threads:
                log.info("%s FP32 vs INT8, %d thread(s)", fp32.name, t)
                doc["model"].append(profile_pair(fp32.onnx_path, int8, t, runs=20 if args.quick else 100))
    stem = "-".join(p for p in ("int8_silu", "quick" if args.quick else "", args.tag) if p)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    (args.out / f"{stem}.md").write_text(render(doc))
    log.info("wrote %s", args.out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
