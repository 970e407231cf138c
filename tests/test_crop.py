"""Crop sector logic (contract 5): labels -> crop, condition, healthy, recognised, confidence, top 3, hints."""

from __future__ import annotations

from edge_agent.sectors.crop import CropOptions, crop_verdict, normalise_crop, split_label
from edge_agent.types import Classification, Detection, Result, Timings


def result(*scored: tuple[str, float], rejected: bool = False) -> Result:
    preds = tuple(Classification(label, score, i) for i, (label, score) in enumerate(scored))
    return Result("crop", "1", "classification", preds, (256, 256), Timings(), rejected=rejected)


def test_split_label() -> None:
    assert split_label("Apple___Apple_scab") == ("Apple", "Apple_scab")
    assert split_label("Corn___Cercospora_leaf_spot_Gray_leaf_spot") == ("Corn", "Cercospora_leaf_spot_Gray_leaf_spot")
    assert split_label("not_recognised") == (None, "not_recognised")
    assert split_label("___x") == (None, "___x")
    assert normalise_crop("Pepper, bell") == normalise_crop("pepper_bell") == "pepperbell"


def test_diseased_leaf() -> None:
    v = crop_verdict(result(("Corn___Common_rust", 0.9), ("Corn___healthy", 0.06), ("Apple___Black_rot", 0.02)))
    assert v["crop"] == "Corn" and v["condition"] == "Common_rust" and v["label"] == "Corn___Common_rust"
    assert v["healthy"] is False and v["recognised"] is True and v["confidence"] == 0.9
    assert [e["label"] for e in v["top3"]] == ["Corn___Common_rust", "Corn___healthy", "Apple___Black_rot"]
    assert v["top3"][1]["healthy"] is True
    assert v["crop_hint"] is None and v["crop_hint_applied"] is False


def test_healthy_leaf_and_unsorted_predictions() -> None:
    v = crop_verdict(result(("Bean___bean_rust", 0.2), ("Bean___healthy", 0.75)))
    assert v["label"] == "Bean___healthy" and v["healthy"] is True and v["confidence"] == 0.75


def test_rejected_result_is_not_a_recognised_leaf() -> None:
    v = crop_verdict(result(("Apple___healthy", 0.4), ("Bean___healthy", 0.3), rejected=True))
    assert v["recognised"] is False and v["label"] == "not_recognised" and v["crop"] is None and v["healthy"] is False


def test_ood_label_on_top_is_not_a_recognised_leaf_even_with_a_hint() -> None:
    v = crop_verdict(result(("not_recognised", 0.9), ("Bean___healthy", 0.08)), {"crop": "Bean"})
    assert v["recognised"] is False and v["label"] == "not_recognised"
    assert [e["label"] for e in v["top3"]] == ["Bean___healthy"]


def test_low_confidence_is_not_recognised_when_configured() -> None:
    r = result(("Apple___Apple_scab", 0.3), ("Apple___Black_rot", 0.25))
    assert crop_verdict(r)["recognised"] is True
    assert crop_verdict(r, options=CropOptions(min_confidence=0.5))["recognised"] is False


def test_crop_hint_reranks_within_the_named_crop() -> None:
    r = result(("Apple___Black_rot", 0.5), ("Bean___bean_rust", 0.3), ("Bean___angular_leaf_spot", 0.1))
    v = crop_verdict(r, {"crop": " bean "})
    assert v["crop_hint_applied"] is True and v["crop_hint"] == "Bean"
    assert v["label"] == "Bean___bean_rust" and v["confidence"] == 0.3  # the model's own probability
    assert [e["label"] for e in v["top3"]] == ["Bean___bean_rust", "Bean___angular_leaf_spot"]


def test_crop_hint_is_ignored_when_the_model_sees_almost_none_of_that_crop() -> None:
    r = result(("Apple___Black_rot", 0.97), ("Bean___bean_rust", 0.01))
    v = crop_verdict(r, {"crop": "Bean"})
    assert v["crop_hint_applied"] is False and v["label"] == "Apple___Black_rot"
    unknown = crop_verdict(r, {"crop": "Cassava" + "x" * 200})
    assert unknown["crop_hint_applied"] is False and len(unknown["crop_hint"]) == 64


def test_non_classification_predictions_are_ignored() -> None:
    det = Detection("cow", 0.9, 0, (0, 0, 1, 1))
    r = Result("m", "1", "detection", (det,), (10, 10), Timings())
    v = crop_verdict(r)
    assert v["recognised"] is False and v["top3"] == []
