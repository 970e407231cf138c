"""Run the edge-agent benchmarks and write JSON, Markdown and a PNG chart to benchmarks/results/.

    .venv/bin/python -m benchmarks.run --quick      # make bench-quick, under 2 minutes
    .venv/bin/python -m benchmarks.run              # make bench, the full run

Every bundle found under models/ is measured (see edge_agent/toolchain/bench.py for what and how).
Test JPEGs (1080p, 12 MP) are built at run time by tiling dataset photos from ../shared.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from PIL import Image as PILImage

from benchmarks import report
from edge_agent.bundles.bundle import Bundle, default_models_dir, list_bundle_dirs, load_bundle
from edge_agent.errors import EdgeAgentError
from edge_agent.toolchain import bench
from edge_agent.vision.runtime import RuntimeOptions

log = logging.getLogger("benchmarks")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SHARED_CANDIDATES = (ROOT.parent / "shared", Path("/work/shared"))
SOURCE_GLOBS = (
    "datasets/livestock/coco_demo/images/*.jpg",
    "datasets/crops/ibean/train/*/*.jpg",
    "datasets/inspection/neu_steel/train/*/*.jpg",
    "datasets/livestock/cattle_chute/train/images/*.jpg",
)


def load_sources(per_glob: int = 6) -> tuple[list[Any], str]:
    """Small RGB dataset photos to tile into test images (synthetic texture if no dataset)."""
    for shared in SHARED_CANDIDATES:
        paths: list[Path] = []
        for pattern in SOURCE_GLOBS:
            paths += sorted(shared.glob(pattern))[:per_glob]
        if paths:
            srcs = [np.asarray(PILImage.open(p).convert("RGB")) for p in paths]
            return srcs, f"{len(srcs)} photos from {shared}/datasets (coco_demo, ibean, neu_steel, cattle_chute)"
    where = " or ".join(str(s / "datasets") for s in SHARED_CANDIDATES)
    log.warning("no dataset photos under %s: the test images are tiled from synthetic texture", where)
    return bench.synthetic_sources(), f"synthetic texture (no dataset under {where})"


def pick_agent_models(bundles: list[Bundle]) -> list[Bundle]:
    """One crop, one inspection and one livestock bundle; an INT8 one when it exists (what a board would run)."""
    def find(words: tuple[str, ...]) -> Bundle | None:
        for w in words:  # in order of preference
            hits = [b for b in bundles if w in b.name.lower()]
            hits.sort(key=lambda b: (not bench.is_quantized(b), b.name))
            if hits:
                return hits[0]
        return None

    chosen = [find(("crop", "plant", "leaf", "bean")), find(("steel", "tile", "inspect", "defect", "anomaly")),
              find(("livestock", "cattle", "cow", "yolox", "nanodet"))]
    picked = [b for b in chosen if b is not None]
    for b in bundles:
        if len(picked) >= 3:
            break
        if b not in picked:
            picked.append(b)
    return picked


CALIBRATION = {
    "detection": ("datasets/livestock/coco_demo/images", "datasets/livestock/cattle_chute/train/images"),
    "classification": ("datasets/crops/plantvillage/train", "datasets/crops/ibean/train"),
    "anomaly": ("datasets/inspection/magnetic_tile/train/good", "datasets/inspection/neu_steel/train"),
}


def unshipped_int8(bundles: list[Bundle], tmp: Path, limit: int = 24) -> list[tuple[Bundle, Bundle]]:
    """(fp32, int8) pairs for FP32 bundles without a shipped INT8 twin: quantized here with the project's own
    ``edge_agent.toolchain.quantize.quantize_onnx`` (static QDQ, U8 activations, S8 weights) on dataset photos."""
    from edge_agent.toolchain.quantize import quantize_onnx

    paired = {fp.name for fp, _ in bench.int8_pairs(bundles)}
    pairs: list[tuple[Bundle, Bundle]] = []
    for b in bundles:
        if bench.is_quantized(b) or b.name in paired:
            continue
        calib: list[Path] = []
        for shared in SHARED_CANDIDATES:
            for folder in CALIBRATION.get(b.manifest.task, ()):
                calib += sorted((shared / folder).rglob("*.jpg"))[:limit // 2]
                calib += sorted((shared / folder).rglob("*.png"))[:limit // 2]
            if calib:
                break
        if not calib:
            continue
        name = f"{b.name}_int8_unshipped"
        out = tmp / name
        out.mkdir(parents=True, exist_ok=True)
        try:
            quantize_onnx(b, calib[:limit], out / f"{name}.onnx")  # prepares the graph (opset 13) itself
        except EdgeAgentError as exc:
            log.warning("quantizing %s failed: %s", b.name, exc)
            continue
        manifest = b.manifest.model_copy(update={"name": name, "model_file": f"{name}.onnx"})
        pairs.append((b, Bundle(directory=out, manifest=manifest)))
    return pairs


def outbox_sink(tmp: Path) -> tuple[bench.ResultSink | None, Any]:
    """A result sink writing each result to a real durable outbox (B's), when the module exists."""
    try:
        from edge_agent.delivery.outbox import Outbox
    except ImportError:
        return None, None
    box = Outbox(tmp / "bench-outbox.db", "bench-device")

    def sink(input_id: str, result: Any, doc: dict[str, Any]) -> None:
        box.add_result(input_id, pipeline="bench", model=result.model, model_version=result.model_version, body=doc)

    return sink, box


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short budgets (under 2 minutes in all)")
    ap.add_argument("--models-dir", type=Path, default=default_models_dir())
    ap.add_argument("--model", action="append", default=[], help="only these bundles (folder or manifest name)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tag", default="", help="suffix of the result files: results/<quick|full>[-TAG].{json,md,png}")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads of the latency session (0 = cores)")
    ap.add_argument("--spinning", action=argparse.BooleanOptionalAction, default=False,
                    help="intra-op thread spinning of the latency session (default off, as the agent's service runs)")
    ap.add_argument("--no-outbox", action="store_true", help="leave the outbox write out of the loop")
    ap.add_argument("--quantize-missing", action=argparse.BooleanOptionalAction, default=None,
                    help="also quantize FP32 bundles that ship no INT8 twin and compare (default: on in the full run)")
    ap.add_argument("--twins-dir", type=Path, default=ROOT / "var" / "models",
                    help="extra bundles used only as FP32 twins of shipped INT8 bundles (default: var/models)")
    ap.add_argument("--only-int8", action="store_true", help="only the INT8/FP32 comparisons")
    ap.add_argument("--no-delivery", action="store_true", help="skip the outbox+MQTT and HTTP measurements")
    ap.add_argument("--only-delivery", action="store_true",
                    help="only the outbox+MQTT and HTTP measurements (no per-model timings, INT8 or memory probes)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("edge_agent").setLevel(logging.WARNING)  # not one line per session about missing GPU providers
    t_start = time.perf_counter()
    mode = "quick" if args.quick else "full"
    if args.quantize_missing is None:
        args.quantize_missing = not args.quick
    budget = bench.QUICK if args.quick else bench.FULL
    options = RuntimeOptions(intra_op_threads=args.threads, allow_spinning=args.spinning)
    cfg = bench.BenchConfig(budget=budget, options=options, pipelined_seconds=1.5 if args.quick else 9.0,
                            naive_kinds=("12mp",) if args.quick else ("frame", "1080p", "12mp"))
    bundles: list[Bundle] = []
    for d in list_bundle_dirs(args.models_dir):
        if args.model and d.name not in args.model:
            continue
        try:
            bundles.append(load_bundle(d))
        except EdgeAgentError as exc:
            log.warning("skipping %s: %s", d.name, exc)
    if not bundles:
        log.error("no bundles under %s", args.models_dir)
        return 2
    sources, source_note = load_sources()
    inputs = bench.make_inputs(sources)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp_root = args.out / "tmp"
    tmp_root.mkdir(exist_ok=True)
    doc: dict[str, Any] = {
        "mode": mode,
        "started_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": bench.machine_info(),
        "settings": {
            "latency_session": (
                f"intra_op_threads={options.intra_op_threads or 'cores'}, allow_spinning={options.allow_spinning}, "
                f"graph_optimization={options.graph_optimization}"
            ),
            "budget": budget.__dict__,
            "inputs": inputs.describe(),
            "sources": source_note,
        },
        "models": [],
        "notes": [],
        "loadavg_start": os.getloadavg()[0],
    }
    twins: list[Bundle] = []
    for d in list_bundle_dirs(args.twins_dir):
        try:
            twins.append(load_bundle(d))
        except EdgeAgentError as exc:
            log.warning("skipping twin %s: %s", d.name, exc)
    if args.only_int8:
        bundles_to_time: list[Bundle] = []
        args.no_delivery = True
    elif args.only_delivery:
        bundles_to_time = []
        args.quantize_missing = False
    else:
        bundles_to_time = bundles
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        sink, box = (None, None) if args.no_outbox else outbox_sink(Path(tmp))
        doc["settings"]["outbox_in_loop"] = sink is not None
        try:
            for b in bundles_to_time:
                log.info("benchmarking %s", b.name)
                try:
                    doc["models"].append(bench.bench_model(b, inputs, cfg, sink))
                except EdgeAgentError as exc:  # one broken bundle must not lose the others' figures
                    log.error("%s: %s", b.name, exc)
                    doc.setdefault("failed", []).append({"name": b.name, "error": str(exc)[:300]})
        finally:
            if box is not None:
                box.close()
    shipped = {id(b) for b in bundles}
    for fp32, int8 in [p for p in bench.int8_pairs(bundles + twins) if id(p[1]) in shipped and not args.only_delivery]:
        log.info("INT8 vs FP32: %s / %s", int8.name, fp32.name)
        doc.setdefault("int8_vs_fp32", []).append({**bench.bench_int8(fp32, int8, inputs, cfg), "shipped": True})
    if args.quantize_missing:
        with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
            for fp32, int8 in unshipped_int8(bundles, Path(tmp)):
                log.info("INT8 (not shipped, quantized here) vs FP32: %s", fp32.name)
                try:
                    res = {**bench.bench_int8(fp32, int8, inputs, cfg), "shipped": False}
                except EdgeAgentError as exc:
                    res = {"fp32": fp32.name, "int8": int8.name, "shipped": False, "error": str(exc)[:300]}
                doc.setdefault("int8_vs_fp32", []).append(res)
    if not any(bench.is_quantized(b) for b in bundles):
        doc["notes"].append("No INT8 bundle found under models/.")
    if args.only_int8:
        return _write(doc, args, mode, t_start)
    photo_path = tmp_root / "photo_1080p.jpg"
    photo_path.write_bytes(inputs.photos["1080p"])
    agent = pick_agent_models(bundles)
    log.info("memory and cold start: %s", ", ".join(b.name for b in agent))
    doc["memory"] = {}
    probes: list[tuple[str, list[str]]] = [("one_model", [str(agent[0].directory)]),
                                           ("three_models", [str(b.directory) for b in agent]), ("baseline", [])]
    for key, dirs in [] if args.only_delivery else probes:
        try:
            doc["memory"][key] = bench.probe_process(dirs, str(photo_path))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            log.error("memory probe %s failed: %s", key, exc)
            doc["notes"].append(f"memory probe {key} failed: {str(exc)[:200]}")
    if not args.no_delivery:
        from benchmarks import delivery

        doc.update(delivery.measure(bundles, inputs, quick=args.quick, tmp_root=tmp_root))
    return _write(doc, args, mode, t_start)


def _write(doc: dict[str, Any], args: argparse.Namespace, mode: str, t_start: float) -> int:
    doc["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    doc["loadavg_end"] = os.getloadavg()[0]
    if max(doc["loadavg_start"], doc["loadavg_end"]) > bench.cpu_count():
        doc["notes"].append(
            f"The machine was shared: load average {doc['loadavg_start']:.1f} at start, {doc['loadavg_end']:.1f} "
            f"at end on {bench.cpu_count()} cores. Absolute times are inflated; ratios are side by side."
        )
    doc["targets"] = report.targets(doc)
    stem = args.out / (f"{mode}-{args.tag}" if args.tag else mode)
    stem.with_suffix(".json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    stem.with_suffix(".md").write_text(report.markdown(doc), encoding="utf-8")
    report.chart(doc, stem.with_suffix(".png"))
    sys.stdout.write(report.markdown(doc))
    log.info("wrote %s.{json,md,png} in %.0f s", stem, doc["elapsed_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
