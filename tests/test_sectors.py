"""Sector logic: inspection pass/fail and livestock tracking, counting and zones."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edge_agent.sectors.inspection import InspectionRules, inspection_verdict
from edge_agent.sectors.livestock import (
    LineRule,
    LivestockRules,
    LivestockTracker,
    ZoneRule,
    greedy_match,
    iou_matrix,
)
from edge_agent.types import AnomalyRegion, AnomalyScore, Classification, Detection, Prediction, Result, Timings


def result(*preds: Prediction, rejected: bool = False, size: tuple[int, int] = (100, 100)) -> Result:
    task: Any = "detection" if preds and isinstance(preds[0], Detection) else "classification"
    if preds and isinstance(preds[0], AnomalyScore):
        task = "anomaly"
    return Result("m", "1", task, tuple(preds), size, Timings(), rejected=rejected)


def cls(label: str, score: float) -> Classification:
    return Classification(label=label, score=score, index=0)


def det(label: str, box: tuple[float, float, float, float], score: float = 0.9) -> Detection:
    return Detection(label=label, score=score, class_id=0, box=box)


# --- inspection ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "res", "rules", "verdict", "reason"),
    [
        ("good class", result(cls("good", 0.9), cls("crack", 0.1)), InspectionRules(), "pass", None),
        ("defect class", result(cls("crack", 0.8), cls("good", 0.2)), InspectionRules(), "fail", "class:crack"),
        ("weak defect", result(cls("crack", 0.4), cls("good", 0.3)), InspectionRules(), "pass", None),
        (
            "explicit fail list ignores others",
            result(cls("scratch", 0.9)),
            InspectionRules(fail_labels=("crack",)),
            "pass",
            None,
        ),
        ("defect box", result(det("crazing", (1, 2, 30, 40), 0.7)), InspectionRules(), "fail", "defect_detected"),
        ("weak box", result(det("crazing", (1, 2, 30, 40), 0.2)), InspectionRules(), "pass", None),
        ("anomalous", result(AnomalyScore(0.9, 0.5)), InspectionRules(), "fail", "anomaly_above_threshold"),
        ("normal", result(AnomalyScore(0.1, 0.5)), InspectionRules(), "pass", None),
        ("rejected input", result(cls("good", 0.9), rejected=True), InspectionRules(), "fail", "out_of_domain"),
        (
            "rejected allowed",
            result(cls("good", 0.9), rejected=True),
            InspectionRules(fail_when_rejected=False),
            "pass",
            None,
        ),
    ],
)
def test_inspection_verdict(case: str, res: Result, rules: InspectionRules, verdict: str, reason: str | None) -> None:
    out = inspection_verdict(res, rules)
    assert out["verdict"] == verdict, case
    assert out["passed"] is (verdict == "pass")
    if reason is None:
        assert out["reasons"] == [] and out["signal"] is None
    else:
        assert reason in out["reasons"]
        assert out["signal"] == rules.reject_signal


def test_inspection_lists_every_defect_box() -> None:
    res = result(det("crack", (0, 0, 10, 10), 0.9), det("pit", (20, 20, 30, 30), 0.6), det("good", (1, 1, 2, 2)))
    out = inspection_verdict(res)
    assert [d["label"] for d in out["defects"]] == ["crack", "pit"]
    assert out["score"] == pytest.approx(0.9)


# --- livestock -----------------------------------------------------------------------------------------------------


def test_iou_matrix_and_matching() -> None:
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=np.float64)
    b = np.array([[21, 21, 31, 31], [0, 0, 10, 10], [100, 100, 110, 110]], dtype=np.float64)
    iou = iou_matrix(a, b)
    assert iou.shape == (2, 3)
    assert iou[0, 1] == pytest.approx(1.0)
    assert iou[1, 0] == pytest.approx(81 / 119)
    assert iou[0, 2] == 0.0
    assert sorted(greedy_match(iou, 0.3)) == [(0, 1), (1, 0)]
    assert iou_matrix(a[:0], b).shape == (0, 3)


def moving_cow(x: float) -> Result:
    return result(det("cow", (x, 40, x + 20, 60)), size=(200, 100))


def test_tracker_keeps_identity_and_counts_each_animal_once() -> None:
    tracker = LivestockTracker(LivestockRules(min_hits=2))
    reports = [tracker.update(moving_cow(10 + 3 * i)) for i in range(10)]
    ids = {t["id"] for r in reports for t in r["tracks"]}
    assert ids == {1}
    assert reports[0]["counts"]["unique"] == 0  # not confirmed after one frame
    assert reports[-1]["counts"]["unique"] == 1
    assert reports[-1]["counts"]["by_label"] == {"cow": 1}
    assert reports[-1]["in_frame"] == 1


def test_tracker_ignores_other_labels_and_low_scores() -> None:
    tracker = LivestockTracker(LivestockRules(min_hits=1, min_score=0.5))
    rep = tracker.update(result(det("person", (0, 0, 10, 10)), det("cow", (50, 50, 60, 60), 0.2)))
    assert rep["tracks"] == [] and rep["counts"]["unique"] == 0


def test_track_survives_missed_frames_then_expires() -> None:
    tracker = LivestockTracker(LivestockRules(min_hits=1, max_missed=2))
    tracker.update(moving_cow(10))
    tracker.update(result(size=(200, 100)))
    tracker.update(result(size=(200, 100)))
    back = tracker.update(moving_cow(11))
    assert [t["id"] for t in back["tracks"]] == [1]
    for _ in range(3):
        tracker.update(result(size=(200, 100)))
    again = tracker.update(moving_cow(11))
    assert [t["id"] for t in again["tracks"]] == [2]
    assert again["counts"]["unique"] == 2


def test_line_crossing_counted_with_direction() -> None:
    tracker = LivestockTracker(LivestockRules(min_hits=1, count_line=LineRule(axis="x", position=0.5)))
    alerts: list[dict[str, Any]] = []
    for x in range(60, 140, 10):  # centre moves from 70 to 140 across x=100
        alerts += tracker.update(moving_cow(x))["alerts"]
    for x in range(130, 50, -10):
        alerts += tracker.update(moving_cow(x))["alerts"]
    crossings = [a["direction"] for a in alerts if a["type"] == "line_crossed"]
    assert crossings == ["forward", "backward"]


def test_zone_over_capacity_alerts_once_per_episode_and_enter_alerts() -> None:
    zone = ZoneRule(name="trough", box=(0.0, 0.0, 0.5, 1.0), max_count=1, alert_on_enter=True)
    tracker = LivestockTracker(LivestockRules(min_hits=1, zones=(zone,)))
    two = result(det("cow", (10, 10, 30, 30)), det("sheep", (50, 50, 70, 70)), size=(200, 100))
    first = tracker.update(two)
    assert first["zones"] == [{"name": "trough", "occupancy": 2, "max_count": 1}]
    kinds = sorted(a["type"] for a in first["alerts"])
    assert kinds == ["zone_enter", "zone_enter", "zone_over_capacity"]
    second = tracker.update(two)
    assert second["alerts"] == []
    one = tracker.update(result(det("cow", (10, 10, 30, 30)), size=(200, 100)))
    assert one["zones"][0]["occupancy"] == 1 and one["alerts"] == []
    third = tracker.update(two)  # the sheep was only missed for a frame: same track, no second enter alert
    assert [a["type"] for a in third["alerts"]] == ["zone_over_capacity"]


def test_sources_are_tracked_independently() -> None:
    tracker = LivestockTracker(LivestockRules(min_hits=1))
    a = tracker.update(moving_cow(10), source="a")
    b = tracker.update(moving_cow(10), source="b")
    assert a["tracks"][0]["id"] == 1 and b["tracks"][0]["id"] == 1
    assert tracker.update(moving_cow(12), source="a")["counts"]["unique"] == 1


def test_anomaly_score_is_reported_on_good_parts_too() -> None:
    out = inspection_verdict(result(AnomalyScore(0.2, 0.5)))
    assert out["verdict"] == "pass" and out["score"] == pytest.approx(0.2)


# --- inspection: where the anomaly is ---------------------------------------------------------------------------


def _inspection_schema() -> dict[str, Any]:
    import json
    from importlib import resources

    text = resources.files("edge_agent.protocol").joinpath("schemas").joinpath("inspection.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _valid(verdict: dict[str, Any]) -> None:
    import json

    import jsonschema

    from edge_agent.protocol import codec

    jsonschema.validate(json.loads(codec.dumps(verdict)), _inspection_schema(), cls=jsonschema.Draft202012Validator)


def _map_with_blob() -> np.ndarray:
    heat = np.zeros((60, 60), np.float32)
    heat[10:20, 30:50] = 3.0
    return heat


def test_anomaly_regions_become_defect_boxes() -> None:
    regions = (AnomalyRegion((30.0, 10.0, 50.0, 20.0), 3.0, 0.05), AnomalyRegion((0.0, 0.0, 5.0, 5.0), 2.0, 0.01))
    out = inspection_verdict(result(AnomalyScore(3.0, 1.0, heatmap=_map_with_blob(), regions=regions)))
    assert out["verdict"] == "fail" and out["reasons"] == ["anomaly_above_threshold"]
    assert out["defects"] == [
        {"label": "anomaly", "box": [30.0, 10.0, 50.0, 20.0], "score": 3.0, "area": 0.05},
        {"label": "anomaly", "box": [0.0, 0.0, 5.0, 5.0], "score": 2.0, "area": 0.01},
    ]
    assert "heatmap" not in out  # opt-in
    _valid(out)


@pytest.mark.parametrize(("mode", "failed", "attached"), [("never", True, False), ("failed", True, True),
                                                          ("failed", False, False), ("always", False, True)])
def test_heatmap_thumbnail_is_opt_in(mode: Any, failed: bool, attached: bool) -> None:
    score = AnomalyScore(3.0 if failed else 0.5, 1.0, heatmap=_map_with_blob())
    out = inspection_verdict(result(score), InspectionRules(heatmap=mode))
    assert ("heatmap" in out) is attached
    _valid(out)


def test_heatmap_thumbnail_keeps_the_photo_aspect_and_its_levels() -> None:
    import base64
    import io

    from PIL import Image as PILImage

    out = inspection_verdict(result(AnomalyScore(3.0, 1.0, heatmap=_map_with_blob()), size=(200, 100)),
                             InspectionRules(heatmap="failed", heatmap_max_side=64))
    thumb = out["heatmap"]
    assert (thumb["width"], thumb["height"]) == (64, 32)
    assert thumb["min"] == 0.0 and thumb["max"] == 3.0 and thumb["threshold"] == 1.0
    with PILImage.open(io.BytesIO(base64.b64decode(thumb["data"]))) as im:
        assert im.format == "PNG" and im.size == (64, 32) and im.mode == "L"
        px = np.asarray(im)
    assert px[7, 40] == 255 and px[25, 5] == 0  # the blob is white where the map peaks, black elsewhere


def test_heatmap_thumbnail_shrinks_to_its_byte_budget() -> None:
    from edge_agent.sectors.inspection import heatmap_thumbnail

    noise = np.random.default_rng(0).random((60, 60)).astype(np.float32)  # incompressible
    big = heatmap_thumbnail(noise, 0.5, (640, 480), max_side=256, max_bytes=65536)
    small = heatmap_thumbnail(noise, 0.5, (640, 480), max_side=256, max_bytes=1500)
    assert big["width"] == 256
    assert len(__import__("base64").b64decode(small["data"])) <= 1500 and small["width"] < 256
    assert small["width"] / small["height"] == pytest.approx(640 / 480, rel=0.1)
