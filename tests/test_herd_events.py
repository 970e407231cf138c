"""Livestock events with a fake clock: headcount per interval, animal_stationary, headcount_drop (hysteresis)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.config import LivestockOptions, PipelineConfig
from edge_agent.flow.pipeline import InputItem, capture_time, herd_event_rules, make_sector
from edge_agent.protocol import codec
from edge_agent.sectors.herd_events import (
    FrameView,
    HeadcountDropRule,
    HerdEventRules,
    HerdEvents,
    StationaryRule,
    TrackView,
    _histogram_median_low,
    frame_view,
)
from edge_agent.types import Detection, Result, Timings

W, H = 1000, 500
T0 = 1_800_000_000.0  # a multiple of 60: intervals start on it


def cow(track_id: int, x: float, y: float, size: float = 40.0) -> TrackView:
    """A track whose centre is at (x, y) pixels."""
    return TrackView(track_id, "cow", (x - size, y - size, x + size, y + size))


def frame(*tracks: TrackView, zones: dict[str, int] | None = None, forward: int = 0, backward: int = 0,
          in_frame: int | None = None) -> FrameView:
    return FrameView(W, H, tracks, len(tracks) if in_frame is None else in_frame, zones or {}, forward, backward)


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        resources.files("edge_agent.protocol").joinpath("schemas").joinpath("livestock.json").read_text()
    )
    return loaded


def valid_event(event: dict[str, Any]) -> None:
    data = {"pipeline": "herd", "source": "cam", "input_id": "c-1", "result_id": None, **event}
    event_schema = {"$defs": schema()["$defs"], "$ref": "#/$defs/event_data"}
    jsonschema.validate(json.loads(codec.dumps(data)), event_schema, cls=jsonschema.Draft202012Validator)


def run(events: HerdEvents, frames: list[tuple[float, FrameView]], source: str = "cam") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for ts, f in frames:
        for e in events.update(ts, source, f):
            valid_event(e)
            out.append(e)
    return out


# --- headcount per interval --------------------------------------------------------------------------------------


def test_headcount_is_reported_once_per_interval_not_per_frame() -> None:
    events = HerdEvents(HerdEventRules(report_interval_s=60, stationary=StationaryRule(enabled=False)))
    frames = []
    for i in range(5 * 60 * 2):  # 5 minutes at 2 fps
        ts = T0 + i / 2
        n = 3 if (i // 120) % 2 == 0 else 2  # 3 animals in minutes 0, 2, 4; 2 in minutes 1, 3
        frames.append((ts, frame(*[cow(k + 1, 100 + 200 * k, 250) for k in range(n)], zones={"water": n - 1})))
    reports = run(events, frames)
    assert [r["type"] for r in reports] == ["headcount"] * 4  # the fifth minute is still open
    assert [(r["start"], r["end"]) for r in reports] == [(T0 + 60 * k, T0 + 60 * (k + 1)) for k in range(4)]
    assert [r["count"] for r in reports] == [3, 2, 3, 2]
    assert all(r["frames"] == 120 for r in reports)
    assert [r["zones"] for r in reports][:2] == [[{"name": "water", "count": 2, "min": 2, "max": 2}],
                                                 [{"name": "water", "count": 1, "min": 1, "max": 1}]]
    # the next frame after the fifth minute closes it
    assert [r["start"] for r in events.update(T0 + 300.0, "cam", frame())] == [T0 + 240]


def test_headcount_is_the_median_of_the_frames_so_a_missed_detection_or_a_ghost_does_not_move_it() -> None:
    events = HerdEvents(HerdEventRules(report_interval_s=10))
    counts = [4, 4, 3, 4, 4, 9, 4, 4, 4, 4]  # one missed animal, one burst of false positives
    for i, n in enumerate(counts):
        assert events.update(T0 + i, "cam", frame(in_frame=n)) == []
    (report,) = events.update(T0 + 10, "cam", frame(in_frame=4))
    assert (report["count"], report["min"], report["max"], report["frames"]) == (4, 3, 9, 10)
    # an even number of frames: the lower median, a count that was seen
    events = HerdEvents(HerdEventRules(report_interval_s=10))
    for i, n in enumerate([1, 2, 3, 4]):
        events.update(T0 + i, "cam", frame(in_frame=n))
    assert events.update(T0 + 10, "cam", frame())[0]["count"] == 2


def test_crossings_are_counted_in_the_interval_they_happened_in() -> None:
    events = HerdEvents(HerdEventRules(report_interval_s=10))
    cumulative = [(0, 0), (1, 0), (1, 0), (2, 1), (2, 1), (3, 1), (5, 1)]  # the tracker's counters per frame
    stamps = [1, 3, 9, 11, 12, 19.5, 21]
    reports = []
    for ts, (fw, bw) in zip(stamps, cumulative, strict=True):
        reports += events.update(T0 + ts, "cam", frame(forward=fw, backward=bw))
    assert [(r["crossed_forward"], r["crossed_backward"]) for r in reports] == [(1, 0), (2, 1)]
    (last,) = events.update(T0 + 31, "cam", frame(forward=5, backward=1))
    assert (last["crossed_forward"], last["crossed_backward"]) == (2, 0)


def test_a_gap_without_frames_gives_no_empty_reports_and_time_never_runs_backwards() -> None:
    events = HerdEvents(HerdEventRules(report_interval_s=10))
    events.update(T0 + 1, "cam", frame(in_frame=2))
    (report,) = events.update(T0 + 95, "cam", frame(in_frame=1))  # the camera was away for 90 s
    assert (report["start"], report["count"]) == (T0, 2)
    assert events.update(T0 + 50, "cam", frame(in_frame=1)) == []  # older than the last frame: counted at T0 + 95
    (report,) = events.update(T0 + 100, "cam", frame(in_frame=1))
    assert (report["start"], report["frames"]) == (T0 + 90, 2)


def test_sources_are_independent_and_interval_zero_reports_nothing() -> None:
    events = HerdEvents(HerdEventRules(report_interval_s=10))
    events.update(T0, "a", frame(in_frame=1))
    assert events.update(T0 + 11, "b", frame(in_frame=5)) == []  # b's first frame; a's interval still open
    assert events.update(T0 + 11, "a", frame(in_frame=1))[0]["count"] == 1
    quiet = HerdEvents(HerdEventRules(report_interval_s=0))
    assert [quiet.update(T0 + i * 30, "a", frame(in_frame=1)) for i in range(5)] == [[]] * 5


# --- animal_stationary -------------------------------------------------------------------------------------------

STILL = StationaryRule(after_s=60, radius=0.02, clear_radius=0.05, clear_after_s=3, memory_s=20)


def test_an_animal_that_does_not_move_fires_once_and_clears_when_it_walks_off() -> None:
    events = HerdEvents(HerdEventRules(report_interval_s=0, stationary=STILL))
    # lying still at (500, 250), the box jittering by a few pixels (< 2% of the frame)
    frames = [(T0 + i, frame(cow(7, 500 + (i % 3) * 4, 250 - (i % 2) * 3))) for i in range(200)]
    out = run(events, frames)
    assert len(out) == 1
    fired = out[0]
    assert (fired["type"], fired["state"], fired["track_id"], fired["since"]) == ("animal_stationary", "active", 7, T0)
    assert fired["ts"] == T0 + 60 and fired["duration_s"] == 60.0
    assert fired["position"] == [pytest.approx(0.5, abs=0.02), pytest.approx(0.5, abs=0.02)]
    # it gets up and walks away: cleared once it has been away for clear_after_s
    walk = [(T0 + 200 + i, frame(cow(7, 500 + 60 + 20 * i, 250))) for i in range(10)]
    out = run(events, walk)
    assert [(e["state"], e.get("reason"), e["ts"]) for e in out] == [("cleared", "moved", T0 + 203)]


def test_no_flapping_around_the_radius() -> None:
    events = HerdEvents(HerdEventRules(report_interval_s=0, stationary=STILL))
    run(events, [(T0 + i, frame(cow(1, 500, 250))) for i in range(61)])
    # after it fired, the box swings between 3% and 4% away (beyond radius, inside clear_radius) for minutes,
    # and single frames far away (a bad box) never last clear_after_s
    swing = []
    for i in range(300):
        x = 500 + (30 if i % 2 else 40)
        if i % 50 == 0:
            x = 700
        swing.append((T0 + 61 + i, frame(cow(1, x, 250))))
    assert run(events, swing) == []
    # before it fires: an animal that keeps moving a little more than radius never fires
    events = HerdEvents(HerdEventRules(report_interval_s=0, stationary=STILL))
    assert run(events, [(T0 + i, frame(cow(2, 300 + 25 * (i // 30), 250))) for i in range(600)]) == []


def test_a_lying_animal_that_the_tracker_loses_and_finds_again_under_a_new_id_keeps_one_alert() -> None:
    events = HerdEvents(HerdEventRules(report_interval_s=0, stationary=STILL))
    frames = [(T0 + i, frame(cow(3, 400, 300))) for i in range(40)]
    frames += [(T0 + 40 + i, frame()) for i in range(10)]  # missed for 10 s: the tracker dropped it
    frames += [(T0 + 50 + i, frame(cow(9, 402, 301))) for i in range(60)]  # found again as track 9
    out = run(events, frames)
    assert [(e["state"], e["track_id"], e["since"], e["ts"]) for e in out] == [("active", 9, T0, T0 + 60)]
    # lost for longer than memory_s: cleared as lost; a moving animal elsewhere meanwhile changes nothing
    out = run(events, [(T0 + 110 + i, frame(cow(4, 100 + 10 * i, 100))) for i in range(30)])
    assert [(e["state"], e["reason"], e["track_id"]) for e in out] == [("cleared", "lost", 9)]


def test_two_animals_side_by_side_keep_their_own_timers() -> None:
    events = HerdEvents(HerdEventRules(report_interval_s=0, stationary=STILL))
    frames = [(T0 + i, frame(cow(1, 300, 250), cow(2, 600 + (10 * i if i < 30 else 300), 250))) for i in range(100)]
    out = run(events, frames)
    assert [(e["track_id"], e["since"]) for e in out] == [(1, T0), (2, T0 + 30)]


def test_stationary_can_be_switched_off() -> None:
    events = HerdEvents(HerdEventRules(report_interval_s=0, stationary=StationaryRule(enabled=False, after_s=1)))
    assert run(events, [(T0 + i, frame(cow(1, 300, 250))) for i in range(100)]) == []


# --- headcount_drop ----------------------------------------------------------------------------------------------

DROP = HeadcountDropRule(drop=2, clear_drop=1, after_s=60, clear_after_s=30, smooth_s=10, baseline_s=600)


def counts(start: float, values: list[int], zone: str | None = None) -> list[tuple[float, FrameView]]:
    """One frame a second with these counts (of the whole frame, or of ``zone``)."""
    return [(start + i, frame(in_frame=n) if zone is None else frame(zones={zone: n})) for i, n in enumerate(values)]


def test_a_drop_below_the_expected_count_fires_once_after_after_s_and_clears_above_the_higher_bar() -> None:
    events = HerdEvents(HerdEventRules(report_interval_s=0, headcount_drop=DROP, expected=(("pen", 10),)))
    out = run(events, counts(T0, [10] * 100 + [7] * 200, zone="pen"))
    assert len(out) == 1
    fired = out[0]
    assert (fired["type"], fired["state"], fired["zone"], fired["count"], fired["baseline"]) == (
        "headcount_drop", "active", "pen", 7, 10)
    assert fired["baseline_from"] == "expected"
    # smoothed over 10 s: below from T0+105 (the median turns at half the window), fires 60 s later
    assert fired["since"] == T0 + 105 and fired["ts"] == T0 + 165
    # back to 8 (baseline - drop + 1): still short of the clear bar (9); 9: cleared after clear_after_s
    out = run(events, counts(T0 + 300, [8] * 200 + [9] * 100, zone="pen"))
    assert [(e["state"], e["reason"], e["count"]) for e in out] == [("cleared", "restored", 9)]
    assert out[0]["ts"] == T0 + 500 + 5 + 30


def test_no_flapping_when_the_count_hovers_at_the_bar() -> None:
    events = HerdEvents(HerdEventRules(report_interval_s=0, headcount_drop=DROP, expected=((None, 10),)))
    # dips to the bar (8) for 50 s at a time, never for after_s: nothing
    values = ([10] * 20 + [8] * 50) * 10
    assert run(events, counts(T0, values)) == []
    # once fired, hovering between 8 and 9 around the clear bar, never 9 for clear_after_s: fired once, not cleared
    values = [8] * 80 + ([9] * 20 + [8] * 20) * 10
    out = run(events, counts(T0 + 1000, values))
    assert [e["state"] for e in out] == ["active"]


def test_single_frame_misses_do_not_count_as_a_drop() -> None:
    events = HerdEvents(HerdEventRules(report_interval_s=0, headcount_drop=DROP, expected=((None, 5),)))
    values = [5, 5, 0, 5, 5, 2, 5, 5, 5, 1] * 60  # a frame now and then with animals missed
    assert run(events, counts(T0, values)) == []


def test_a_learned_baseline_is_the_recent_maximum_and_renews_after_baseline_s() -> None:
    events = HerdEvents(HerdEventRules(report_interval_s=0, headcount_drop=DROP, expected=((None, "learn"),)))
    out = run(events, counts(T0, [6] * 300 + [3] * 200))
    assert [(e["state"], e["baseline"], e["baseline_from"], e["count"]) for e in out] == [("active", 6, "learned", 3)]
    # the herd stays at 3: once baseline_s has passed since it fired, 3 is the new normal
    out = run(events, counts(T0 + 500, [3] * 600))
    assert [(e["state"], e["reason"]) for e in out] == [("cleared", "rebaselined")]
    assert out[0]["ts"] == pytest.approx(out[0]["since"] + 60 + 600)
    assert run(events, counts(T0 + 1100, [3] * 900)) == []  # and no new alert against the old level


@given(st.lists(st.integers(0, 40), min_size=1, max_size=200))
def test_the_smoothed_count_is_the_lower_median(values: list[int]) -> None:
    from collections import Counter
    from statistics import median_low

    assert _histogram_median_low(Counter(values), len(values)) == median_low(values)


def test_a_learned_baseline_below_min_baseline_is_not_watched() -> None:
    rule = HeadcountDropRule(drop=1, clear_drop=0, after_s=5, clear_after_s=5, smooth_s=0, min_baseline=3)
    events = HerdEvents(HerdEventRules(report_interval_s=0, headcount_drop=rule, expected=((None, "learn"),)))
    assert run(events, counts(T0, [2] * 50 + [0] * 50)) == []
    assert [e["state"] for e in run(events, counts(T0 + 100, [3] * 50 + [1] * 50))] == ["active"]


# --- the seam with the tracker, the config and the pipeline -------------------------------------------------------


def test_frame_view_reads_the_trackers_report() -> None:
    report = {"tracks": [{"id": 1, "label": "cow", "score": 0.9, "box": [10, 20, 30, 40], "confirmed": True},
                         {"id": 2, "label": "cow", "score": 0.9, "box": [50, 20, 70, 40], "confirmed": False}],
              "in_frame": 1, "counts": {"unique": 1, "by_label": {"cow": 1}, "forward": 3, "backward": 1},
              "zones": [{"name": "crush", "occupancy": 1, "max_count": 1}], "alerts": []}
    view = frame_view(report, (640, 480))
    assert view == FrameView(640, 480, (TrackView(1, "cow", (10.0, 20.0, 30.0, 40.0)),), 1, {"crush": 1}, 3, 1)


def test_config_maps_to_rules_with_validation() -> None:
    opts = LivestockOptions.model_validate({
        "report_interval_s": 30, "expected": "learn",
        "zones": [{"name": "pen", "box": [0, 0, 1, 1], "expected": 12}, {"name": "gate", "box": [0, 0, 0.5, 0.5]}],
        "stationary": {"after_s": 900}, "headcount_drop": {"drop": 2, "clear_drop": 1},
    })
    rules = herd_event_rules(opts)
    assert rules.report_interval_s == 30 and rules.stationary.after_s == 900
    assert rules.expected == ((None, "learn"), ("pen", 12))
    assert (rules.headcount_drop.drop, rules.headcount_drop.clear_drop) == (2, 1)
    defaults = herd_event_rules(LivestockOptions())
    assert defaults.report_interval_s == 60 and defaults.stationary.enabled and defaults.expected == ()
    bad = [
        {"headcount_drop": {"drop": 1, "clear_drop": 1}},  # no hysteresis
        {"stationary": {"radius": 0.1, "clear_radius": 0.05}},
        {"expected": 0},
        {"expected": True},
        {"expected": "lots"},
        {"zones": [{"name": "a", "box": [0, 0, 1, 1]}, {"name": "a", "box": [0, 0, 1, 1]}]},
        {"report_interval_s": -1},
    ]
    for doc in bad:
        with pytest.raises(ValueError):
            LivestockOptions.model_validate(doc)


def test_capture_time_comes_from_the_hint_else_now() -> None:
    def item(hints: dict[str, str]) -> InputItem:
        return InputItem(input_id="x", pipeline="herd", source="s", hints=hints)

    assert capture_time(item({"captured_at": "1800000000.25"})) == 1_800_000_000.25
    for bad in ({}, {"captured_at": "nan"}, {"captured_at": "-5"}, {"captured_at": "soon"}):
        assert abs(capture_time(item(bad)) - __import__("time").time()) < 60


def test_the_livestock_sector_carries_the_events_in_the_result() -> None:
    cfg = PipelineConfig.model_validate({"name": "herd", "kind": "livestock", "model": "det", "livestock": {
        "min_hits": 1, "report_interval_s": 10, "stationary": {"after_s": 5}, "expected": 1,
        "headcount_drop": {"after_s": 3, "clear_after_s": 1, "smooth_s": 0},
        "zones": [{"name": "pen", "box": [0, 0, 1, 1]}]}})
    sector = make_sector(cfg)
    body = json.loads(
        resources.files("edge_agent.protocol").joinpath("schemas").joinpath("livestock.json").read_text())

    validator = jsonschema.Draft202012Validator(body)

    def at(ts: float, boxes: list[tuple[float, float, float, float]]) -> dict[str, Any]:
        res = Result("det", "1", "detection", tuple(Detection("cow", 0.9, 0, b) for b in boxes), (200, 100), Timings())
        out = sector(res, InputItem(input_id=f"f-{ts}", pipeline="herd", source="inbox",
                                    hints={"captured_at": str(T0 + ts)}))
        validator.validate(json.loads(codec.dumps(out)))
        return out

    seen = [at(t, [(10.0, 10.0, 30.0, 30.0)]) for t in range(12)] + [at(12 + t, []) for t in range(6)]
    alerts = [(round(a["ts"] - T0), a["type"], a["state"]) for s in seen for a in s["alerts"]]
    assert alerts == [(5, "animal_stationary", "active"), (15, "headcount_drop", "active")]
    reports = [r for s in seen for r in s["reports"]]
    assert [(r["start"] - T0, r["count"], r["frames"]) for r in reports] == [(0, 1, 10)]
    assert reports[0]["zones"] == [{"name": "pen", "count": 1, "min": 1, "max": 1}]
    assert seen[0]["captured_at"] == T0
