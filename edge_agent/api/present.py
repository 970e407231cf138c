"""Turn a stored crop result into the farmer-facing answer, in one language. Pure."""

from __future__ import annotations

from typing import Any, Protocol

from edge_agent.api.schemas import AdviceOut, Alternative, Band, Diagnosis, DiagnosisResponse, KnownCrop, RetakeOut
from edge_agent.sectors.advice import AdviceBook
from edge_agent.sectors.crop import NOT_RECOGNISED, split_label


class StoredLike(Protocol):
    """The fields of ``outbox.StoredResult`` used here."""

    @property
    def result_id(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def input_id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def model_version(self) -> str: ...
    @property
    def created_at(self) -> float: ...
    @property
    def body(self) -> dict[str, Any]: ...


def _verdict(body: dict[str, Any]) -> dict[str, Any]:
    """The crop verdict in a stored body; a plain classifier body is read as its top-1 label."""
    sector = body.get("sector")
    if isinstance(sector, dict) and "recognised" in sector:
        return sector
    preds = [p for p in body.get("predictions", []) if isinstance(p, dict) and "label" in p and "score" in p]
    preds.sort(key=lambda p: float(p["score"]), reverse=True)
    top3 = [{"label": str(p["label"]), "confidence": float(p["score"])} for p in preds[:3]]
    best_label = str(top3[0]["label"]) if top3 else NOT_RECOGNISED
    crop, condition = split_label(best_label)
    recognised = crop is not None and not body.get("rejected", False)
    return {
        "label": best_label if recognised else NOT_RECOGNISED,
        "crop": crop if recognised else None,
        "condition": condition if recognised else None,
        "recognised": recognised,
        "confidence": top3[0]["confidence"] if top3 else 0.0,
        "top3": top3,
    }


def _name(book: AdviceBook, label: str, lang: str) -> str:
    advice = book.advice(label, lang)
    return advice.name if advice is not None else label.replace("___", ": ").replace("_", " ")


def _alternative(book: AdviceBook, entry: dict[str, Any], lang: str) -> Alternative:
    label = str(entry.get("label", NOT_RECOGNISED))
    crop, condition = split_label(label)
    return Alternative(
        label=label,
        crop=crop,
        crop_name=book.crop_name(crop, lang),
        name=_name(book, label, lang),
        healthy=condition == "healthy",
        confidence=min(1.0, max(0.0, float(entry.get("confidence", 0.0)))),
    )


BANDS: tuple[Band, ...] = ("diagnosis", "unsure", "unknown_plant", "retake")


def _band(verdict: dict[str, Any], recognised: bool) -> Band:
    """The verdict's answer band; a verdict from before bands: diagnosis, or unknown_plant when not recognised."""
    band = verdict.get("band")
    for known in BANDS:
        if band == known:
            return known
    return "diagnosis" if recognised else "unknown_plant"


def _known_crops(verdict: dict[str, Any], book: AdviceBook, code: str) -> list[KnownCrop]:
    listed = verdict.get("known_crops")
    crops = [str(c) for c in listed if isinstance(c, str)] if isinstance(listed, list) else []
    if not crops:  # the advice book's crops: the labels the crop model is shipped with
        crops = list(dict.fromkeys(c for c, _ in (split_label(label) for label in book.labels) if c is not None))
    return [KnownCrop(crop=c, crop_name=book.crop_name(c, code) or c) for c in crops]


def _retake(verdict: dict[str, Any], book: AdviceBook, code: str) -> tuple[RetakeOut | None, str | None]:
    """(the retake hint, the heading) of a retake verdict."""
    info = verdict.get("retake")
    check = info.get("code") if isinstance(info, dict) else None
    if check not in ("too_dark", "too_bright", "blurry", "leaf_too_small"):
        check = "blurry"  # a retake without a known code: the most common cause
    texts = book.retake(code)
    hint = str(getattr(texts, check)) if texts is not None else check.replace("_", " ")
    return RetakeOut(code=check, hint=hint), (texts.title if texts is not None else None)


def present(stored: StoredLike, book: AdviceBook, lang: str | None) -> DiagnosisResponse:
    """The answer to show for ``stored`` in the best language for ``lang``."""
    code = book.pick_language(lang)
    verdict = _verdict(stored.body)
    recognised = bool(verdict.get("recognised"))
    label = str(verdict.get("label") or NOT_RECOGNISED) if recognised else NOT_RECOGNISED
    crop, condition = split_label(label) if recognised else (None, None)
    advice = book.advice(label, code)
    top3 = [e for e in verdict.get("top3", []) if isinstance(e, dict)][:3]
    timings = stored.body.get("timings_ms", {})
    band = _band(verdict, recognised)
    retake, title = _retake(verdict, book, code) if band == "retake" else (None, None)
    if band == "retake":
        advice = None  # nothing is diagnosed: the answer is how to take a better photo
    return DiagnosisResponse(
        id=stored.result_id,
        input_id=stored.input_id,
        seq=stored.seq,
        created_at=stored.created_at,
        model=stored.model,
        model_version=stored.model_version,
        language=code,
        diagnosis=Diagnosis(
            label=label,
            crop=crop,
            crop_name=book.crop_name(crop, code),
            condition=condition,
            name=title or _name(book, label, code),
            healthy=bool(verdict.get("healthy")) if recognised else False,
            recognised=recognised,
            confidence=min(1.0, max(0.0, float(verdict.get("confidence", 0.0)))),
        ),
        alternatives=[_alternative(book, e, code) for e in top3],
        advice=(
            AdviceOut(description=advice.description, now=list(advice.now), prevention=list(advice.prevention))
            if advice is not None
            else None
        ),
        disclaimer=book.pack(code).disclaimer,
        crop_hint=verdict.get("crop_hint") if isinstance(verdict.get("crop_hint"), str) else None,
        crop_hint_applied=bool(verdict.get("crop_hint_applied")),
        timings_ms={str(k): float(v) for k, v in timings.items()} if isinstance(timings, dict) else {},
        band=band,
        known_crops=_known_crops(verdict, book, code) if band == "unknown_plant" else [],
        retake=retake,
    )
