"""What one stored result means to an operator, read from its payload. Pure: no I/O.

``summarize`` never raises: a payload from an older or foreign agent gives an empty summary.

- ``labels``: every label the result names (predictions, the crop diagnosis, the inspection verdict);
  the API's ``label`` filter matches any of them;
- ``headline``: the one label a dashboard shows (the crop diagnosis, ``pass``/``fail``, the top prediction);
- ``disease``: the crop diagnosis when a recognised leaf is not healthy (the outbreak rule counts these);
- ``defect``: True/False for an inspection verdict (the defect-rate rule), None otherwise;
- ``headcount``: animals in frame for a livestock result (the headcount rule), None otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True)
class Summary:
    kind: str | None = None
    labels: frozenset[str] = frozenset()
    headline: str | None = None
    disease: str | None = None
    defect: bool | None = None
    headcount: int | None = None
    confidence: float | None = None


def summarize(payload: bytes | dict[str, Any]) -> Summary:
    try:
        value = orjson.loads(payload) if isinstance(payload, bytes | bytearray | memoryview) else payload
    except orjson.JSONDecodeError:
        return Summary()
    body = value.get("body") if isinstance(value, dict) else None
    if not isinstance(body, dict):
        return Summary()
    kind = body.get("kind") if isinstance(body.get("kind"), str) else None
    raw = body.get("sector")
    sector: dict[str, Any] = raw if isinstance(raw, dict) else {}
    labels: set[str] = set()
    top: str | None = None
    confidence: float | None = None
    predictions = body.get("predictions")
    if isinstance(predictions, list):
        for p in predictions:
            if isinstance(p, dict) and isinstance(p.get("label"), str):
                labels.add(p["label"])
                if top is None:
                    top = p["label"]
                    score = p.get("score")
                    confidence = float(score) if isinstance(score, int | float) else None
    disease = defect = headcount = None
    headline = top
    if kind == "crop" and isinstance(sector.get("label"), str):
        headline = sector["label"]
        labels.add(headline)
        if sector.get("recognised") is True and sector.get("healthy") is False:
            disease = headline
        if isinstance(sector.get("confidence"), int | float):
            confidence = float(sector["confidence"])
    elif kind == "inspection" and sector.get("verdict") in ("pass", "fail"):
        headline = sector["verdict"]
        labels.add(headline)
        defect = headline == "fail"
    elif kind == "livestock" and isinstance(sector.get("in_frame"), int) and not isinstance(sector["in_frame"], bool):
        headcount = sector["in_frame"]
        headline = f"{headcount} in frame"
    return Summary(kind, frozenset(labels), headline, disease, defect, headcount, confidence)
