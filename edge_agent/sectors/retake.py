"""The fourth answer band of a crop verdict: "retake", when the photo failed a quality check.

Pure. :func:`with_quality` takes the verdict ``crop_verdict`` made and the photo-quality report
(``edge_agent.vision.quality.QualityReport.to_dict()``) and returns the verdict to store::

    {..., "quality": {"ok": False, "code": "blurry", "failed": [...], "measures": {...}},
     "band": "retake", "recognised": False, "crop": None, "condition": None, "label": "not_recognised",
     "retake": {"code": "blurry", "hint": "retake.blurry"}}

A photo that passed keeps its verdict (and band) and gains ``quality``. The model's ``top3`` stays in a retake
verdict (for audit and feedback), but nothing is diagnosed: the farmer is told how to take a better photo.
``hint`` names the text in the advice files (``retake.<code>`` in ``edge_agent/sectors/advice/<lang>.yaml``)
and in the farmer page's ``i18n.js``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RETAKE = "retake"
NOT_RECOGNISED = "not_recognised"
RETAKE_CODES: tuple[str, ...] = ("too_dark", "too_bright", "blurry", "leaf_too_small")


def with_quality(verdict: Mapping[str, Any], quality: Mapping[str, Any]) -> dict[str, Any]:
    """``verdict`` with the quality report; the retake band when a check failed."""
    out = {**verdict, "quality": dict(quality)}
    code = quality.get("code")
    if quality.get("ok", True) or code not in RETAKE_CODES:
        return out
    out.update(
        band=RETAKE,
        recognised=False,
        crop=None,
        condition=None,
        label=NOT_RECOGNISED,
        healthy=False,
        retake={"code": code, "hint": f"{RETAKE}.{code}"},
    )
    return out
