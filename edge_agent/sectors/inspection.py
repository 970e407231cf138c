"""Inspection sector: pass/fail for a part on a line, with a reject signal for the actuator.

Works with the three model tasks:

- classification: the top-1 label fails the part when it is a defect label with enough score;
- detection: any defect detection with enough score fails the part (all defects are listed);
- anomaly: the model's own threshold decides (``AnomalyScore.is_anomalous``).

A result the model rejected as out of its domain fails by default (a camera pointed at the wrong
thing must not pass parts). Pure: no I/O, no globals. The verdict is JSON-ready::

    {"verdict": "pass" | "fail", "passed": bool, "reasons": [str, ...],
     "defects": [{"label", "score", "box"?}], "score": float, "signal": "reject" | None}

``score`` is the highest defect score, or the anomaly score (also on a good part).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge_agent.types import AnomalyScore, Classification, Detection, Result


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

    for anomaly in (p for p in result.predictions if isinstance(p, AnomalyScore)):
        score = max(score, anomaly.score)  # reported on good parts too: operators watch the margin
        if anomaly.is_anomalous:
            defects.append({"label": "anomaly", "score": round(anomaly.score, 6)})
            reasons.append("anomaly_above_threshold")

    passed = not reasons
    return {
        "verdict": "pass" if passed else "fail",
        "passed": passed,
        "reasons": reasons,
        "defects": defects,
        "score": round(score, 6),
        "signal": None if passed else rules.reject_signal,
    }
