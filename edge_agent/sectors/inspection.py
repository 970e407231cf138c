"""Inspection sector: pass/fail for a part on a line, with a reject signal for the actuator.

Works with the three model tasks:

- classification: the top-1 label fails the part when it is a defect label with enough score;
- detection: any defect detection with enough score fails the part (all defects are listed);
- anomaly: the model's own threshold decides (``AnomalyScore.is_anomalous``).

A result the model rejected as out of its domain fails by default (a camera pointed at the wrong
thing must not pass parts). Pure: no I/O, no globals. The verdict is JSON-ready::

    {"verdict": "pass" | "fail", "passed": bool, "reasons": [str, ...],
     "defects": [{"label", "score", "box"?, "area"?}], "score": float, "signal": "reject" | None,
     "heatmap"?: {"format": "png", "encoding": "base64", "width", "height", "min", "max", "threshold", "data"}}

``score`` is the highest defect score, or the anomaly score (also on a good part). An anomalous part lists one
``anomaly`` defect per region of its map above the threshold, with its box in original-image pixels (one
defect without a box when the model has no map). ``heatmap`` (opt-in, ``InspectionRules.heatmap``) is a
greyscale PNG of the anomaly map in the photo's aspect: grey level ``v`` means ``min + v / 255 * (max - min)``
in score units, so ``threshold`` is the boundary between pass and fail. JSON Schema:
``edge_agent/protocol/schemas/inspection.json``.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from edge_agent.types import AnomalyScore, Classification, Detection, F32Array, Result


@dataclass(frozen=True)
class InspectionRules:
    """How a prediction becomes pass or fail (mirrors ``config.InspectionOptions``).

    ``fail_labels``: labels that mean a defect; empty means "every label not in ``pass_labels``".
    ``min_score``: a defect prediction below this score does not fail the part.
    """

    fail_labels: tuple[str, ...] = ()
    pass_labels: tuple[str, ...] = ("good", "ok", "pass", "normal")
    min_score: float = 0.5
    fail_when_rejected: bool = True
    reject_signal: str = "reject"
    heatmap: Literal["never", "failed", "always"] = "never"
    heatmap_max_side: int = 64
    heatmap_max_bytes: int = 8192
    anomaly_threshold: float | None = None
    """A product's own anomaly threshold (a line recipe); None: the model's."""

    def is_defect_label(self, label: str) -> bool:
        key = label.casefold()
        if self.fail_labels:
            return key in {f.casefold() for f in self.fail_labels}
        return key not in {p.casefold() for p in self.pass_labels}


def inspection_verdict(result: Result, rules: InspectionRules = InspectionRules()) -> dict[str, Any]:
    """Decide pass or fail for one image of one part."""
    reasons: list[str] = []
    defects: list[dict[str, Any]] = []
    score = 0.0

    if result.rejected and rules.fail_when_rejected:
        reasons.append("out_of_domain")

    classifications = sorted(
        (p for p in result.predictions if isinstance(p, Classification)), key=lambda c: c.score, reverse=True
    )
    if classifications:
        top = classifications[0]
        if rules.is_defect_label(top.label) and top.score >= rules.min_score:
            defects.append({"label": top.label, "score": round(top.score, 5)})
            reasons.append(f"class:{top.label}")
            score = max(score, top.score)

    for det in (p for p in result.predictions if isinstance(p, Detection)):
        if rules.is_defect_label(det.label) and det.score >= rules.min_score:
            defects.append({"label": det.label, "score": round(det.score, 5), "box": [round(v, 1) for v in det.box]})
            score = max(score, det.score)
    if any("box" in d for d in defects):
        reasons.append("defect_detected")

    anomalies = [p for p in result.predictions if isinstance(p, AnomalyScore)]
    for anomaly in anomalies:
        score = max(score, anomaly.score)  # reported on good parts too: operators watch the margin
        threshold = anomaly.threshold if rules.anomaly_threshold is None else rules.anomaly_threshold
        if anomaly.score > threshold:
            if anomaly.regions and rules.anomaly_threshold is None:
                defects.extend({"label": "anomaly", **r.to_dict()} for r in anomaly.regions)
            else:
                defects.append({"label": "anomaly", "score": round(anomaly.score, 6)})
            reasons.append("anomaly_above_threshold")

    passed = not reasons
    verdict: dict[str, Any] = {
        "verdict": "pass" if passed else "fail",
        "passed": passed,
        "reasons": reasons,
        "defects": defects,
        "score": round(score, 6),
        "signal": None if passed else rules.reject_signal,
    }
    want = rules.heatmap == "always" or (rules.heatmap == "failed" and not passed)
    mapped = next((a for a in anomalies if a.heatmap is not None), None)
    if want and mapped is not None and mapped.heatmap is not None:
        threshold = mapped.threshold if rules.anomaly_threshold is None else rules.anomaly_threshold
        if mapped.map_threshold is not None:  # the map is in other units than the score (a fused score)
            threshold = mapped.map_threshold
        verdict["heatmap"] = heatmap_thumbnail(mapped.heatmap, threshold, result.image_size,
                                               rules.heatmap_max_side, rules.heatmap_max_bytes)
    return verdict


def with_defect_type(
    verdict: dict[str, Any], result: Result, *, min_score: float = 0.0, top_k: int = 3
) -> dict[str, Any]:
    """The verdict of a failed part plus what a defect-type classifier (the chain's second model) said about it::

        "defect_type": {"label": str, "score": float, "model": str, "candidates": [{"label", "score"}, ...]}

    ``label`` is ``unknown`` when the top score is below ``min_score``. The pass/fail decision is the gate's:
    the classifier names the defect, it never passes a part."""
    ranked = sorted((p for p in result.predictions if isinstance(p, Classification)), key=lambda c: c.score,
                    reverse=True)
    top = ranked[0] if ranked else None
    label = top.label if top is not None and top.score >= min_score else "unknown"
    return {
        **verdict,
        "defect_type": {
            "label": label,
            "score": round(top.score, 5) if top is not None else 0.0,
            "model": result.model,
            "candidates": [{"label": c.label, "score": round(c.score, 5)} for c in ranked[:top_k]],
        },
    }


def heatmap_thumbnail(
    heatmap: F32Array, threshold: float, image_size: tuple[int, int], max_side: int = 64, max_bytes: int = 8192
) -> dict[str, Any]:
    """A greyscale PNG of ``heatmap`` in the photo's aspect (longest side ``max_side``, shrunk until the PNG is at
    most ``max_bytes``), base64, with the value range it encodes (see the module doc)."""
    from PIL import Image as PILImage

    values = np.nan_to_num(np.asarray(heatmap, dtype=np.float32))
    lo = float(values.min())
    hi = max(float(values.max()), float(threshold), lo + 1e-6)
    grey = np.clip((values - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    w, h = image_size
    side = max(8, max_side)
    while True:
        f = side / max(w, h, 1)
        size = (max(1, round(w * f)), max(1, round(h * f)))
        buf = io.BytesIO()
        PILImage.fromarray(grey, "L").resize(size, PILImage.Resampling.BILINEAR).save(buf, "PNG", optimize=True)
        png = buf.getvalue()
        if len(png) <= max_bytes or side <= 8:
            break
        side = max(8, side * 3 // 4)
    return {
        "format": "png",
        "encoding": "base64",
        "width": size[0],
        "height": size[1],
        "min": round(lo, 6),
        "max": round(hi, 6),
        "threshold": round(float(threshold), 6),
        "data": base64.b64encode(png).decode("ascii"),
    }
