"""Open-set answer bands (issue 17): the pure band rule, the manifest's ``open_set`` section, the crop verdict's
three bands, the eval band report, and the shipped crop bundle (its thresholds and its bands on sample photos)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from edge_agent.bundles.bundle import load_bundle
from edge_agent.bundles.manifest import parse_manifest
from edge_agent.errors import ManifestError
from edge_agent.sectors.crop import CropOptions, crop_verdict, known_crops
from edge_agent.toolchain.evaluate import band_of, band_report, evaluate_classification, evaluate_unknown
from edge_agent.types import Band, Classification, Result, Timings
from edge_agent.vision.model import Model
from edge_agent.vision.postprocess import open_set_band
from edge_agent.vision.runtime import RuntimeOptions

from .conftest import COCO_DEMO, CROPS

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "models" / "crop_disease"
LABELS = ("Apple___healthy", "Apple___Black_rot", "Bean___bean_rust", "Corn___healthy", "Pepper_bell___healthy")


def result(*scored: tuple[str, float], rejected: bool = False, band: Band | None = None) -> Result:
    preds = tuple(Classification(label, score, i) for i, (label, score) in enumerate(scored))
    return Result("crop", "1", "classification", preds, (256, 256), Timings(), rejected=rejected, band=band)


# ----------------------------------------------------------------------------------------------- pure rule


@pytest.mark.parametrize(
    ("top1", "ood", "unsure_ood", "band"),
    [
        (0.95, 0.0, None, "known"),
        (0.95, 2.0, None, "known"),  # exactly at the threshold: still known
        (0.95, 2.01, None, "unknown"),
        (0.2, 5.0, None, "unknown"),  # unknown wins over unsure
        (0.49, 0.0, None, "unsure"),
        (0.5, 0.0, None, "known"),
        (0.95, 1.5, 1.0, "unsure"),  # in the OOD grey zone
        (0.95, 0.9, 1.0, "known"),
        (0.95, math.nan, None, "unknown"),  # a broken score never gives a confident answer
        (math.nan, 0.0, None, "unsure"),
    ],
)
def test_open_set_band(top1: float, ood: float, unsure_ood: float | None, band: str) -> None:
    assert open_set_band(top1, ood, 2.0, 0.5, unsure_ood) == band


def _manifest_doc() -> dict[str, object]:
    doc = json.loads((BUNDLE / "manifest.json").read_text())
    assert isinstance(doc, dict)
    return doc


def test_manifest_open_set_section_is_validated() -> None:
    doc = _manifest_doc()
    doc["open_set"] = {"unsure_below": 0.6, "unsure_ood": 0.5}
    m = parse_manifest(json.dumps(doc))
    assert m.open_set is not None and m.open_set.unsure_below == 0.6
    for bad, field in [
        ({"unsure_below": 1.5}, "open_set.unsure_below"),
        ({"unsure_below": 0.5, "unsure_ood": 1e9}, "(root)"),
        ({"unsure_below": 0.5, "other": 1}, "open_set.other"),
    ]:
        doc["open_set"] = bad
        with pytest.raises(ManifestError, match=field.replace("(", r"\(").replace(")", r"\)")):
            parse_manifest(json.dumps(doc))
    doc["open_set"] = {"unsure_below": 0.5}
    doc["thresholds"] = {"ood": None}
    with pytest.raises(ManifestError, match="open_set needs"):
        parse_manifest(json.dumps(doc))


# ----------------------------------------------------------------------------------------------- crop verdict


def test_known_crops_in_label_order_once_each() -> None:
    assert known_crops([*LABELS, "not_recognised", "Bean___healthy"]) == ("Apple", "Bean", "Corn", "Pepper_bell")


def test_confident_known_leaf_is_a_diagnosis() -> None:
    v = crop_verdict(result(("Corn___healthy", 0.93), ("Apple___healthy", 0.03), band="known"))
    assert v["band"] == "diagnosis" and v["recognised"] is True and v["label"] == "Corn___healthy"
    assert "top2" not in v and "known_crops" not in v


def test_unsure_answer_carries_the_top_two_and_no_diagnosis() -> None:
    v = crop_verdict(result(("Apple___Black_rot", 0.45), ("Apple___healthy", 0.4), ("Corn___healthy", 0.1),
                            band="unsure"))
    assert v["band"] == "unsure" and v["recognised"] is False and v["label"] == "not_recognised"
    assert [e["label"] for e in v["top2"]] == ["Apple___Black_rot", "Apple___healthy"]
    assert v["top2"][0]["confidence"] == 0.45


def test_unknown_plant_lists_the_known_crops() -> None:
    opts = CropOptions(known_crops=known_crops(LABELS))
    for r in (result(("Apple___healthy", 0.4), rejected=True, band="unknown"),
              result(("Apple___healthy", 0.4), rejected=True),  # a model from before the bands
              result(("not_recognised", 0.9), ("Bean___bean_rust", 0.1))):
        v = crop_verdict(r, {"crop": "Apple"}, opts)
        assert v["band"] == "unknown_plant" and v["recognised"] is False and v["crop"] is None
        assert v["known_crops"] == ["Apple", "Bean", "Corn", "Pepper_bell"]


def test_band_free_result_is_a_diagnosis_unless_under_min_confidence() -> None:
    r = result(("Apple___Apple_scab", 0.3), ("Apple___Black_rot", 0.25))
    assert crop_verdict(r)["band"] == "diagnosis"
    v = crop_verdict(r, options=CropOptions(min_confidence=0.5))
    assert v["band"] == "unsure" and len(v["top2"]) == 2


# ----------------------------------------------------------------------------------------------- eval report


def test_band_report_counts_unsure_and_unknown_as_wrong() -> None:
    rep = band_report(["a", "a", "b", "b", "c"], ["a", "a", "b", "a", "c"],
                      ["known", "unsure", "known", "known", "unknown"])
    assert rep["bands"] == {"known": 3, "unsure": 1, "unknown": 1}
    assert rep["top1_with_rejections"] == 0.4  # 2 right answers out of 5 (unsure and unknown count as wrong)
    assert band_of(True, None) == "unknown" and band_of(False, None) == "known" and band_of(False, "unsure") == "unsure"
    with pytest.raises(ValueError, match="differ"):
        band_report(["a"], ["a"], [])


@pytest.fixture(scope="module")
def crop_model() -> Model:
    return Model.load(load_bundle(BUNDLE), RuntimeOptions(intra_op_threads=1))


def test_shipped_bundle_carries_the_open_set_thresholds(crop_model: Model) -> None:
    m = crop_model.manifest
    assert m.open_set is not None and 0.0 < m.open_set.unsure_below < 1.0
    assert m.thresholds.ood is not None and m.decoder.type == "softmax" and m.decoder.ood_output == "ood"
    loco = m.metadata["open_set"]["leave_one_crop_out"]
    assert set(loco) == {"Apple", "Bean", "Corn", "Pepper_bell", "Strawberry"}


def test_eval_reports_the_three_bands_on_sample_leaves(crop_model: Model, tmp_path: Path) -> None:
    root = tmp_path / "leaves"
    for d in (CROPS / "plantvillage").iterdir():
        if d.is_dir():
            shutil.copytree(d, root / d.name)
    shutil.copytree(CROPS / "ibean" / "bean_rust", root / "bean_rust")
    rep = evaluate_classification(crop_model, root)
    assert sum(rep["bands"].values()) == rep["n_in_domain"] == rep["n"] > 0
    right = sum(1 for s in rep["_scored"] if s.band == "known" and s.truth == s.predicted)
    assert rep["top1_with_rejections"] == round(right / rep["n"], 4)
    assert rep["top1_with_rejections"] <= rep["accuracy"]
    assert rep["bands"]["known"] >= 0.8 * rep["n"]  # sample leaves of known crops are mostly diagnosed
    unknown = evaluate_unknown(crop_model, COCO_DEMO / "images")  # cows and horses: not a crop it knows
    assert unknown["n"] == 5 and unknown["bands"]["unknown"] >= 4 and unknown["rejected"] >= 0.8


def test_every_band_matches_the_crop_schema() -> None:
    from importlib import resources

    import jsonschema

    from edge_agent.protocol import codec

    schema = json.loads(resources.files("edge_agent.protocol").joinpath("schemas").joinpath("crop.json").read_text())
    opts = CropOptions(known_crops=known_crops(LABELS))
    verdicts = [
        crop_verdict(result(("Corn___healthy", 0.93), ("Apple___healthy", 0.03), band="known"), options=opts),
        crop_verdict(result(("Apple___Black_rot", 0.45), ("Apple___healthy", 0.4), band="unsure"), options=opts),
        crop_verdict(result(("Apple___healthy", 0.4), rejected=True, band="unknown"), {"crop": "x"}, opts),
    ]
    assert [v["band"] for v in verdicts] == ["diagnosis", "unsure", "unknown_plant"]
    for v in verdicts:
        jsonschema.validate(json.loads(codec.dumps(v)), schema, cls=jsonschema.Draft202012Validator)
    bad = {**verdicts[1], "recognised": True}  # an unsure answer never claims a diagnosis
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema, cls=jsonschema.Draft202012Validator)
