"""INT8 twins: find each shipped INT8 bundle's FP32 original and time the pair side by side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edge_agent.bundles.bundle import Bundle
from edge_agent.toolchain.bench.common import Step
from edge_agent.toolchain.bench.inputs import BenchInputs
from edge_agent.toolchain.bench.settings import BenchConfig, session_of
from edge_agent.toolchain.bench.stats import sample_interleaved
from edge_agent.types import Image
from edge_agent.vision.model import Model
from edge_agent.vision.runtime import RuntimeOptions


def is_quantized(bundle: Bundle) -> bool:
    meta = bundle.manifest.metadata
    text = " ".join([bundle.manifest.name, bundle.directory.name, str(meta.get("quantization", ""))]).lower()
    return "int8" in text or "qdq" in text or bool(meta.get("quantized"))


def int8_pairs(bundles: Sequence[Bundle]) -> list[tuple[Bundle, Bundle]]:
    """(fp32, int8) bundle pairs: the INT8 one says ``metadata.quantization.from`` (edge_agent.toolchain.quantize), or
    ``fp32_bundle``/``quantized_from``, or is named like the FP32 one plus ``_int8``."""
    by_name = {b.name: b for b in bundles} | {b.directory.name: b for b in bundles}
    pairs: list[tuple[Bundle, Bundle]] = []
    for b in bundles:
        if not is_quantized(b):
            continue
        meta = b.manifest.metadata
        quant = meta.get("quantization")
        ref = meta.get("fp32_bundle") or meta.get("quantized_from")
        if ref is None and isinstance(quant, dict):
            ref = quant.get("from")
        candidates = [str(ref)] if ref else []
        for n in (b.name, b.directory.name):
            for suffix in ("_int8", "-int8", "_qdq", "_u8s8"):
                if n.endswith(suffix):
                    candidates.append(n[: -len(suffix)])
        for c in candidates:
            fp = by_name.get(c)
            if fp is not None and fp is not b and not is_quantized(fp):
                pairs.append((fp, b))
                break
    return pairs


def bench_int8(fp32: Bundle, int8: Bundle, inputs: BenchInputs, cfg: BenchConfig) -> dict[str, Any]:
    """``session.run`` and the frame loop, INT8 vs FP32, same threads, interleaved."""
    out: dict[str, Any] = {"fp32": fp32.name, "int8": int8.name}
    for label, opts in (("latency", cfg.options), ("1thread", RuntimeOptions(
            providers=cfg.options.providers, intra_op_threads=1, allow_spinning=False))):
        steps: dict[str, Step] = {}
        for tag, b in (("fp32", fp32), ("int8", int8)):
            m = Model.load(b, opts)
            m.warmup(1)
            sess = session_of(m)
            feeds = m.feeds(m.preprocessor.run(Image.from_array(inputs.frame, "BGR"))[0].copy())
            steps[f"{tag}_run"] = lambda s=sess, f=feeds: (s.run(None, f), None)[1]  # type: ignore[misc]
            steps[f"{tag}_loop"] = lambda m=m: (m.predict(Image.from_array(inputs.frame, "BGR")), None)[1]  # type: ignore[misc]
        res = sample_interleaved(steps, cfg.budget)
        out[label] = {
            "threads": opts.intra_op_threads,
            **{k: v.to_dict()["total"] for k, v in res.items()},
            "run_ratio": round(res["int8_run"].p50 / res["fp32_run"].p50, 4),
            "loop_ratio": round(res["int8_loop"].p50 / res["fp32_loop"].p50, 4),
        }
    return out


