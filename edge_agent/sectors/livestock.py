"""Livestock sector: a motion-model tracker, unique and line-crossing counts, zone occupancy and alerts.

Pure numpy and Python: no I/O, no threads, no globals. The tracker keeps state between frames
(that is its job), one state per source, so frames of one source must be fed in order. Tracking
itself (Kalman filter per animal, two-stage ByteTrack-style association) is in
:mod:`edge_agent.sectors.tracking`; this module turns its tracks into farm counts and alerts.

Boxes are (x1, y1, x2, y2) in original-image pixels; zones and the count line are fractions of
the image size so one config fits any camera resolution. The per-frame report is JSON-ready::

    {"tracks": [{"id", "label", "score", "box", "confirmed"}], "in_frame": int,
     "counts": {"unique": int, "by_label": {label: int}, "forward": int, "backward": int},
     "zones": [{"name", "occupancy", "max_count"}],
     "alerts": [{"type": "zone_over_capacity" | "zone_enter" | "line_crossed", ...}]}

Line crossings: a track's side of the line changes only once its centre is more than
:data:`LINE_MARGIN` (a fraction of the image) past the line, so an animal standing on the line is
not counted back and forth; a crossing is counted once the track is confirmed (a crossing made while
it was still unconfirmed counts at confirmation), and only on frames where the animal was seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.sectors.tracking import Observation, Track, Tracker, TrackerSettings, greedy_match
from edge_agent.types import Detection, Result
from edge_agent.vision.postprocess import box_iou

__all__ = [
    "LINE_MARGIN",
    "LineRule",
    "LivestockRules",
    "LivestockTracker",
    "Track",
    "ZoneRule",
    "greedy_match",
    "iou_matrix",
]

LINE_MARGIN = 0.02
"""Hysteresis of the count line, as a fraction of the image height (axis y) or width (axis x)."""


@dataclass(frozen=True)
class ZoneRule:
    name: str
    box: tuple[float, float, float, float]
    """x1, y1, x2, y2 as fractions of the image width and height."""
    max_count: int | None = None
    alert_on_enter: bool = False


@dataclass(frozen=True)
class LineRule:
    axis: str
    """"x": a vertical line at x = position * width; "y": a horizontal line."""
    position: float


@dataclass(frozen=True)
class LivestockRules:
    """Mirrors ``config.LivestockOptions``."""

    labels: tuple[str, ...] = ("cow", "horse", "sheep")
    min_score: float = 0.3
    """Detections below are ignored; from here up to ``high_score`` they only keep tracks alive."""
    high_score: float = 0.5
    """Detections at or above start tracks and are matched first."""
    iou_threshold: float = 0.2
    max_missed: int = 5
    min_hits: int = 2
    count_line: LineRule | None = None
    zones: tuple[ZoneRule, ...] = ()

    def tracker_settings(self) -> TrackerSettings:
        return TrackerSettings(
            high_score=max(self.high_score, self.min_score), low_score=self.min_score,
            match_iou=self.iou_threshold, max_missed=self.max_missed, min_hits=self.min_hits,
        )


def iou_matrix(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4) -> (N, M)."""
    return box_iou(a, b)


@dataclass
class _TrackState:
    """What the counts remember about one track."""

    side: int | None = None
    counted: bool = False
    zones: set[str] = field(default_factory=set)


@dataclass
class _SourceState:
    tracker: Tracker
    extra: dict[int, _TrackState] = field(default_factory=dict)
    unique: int = 0
    by_label: dict[str, int] = field(default_factory=dict)
    forward: int = 0
    backward: int = 0
    over_capacity: set[str] = field(default_factory=set)


class LivestockTracker:
    """Feed it one detection ``Result`` per frame (per source, in order); it returns the report.

    ``timestamp`` (seconds, e.g. the camera's capture time) lets the motion model step over frames the pipeline
    dropped; a frame without one is one typical step. :meth:`tracks` gives the live :class:`Track` objects of a source
    (id, box, score, age/hits/missed, velocity, first_seen/last_seen) for logic built on top.
    """

    def __init__(self, rules: LivestockRules = LivestockRules()) -> None:
        self.rules = rules
        self._labels = {label.casefold() for label in rules.labels}
        self._states: dict[str, _SourceState] = {}

    def tracks(self, source: str = "default") -> list[Track]:
        """The source's tracks after its latest frame (seen or coasting), in id order; do not modify them."""
        state = self._states.get(source)
        return list(state.tracker.tracks) if state is not None else []

    def update(self, result: Result, source: str = "default", timestamp: float | None = None) -> dict[str, Any]:
        rules = self.rules
        state = self._states.get(source)
        if state is None:
            state = self._states[source] = _SourceState(Tracker(rules.tracker_settings()))
        width, height = max(result.image_size[0], 1), max(result.image_size[1], 1)
        observations: Sequence[Observation] = [
            Observation((float(p.box[0]), float(p.box[1]), float(p.box[2]), float(p.box[3])), float(p.score), p.label)
            for p in result.predictions
            if isinstance(p, Detection) and p.label.casefold() in self._labels and p.score >= rules.min_score
        ]
        alerts: list[dict[str, Any]] = []
        seen = state.tracker.update(observations, timestamp)
        alive = {t.id for t in state.tracker.tracks}
        state.extra = {k: v for k, v in state.extra.items() if k in alive}

        for track in seen:
            extra = state.extra.setdefault(track.id, _TrackState())
            if track.confirmed and not extra.counted:
                extra.counted = True
                state.unique += 1
                state.by_label[track.label] = state.by_label.get(track.label, 0) + 1
            self._line(track, extra, state, width, height, alerts)

        visible = [t for t in seen if t.confirmed]
        zones_report = self._zones(visible, state, width, height, alerts)
        return {
            "tracks": [
                {
                    "id": t.id,
                    "label": t.label,
                    "score": round(t.score, 5),
                    "box": [round(v, 1) for v in t.box],
                    "confirmed": t.confirmed,
                }
                for t in seen
            ],
            "in_frame": len(visible),
            "counts": {
                "unique": state.unique,
                "by_label": dict(sorted(state.by_label.items())),
                "forward": state.forward,
                "backward": state.backward,
            },
            "zones": zones_report,
            "alerts": alerts,
        }

    def _line(
        self, track: Track, extra: _TrackState, state: _SourceState, width: int, height: int,
        alerts: list[dict[str, Any]],
    ) -> None:
        line = self.rules.count_line
        if line is None:
            return
        cx, cy = track.center()
        value, size = (cx, width) if line.axis == "x" else (cy, height)
        offset = value - line.position * size
        if abs(offset) <= LINE_MARGIN * size and extra.side is not None:
            return  # on the line: keep the side it had
        side = 1 if offset >= 0 else -1
        if extra.side is None:
            extra.side = side
            return
        if side == extra.side or not track.confirmed:
            return  # until confirmed the side it was born on stays, so an early crossing counts at confirmation
        previous, extra.side = extra.side, side
        direction = "forward" if side > previous else "backward"
        if direction == "forward":
            state.forward += 1
        else:
            state.backward += 1
        alerts.append({"type": "line_crossed", "track_id": track.id, "label": track.label, "direction": direction})

    def _zones(
        self, visible: list[Track], state: _SourceState, width: int, height: int, alerts: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        report: list[dict[str, Any]] = []
        for zone in self.rules.zones:
            zx1, zy1, zx2, zy2 = zone.box[0] * width, zone.box[1] * height, zone.box[2] * width, zone.box[3] * height
            occupancy = 0
            for track in visible:
                cx, cy = track.center()
                inside = zx1 <= cx <= zx2 and zy1 <= cy <= zy2
                zones = state.extra.setdefault(track.id, _TrackState()).zones
                if inside:
                    occupancy += 1
                    if zone.name not in zones and zone.alert_on_enter:
                        alerts.append({"type": "zone_enter", "zone": zone.name, "track_id": track.id})
                    zones.add(zone.name)
                else:
                    zones.discard(zone.name)
            over = zone.max_count is not None and occupancy > zone.max_count
            if over and zone.name not in state.over_capacity:
                alerts.append(
                    {
                        "type": "zone_over_capacity",
                        "zone": zone.name,
                        "occupancy": occupancy,
                        "max_count": zone.max_count,
                    }
                )
            if over:
                state.over_capacity.add(zone.name)
            else:
                state.over_capacity.discard(zone.name)
            report.append({"name": zone.name, "occupancy": occupancy, "max_count": zone.max_count})
        return report
