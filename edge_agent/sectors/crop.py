"""Crop sector: turn a leaf classifier's result into a diagnosis a farmer can act on.

Labels are PlantVillage style, ``"<Crop>___<condition>"`` (``Apple___Apple_scab``,
``Bean___healthy``). Every verdict has an answer ``band``:

* ``diagnosis``: a known crop, confidently named (``recognised: true``);
* ``unsure``: a known crop is likely but the model is not sure (the result's band is ``unsure``, or the top-1
  probability is under ``CropOptions.min_confidence``): ``top2`` holds the two best answers and the farmer is
  asked for another photo;
* ``unknown_plant``: "not a crop I know" (the model's open-set score is above its threshold: a leaf of
  another plant, or not a leaf at all): ``known_crops`` lists the crops the model knows.

(The photo-quality step may later set a fourth band, ``retake``, see ``sectors/retake.py``.)
Only ``diagnosis`` has ``recognised: true`` and a disease ``label``; the other bands keep ``label:
"not_recognised"`` so readers from before the bands never show a guess as a diagnosis.

Pure: no I/O, no globals. The verdict is a JSON-ready dict (it is stored in the outbox and
published over MQTT next to the raw result)::

    {"band": "diagnosis", "crop": "Apple", "condition": "Apple_scab", "label": "Apple___Apple_scab",
     "healthy": False, "recognised": True, "confidence": 0.93,
     "top3": [{"label", "crop", "condition", "healthy", "confidence"}, ...],
     "crop_hint": "Apple" | None, "crop_hint_applied": bool}
    # unsure: + "top2": [two entries like top3's]; unknown_plant: + "known_crops": ["Apple", "Bean", ...]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from edge_agent.types import Classification, Result

SEPARATOR = "___"
NOT_RECOGNISED = "not_recognised"
HEALTHY = "healthy"
MAX_HINT_CHARS = 64
CropBand = Literal["diagnosis", "unsure", "unknown_plant"]
BAND_OF_RESULT: dict[str, CropBand] = {"known": "diagnosis", "unsure": "unsure", "unknown": "unknown_plant"}


@dataclass(frozen=True)
class CropOptions:
    """Tunable rules of the crop verdict.

    ``min_confidence``: below this top-1 score a known-looking leaf is answered ``unsure`` (the model's own
    ``open_set.unsure_below`` applies as well, through the result's band).
    ``hint_min_mass``: a farmer's crop hint restricts the diagnosis and alternatives to that crop
    only when the model gives that crop at least this much probability in total (otherwise the
    hint is ignored: the photo most likely shows another plant, and saying so is more useful).
    Confidences are always the model's own probabilities, never renormalised.
    ``known_crops``: the crops of the model's label set, listed in ``unknown_plant`` answers
    (:func:`known_crops` of the manifest's labels).
    """

    min_confidence: float = 0.0
    hint_min_mass: float = 0.05
    known_crops: tuple[str, ...] = ()


def known_crops(labels: Iterable[str]) -> tuple[str, ...]:
    """The crops of a label set, in label order, once each: ``["Apple___healthy", "Bean___bean_rust"]`` ->
    ``("Apple", "Bean")``."""
    return tuple(dict.fromkeys(c for c in (split_label(label)[0] for label in labels) if c is not None))


def split_label(label: str) -> tuple[str | None, str]:
    """``"Apple___Apple_scab"`` -> ``("Apple", "Apple_scab")``; labels without a crop -> ``(None, label)``."""
    crop, sep, condition = label.partition(SEPARATOR)
    if not sep or not crop or not condition:
        return None, label
    return crop, condition


def normalise_crop(name: str) -> str:
    """Canonical form used to compare a hint with a label's crop (case, spaces, ``-`` and ``_`` ignored)."""
    return "".join(ch for ch in name.casefold() if ch.isalnum())


def _entry(label: str, confidence: float) -> dict[str, Any]:
    crop, condition = split_label(label)
    return {
        "label": label,
        "crop": crop,
        "condition": condition,
        "healthy": condition == HEALTHY,
        "confidence": round(float(confidence), 4),
    }


def _classifications(result: Result) -> list[Classification]:
    items = [p for p in result.predictions if isinstance(p, Classification)]
    return sorted(items, key=lambda c: c.score, reverse=True)


def crop_verdict(
    result: Result,
    hints: Mapping[str, str] | None = None,
    options: CropOptions = CropOptions(),
) -> dict[str, Any]:
    """Diagnose one leaf photo from a classification ``result``.

    ``hints`` may carry ``crop`` (what the farmer says the plant is). Unknown hints are ignored.
    """
    hints = hints or {}
    ranked = _classifications(result)
    hint_raw = (hints.get("crop") or "").strip()[:MAX_HINT_CHARS]
    hint_key = normalise_crop(hint_raw) if hint_raw else ""
    hint_applied = False
    hint_crop: str | None = None

    candidates = [c for c in ranked if split_label(c.label)[0] is not None]
    scores = [(c.label, c.score) for c in candidates]
    if hint_key:
        matching = [(label, s) for label, s in scores if normalise_crop(split_label(label)[0] or "") == hint_key]
        if matching:
            hint_crop = split_label(matching[0][0])[0]
            mass = sum(s for _, s in matching)
            if mass >= options.hint_min_mass and mass > 0:
                scores = matching  # ranked within the named crop; scores stay the model's own probabilities
                hint_applied = True

    top3 = [_entry(label, s) for label, s in scores[:3]]
    best_any = ranked[0] if ranked else None
    common = {"crop_hint": hint_crop or (hint_raw or None), "crop_hint_applied": hint_applied}
    band = _band(result, ranked, scores, options)
    if band == "diagnosis":
        best = top3[0]
        return {
            "band": band,
            "crop": best["crop"],
            "condition": best["condition"],
            "label": best["label"],
            "healthy": best["healthy"],
            "recognised": True,
            "confidence": best["confidence"],
            "top3": top3,
            **common,
        }
    confidence = best_any.score if best_any is not None else 0.0
    out: dict[str, Any] = {
        "band": band,
        "crop": None,
        "condition": None,
        "label": NOT_RECOGNISED,
        "healthy": False,
        "recognised": False,
        "confidence": round(float(confidence), 4),
        "top3": top3,
        **common,
    }
    if band == "unsure":
        out["top2"] = top3[:2]
    else:
        out["known_crops"] = list(options.known_crops)
    return out


def _band(
    result: Result, ranked: list[Classification], scores: list[tuple[str, float]], options: CropOptions
) -> CropBand:
    """unknown_plant when the model rejected the photo (or has nothing to name), unsure when it is not sure,
    else diagnosis. A result without a band (a model without an open-set section) is sure when not rejected."""
    if result.rejected or result.band == "unknown" or not ranked or not scores:
        return "unknown_plant"
    if ranked[0].label == NOT_RECOGNISED:
        return "unknown_plant"
    if result.band == "unsure" or scores[0][1] < options.min_confidence:
        return "unsure"
    return "diagnosis"
