"""The motion-model tracker (Kalman filter + two-stage association) on synthetic boxes, and the livestock counts
built on it. The same tracker on the real chute frames: tests/test_livestock_video.py (marker ``datasets``)."""

from __future__ import annotations

import itertools

import pytest

from edge_agent.sectors.livestock import LineRule, LivestockRules, LivestockTracker
from edge_agent.sectors.tracking import UNCONFIRMED_MAX_MISSED, Observation, Tracker, TrackerSettings
from edge_agent.types import Detection, Result, Timings


def obs(x: float, y: float = 100.0, size: float = 40.0, score: float = 0.9) -> Observation:
    return Observation((x, y, x + size, y + size), score, "cow")


def frame(*boxes: tuple[float, float, float, float], score: float = 0.9) -> Result:
    dets = tuple(Detection("cow", score, 0, b) for b in boxes)
    return Result("m", "1", "detection", dets, (400, 400), Timings())


def test_id_kept_through_two_missed_detections_of_a_fast_animal() -> None:
    """15 px per frame with a 40 px box: after two missed frames the last seen box hardly overlaps the next
    detection (IoU 0.07), so matching on the last box would start a new animal; the predicted box matches."""
    tracker = Tracker(TrackerSettings(min_hits=2, max_missed=3))
    ids = []
    for i in range(12):
        seen = tracker.update([] if i in (6, 7) else [obs(10 + 15 * i)], timestamp=i * 0.2)
        ids += [t.id for t in seen]
    assert set(ids) == {1}
    (track,) = tracker.tracks
    assert track.hits == 10 and track.missed == 0 and track.age == 12
    assert track.first_seen == 0.0 and track.last_seen == pytest.approx(11 * 0.2)
    assert track.velocity[0] == pytest.approx(75.0, rel=0.1)  # 15 px per 0.2 s
    assert abs(track.velocity[1]) < 5.0


def test_a_frame_dropped_upstream_is_a_longer_step() -> None:
    """Timestamps: the pipeline dropped a frame (0.4 s instead of 0.2 s); the motion model steps twice as far."""
    tracker = Tracker(TrackerSettings(min_hits=1))
    for i in range(6):
        tracker.update([obs(10 + 15 * i)], timestamp=i * 0.2)
    (track,) = tracker.tracks
    track.kf.predict(2.0)  # what the tracker must do on its own when the next frame comes 0.4 s later
    expected = track.kf.box[0]
    tracker = Tracker(TrackerSettings(min_hits=1))
    for i in range(6):
        tracker.update([obs(10 + 15 * i)], timestamp=i * 0.2)
    seen = tracker.update([], timestamp=7 * 0.2)  # frame 6 never reached the tracker; frame 7 found nothing
    assert seen == []
    assert tracker.tracks[0].box[0] == pytest.approx(expected)
    assert 10 + 15 * 6 + 5 < expected <= 10 + 15 * 7  # well past where one step would put it (x1 ~100)


def test_missed_track_is_dropped_after_max_missed() -> None:
    tracker = Tracker(TrackerSettings(min_hits=1, max_missed=2))
    tracker.update([obs(10)])
    for _ in range(2):
        assert tracker.update([]) == []
    assert [t.missed for t in tracker.tracks] == [2]
    tracker.update([])
    assert tracker.tracks == []
    assert [t.id for t in tracker.update([obs(10)])] == [2]


def test_low_score_detections_keep_tracks_alive_but_never_start_one() -> None:
    tracker = Tracker(TrackerSettings(high_score=0.6, low_score=0.2, min_hits=1, max_missed=1))
    tracker.update([obs(10)])
    for i in range(1, 5):  # the animal is half hidden: the detector is unsure, for longer than max_missed
        seen = tracker.update([obs(10 + 5 * i, score=0.3)])
        assert [t.id for t in seen] == [1]
    assert tracker.update([obs(300, score=0.3)]) == []  # a low-score box far from any track: nothing new
    assert [t.id for t in tracker.tracks] == [1]


def test_one_frame_flicker_never_becomes_an_animal() -> None:
    tracker = Tracker(TrackerSettings(min_hits=2))
    tracker.update([obs(200)])
    assert [t.confirmed for t in tracker.tracks] == [False]
    for _ in range(UNCONFIRMED_MAX_MISSED):
        tracker.update([])
    assert [t.missed for t in tracker.tracks] == [UNCONFIRMED_MAX_MISSED]
    tracker.update([])
    assert tracker.tracks == []
    tracker.update([obs(200)])  # the same place again later: a new candidate, still not an animal
    assert [(t.id, t.confirmed) for t in tracker.tracks] == [(2, False)]


def test_two_animals_crossing_paths_keep_their_ids() -> None:
    """Two animals walk towards each other along one row and pass (their boxes overlap for three frames)."""
    tracker = Tracker(TrackerSettings(min_hits=2, match_iou=0.2))
    trails: dict[int, list[float]] = {}
    for i in range(16):
        a, b = obs(20 + 20 * i, y=100), obs(340 - 20 * i, y=106)
        for t in tracker.update([a, b], timestamp=i * 0.1):
            trails.setdefault(t.id, []).append(t.box[0])
    assert sorted(trails) == [1, 2]
    for xs in trails.values():
        steps = [b - a for a, b in itertools.pairwise(xs)]
        assert all(s > 0 for s in steps) or all(s < 0 for s in steps), xs  # each id kept one direction


def test_crossing_counted_once_when_the_animal_stands_on_the_line() -> None:
    rules = LivestockRules(labels=("cow",), min_hits=2, count_line=LineRule(axis="y", position=0.5))
    tracker = LivestockTracker(rules)
    alerts = []
    # centre y: 120 ... 190, then it stands around the line (200 +- 6 px, inside the 2% = 8 px margin), then on
    ys = [100, 120, 140, 160, 175, 186, 194, 206, 195, 205, 198, 203, 220, 240, 260]
    for i, y in enumerate(ys):
        alerts += tracker.update(frame((180.0, y, 220.0, y + 40.0)), timestamp=i * 0.2)["alerts"]
    crossings = [a for a in alerts if a["type"] == "line_crossed"]
    assert [(a["track_id"], a["direction"]) for a in crossings] == [(1, "forward")]


def test_crossing_while_missed_is_counted_when_seen_again() -> None:
    rules = LivestockRules(labels=("cow",), min_hits=2, count_line=LineRule(axis="y", position=0.5))
    tracker = LivestockTracker(rules)
    counts = {}
    for i, y in enumerate(range(80, 320, 20)):
        boxes = () if 170 <= y <= 210 else ((180.0, y - 20.0, 220.0, y + 20.0),)  # missed on the line
        counts = tracker.update(frame(*boxes), timestamp=i * 0.2)["counts"]
    assert counts["forward"] == 1 and counts["backward"] == 0 and counts["unique"] == 1


def test_a_crossing_before_confirmation_counts_at_confirmation() -> None:
    rules = LivestockRules(labels=("cow",), min_hits=3, count_line=LineRule(axis="y", position=0.5))
    tracker = LivestockTracker(rules)
    reports = [tracker.update(frame((160.0, y - 50.0, 240.0, y + 50.0))) for y in (170, 210, 240, 260)]
    assert [r["counts"]["forward"] for r in reports] == [0, 0, 1, 1]


def test_livestock_tracker_exposes_its_tracks() -> None:
    tracker = LivestockTracker(LivestockRules(labels=("cow",), min_hits=1))
    tracker.update(frame((10.0, 10.0, 50.0, 50.0)), source="cam", timestamp=100.0)
    tracker.update(frame((14.0, 10.0, 54.0, 50.0)), source="cam", timestamp=100.2)
    (track,) = tracker.tracks("cam")
    assert (track.id, track.hits, track.first_seen, track.last_seen) == (1, 2, 100.0, 100.2)
    assert tracker.tracks("other") == []


def test_pipeline_sector_steps_the_motion_model_by_capture_time() -> None:
    """The sector hands the frames' capture times (``captured_at``) to the tracker: a gap of two frame periods is
    predicted as two steps, so a fast animal is found where it went."""
    from edge_agent.config import PipelineConfig
    from edge_agent.flow.pipeline import InputItem, make_sector

    sector = make_sector(PipelineConfig.model_validate(
        {"name": "herd", "kind": "livestock", "model": "d", "livestock": {"labels": ["cow"], "min_hits": 1}}
    ))
    ids = []
    for i in (0, 1, 2, 3, 4, 5, 7, 8, 10, 11):  # frames 6 and 9 were dropped upstream
        item = InputItem(input_id=str(i), pipeline="herd", source="cam",
                         hints={"frame": str(i), "captured_at": f"{1000.0 + 0.2 * i:.3f}"})
        report = sector(frame((10.0 + 20 * i, 10.0, 50.0 + 20 * i, 50.0)), item)
        ids += [tr["id"] for tr in report["tracks"]]
    assert set(ids) == {1}


def test_a_clock_that_does_not_move_is_one_step() -> None:
    tracker = Tracker(TrackerSettings(min_hits=1))
    for i in range(6):
        seen = tracker.update([obs(10 + 15 * i)], timestamp=500.0)  # a copy's file times: all the same
    assert [t.id for t in seen] == [1]
    assert seen[0].last_seen > seen[0].first_seen


def test_frames_without_a_timestamp_are_one_typical_step() -> None:
    tracker = Tracker(TrackerSettings(min_hits=1))
    for i in range(4):
        tracker.update([obs(10 + 15 * i)], timestamp=100.0 + 0.2 * i)
    tracker.update([obs(10 + 15 * 4)])  # a source that lost its clock for a frame
    seen = tracker.update([obs(10 + 15 * 5)], timestamp=101.0)
    assert [t.id for t in seen] == [1]
    assert seen[0].last_seen == 101.0
    assert seen[0].velocity[0] == pytest.approx(75.0, rel=0.25)
