"""The ARM64 check's judgement (scripts/arm64_compare.py): what counts as the same answer on aarch64 as on x86_64."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from scripts.arm64_compare import TOLERANCES, Diff, compare_docs, precision, score_threshold

ROOT = Path(__file__).resolve().parent.parent
FP32 = TOLERANCES["fp32"]
INT8 = TOLERANCES["int8"]


def doc(task: str, predictions: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"image": "/x/a.jpg", "model": "m", "model_version": "1.0.0", "task": task, "image_size": [640, 480],
            "rejected": False, "predictions": predictions, "timings_ms": {"inference": 1.0}, **extra}


def judge(ref: dict[str, Any], got: dict[str, Any], tol: Any = FP32, threshold: float | None = None) -> Diff:
    diff = Diff()
    compare_docs(ref, got, tol, threshold, diff)
    return diff


def classes(*pairs: tuple[str, float]) -> dict[str, Any]:
    return doc("classification", [{"label": lab, "score": s, "index": i} for i, (lab, s) in enumerate(pairs)])


def dets(*items: tuple[str, float, list[float]]) -> dict[str, Any]:
    return doc("detection", [{"label": lab, "score": s, "class_id": 0, "box": box} for lab, s, box in items])


def test_identical_documents_match_with_zero_differences() -> None:
    ref = dets(("cow", 0.9, [10.0, 10.0, 110.0, 90.0]), ("horse", 0.5, [200.0, 20.0, 300.0, 120.0]))
    diff = judge(ref, copy.deepcopy(ref))
    assert (diff.problems, diff.max_score, diff.max_box) == ([], 0.0, 0.0)


def test_timings_and_image_path_are_not_compared() -> None:
    ref = classes(("a", 0.8), ("b", 0.2))
    got = copy.deepcopy(ref)
    got["timings_ms"] = {"inference": 900.0}
    got["image"] = "/elsewhere/a.jpg"
    assert judge(ref, got).problems == []


def test_classification_score_within_and_beyond_tolerance() -> None:
    fp32, int8 = TOLERANCES["fp32"].score, TOLERANCES["int8"].score
    assert int8 > fp32
    ref = classes(("a", 0.8000), ("b", 0.1000))
    assert judge(ref, classes(("a", 0.8 + fp32 / 2), ("b", 0.1 - fp32 / 2))).problems == []
    between = (fp32 + int8) / 2  # beyond FP32's tolerance, within INT8's
    diff = judge(ref, classes(("a", 0.8 + between), ("b", 0.1 - between)))
    assert len(diff.problems) == 2 and diff.max_score == pytest.approx(between)
    assert judge(ref, classes(("a", 0.8 + between), ("b", 0.1 - between)), INT8).problems == []


def test_classification_top_label_must_agree() -> None:
    diff = judge(classes(("a", 0.51), ("b", 0.49)), classes(("b", 0.51), ("a", 0.49)), INT8)
    assert any("top label" in p for p in diff.problems)


def test_classification_tail_may_cross_the_top_k_cut_off_but_not_jump_over_it() -> None:
    ref = classes(("a", 0.90), ("b", 0.05), ("c", 0.021))
    crossed = classes(("a", 0.90), ("b", 0.05), ("d", 0.0205))  # c and d trade places at the cut-off
    assert judge(ref, crossed, INT8).problems == []
    jumped = classes(("a", 0.70), ("b", 0.05), ("d", 0.25))  # d from nowhere to second place
    assert any("only in one" in p for p in judge(ref, jumped, INT8).problems)


def test_rejected_flag_model_and_image_size_must_agree() -> None:
    ref = classes(("a", 0.4))
    got = copy.deepcopy(ref)
    got["rejected"] = True
    got["image_size"] = [480, 640]
    problems = judge(ref, got).problems
    assert any("rejected" in p for p in problems) and any("image_size" in p for p in problems)


def test_detections_are_paired_by_label_and_overlap_not_by_order() -> None:
    ref = dets(("cow", 0.80, [10.0, 10.0, 110.0, 90.0]), ("cow", 0.79, [300.0, 10.0, 400.0, 90.0]))
    got = dets(("cow", 0.7905, [300.2, 10.0, 400.0, 90.1]), ("cow", 0.7998, [10.0, 10.3, 110.0, 90.0]))
    diff = judge(ref, got)
    assert diff.problems == []
    assert diff.max_box == pytest.approx(0.3) and diff.max_score == pytest.approx(0.0005)


def test_detection_box_beyond_tolerance_is_a_mismatch() -> None:
    px = TOLERANCES["fp32"].box_px
    ref = dets(("cow", 0.8, [100.0, 100.0, 300.0, 260.0]))
    assert judge(ref, dets(("cow", 0.8, [100.0 + px - 1, 100.0, 300.0, 260.0]))).problems == []
    diff = judge(ref, dets(("cow", 0.8, [100.0 + px + 2, 100.0, 300.0, 260.0])))
    assert len(diff.problems) == 1 and diff.max_box == pytest.approx(px + 2)


def test_detection_with_another_label_is_unpaired() -> None:
    ref = dets(("cow", 0.8, [10.0, 10.0, 110.0, 90.0]))
    problems = judge(ref, dets(("horse", 0.8, [10.0, 10.0, 110.0, 90.0])), threshold=0.3).problems
    assert len(problems) == 2 and all("only on" in p for p in problems)


def test_unpaired_detection_is_allowed_only_at_the_score_threshold() -> None:
    ref = dets(("cow", 0.8, [10.0, 10.0, 110.0, 90.0]), ("dog", 0.3004, [200.0, 10.0, 260.0, 60.0]))
    got = dets(("cow", 0.8, [10.0, 10.0, 110.0, 90.0]))
    assert judge(ref, got, threshold=0.3).problems == []  # the dog sat on the threshold: one side dropped it
    assert judge(ref, got, threshold=0.2).problems != []  # well above the threshold: a real difference
    assert judge(ref, got, threshold=None).problems != []


def anomaly(score: float, threshold: float = 47.0) -> dict[str, Any]:
    bad = score > threshold
    return doc("anomaly", [{"label": "anomalous" if bad else "good", "score": score, "threshold": threshold,
                            "anomalous": bad}])


def test_anomaly_score_tolerance_is_relative_to_the_score() -> None:
    t = TOLERANCES["fp32"].score
    assert judge(anomaly(30.0), anomaly(30.0 * (1 + t / 3))).problems == []  # relative to 30, not absolute
    diff = judge(anomaly(30.0), anomaly(30.0 * (1 + 2 * t)))
    assert diff.problems and diff.max_score == pytest.approx(2 * t)


def test_anomaly_verdict_may_flip_only_at_the_threshold() -> None:
    assert judge(anomaly(46.99), anomaly(47.01)).problems == []
    assert any("verdict" in p for p in judge(anomaly(40.0), anomaly(50.0), INT8).problems)


def test_error_documents_must_carry_the_same_error() -> None:
    ref = {"image": "/x/a.jpg", "error": {"code": "E_IMAGE", "message": "bad"}}
    assert judge(ref, copy.deepcopy(ref)).problems == []
    got = {"image": "/x/a.jpg", "error": {"code": "E_OTHER", "message": "bad"}}
    assert judge(ref, got).problems


@pytest.mark.parametrize(
    ("bundle", "kind"),
    [("nanodet_m_320", "fp32"), ("nanodet_m_320_int8", "int8"), ("yolox_nano", "fp32"), ("tile_anomaly", "fp32"),
     ("tile_anomaly_int8", "int8"), ("crop_disease", "int8"), ("steel_defects", "int8")],
)
def test_precision_is_read_from_the_shipped_graph(bundle: str, kind: str) -> None:
    assert precision(ROOT / "models" / bundle) == kind


def test_score_threshold_comes_from_the_manifest(tmp_path: Path) -> None:
    assert score_threshold(ROOT / "models" / "yolox_nano") == pytest.approx(0.3)
    assert score_threshold(ROOT / "models" / "nanodet_m_320") == pytest.approx(0.35)
    (tmp_path / "manifest.json").write_text('{"name": "x", "task": "classification"}')
    assert score_threshold(tmp_path) is None
