"""Livestock sector: an IoU tracker, unique and line-crossing counts, zone occupancy and alerts.

Pure numpy and Python: no I/O, no threads, no globals. The tracker keeps state between frames
(that is its job), one state per source, so frames of one source must be fed in order.

Boxes are (x1, y1, x2, y2) in original-image pixels; zones and the count line are fractions of
the image size so one config fits any camera resolution. The per-frame report is JSON-ready::

    {"tracks": [{"id", "label", "score", "box", "confirmed"}], "in_frame": int,
     "counts": {"unique": int, "by_label": {label: int}, "forward": int, "backward": int},
     "zones": [{"name", "occupancy", "max_count"}],
     "alerts": [{"type": "zone_over_capacity" | "zone_enter" | "line_crossed", ...}]}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.types import Detection, Result
from edge_agent.vision.postprocess import box_iou


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
    iou_threshold: float = 0.3
    max_missed: int = 5
    min_hits: int = 2
    count_line: LineRule | None = None
    zones: tuple[ZoneRule, ...] = ()


def iou_matrix(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4) -> (N, M)."""
    return box_iou(a, b)


def greedy_match(iou: npt.NDArray[np.float64], threshold: float) -> list[tuple[int, int]]:
    """Pairs (row, col) by descending IoU, each row and column used once, IoU >= threshold."""
    pairs: list[tuple[int, int]] = []
    if iou.size == 0:
        return pairs
    rows, cols = np.nonzero(iou >= threshold)
    order = np.argsort(-iou[rows, cols], kind="stable")
    used_r: set[int] = set()
    used_c: set[int] = set()
    for k in order:
        r, c = int(rows[k]), int(cols[k])
        if r in used_r or c in used_c:
            continue
        used_r.add(r)
        used_c.add(c)
        pairs.append((r, c))
    return pairs


@dataclass
class Track:
    id: int
    label: str
    score: float
    box: tuple[float, float, float, float]
    hits: int = 1
    missed: int = 0
    confirmed: bool = False
    side: int | None = None
    zones: set[str] = field(default_factory=set)

    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return ((x1 + x2) / 2.0, (y1 + y2) / 2.0)


@dataclass
class _SourceState:
    tracks: list[Track] = field(default_factory=list)
    next_id: int = 1
    unique: int = 0
    by_label: dict[str, int] = field(default_factory=dict)
    forward: int = 0
    backward: int = 0
    over_capacity: set[str] = field(default_factory=set)


class LivestockTracker:
    """Feed it one detection ``Result`` per frame (per source, in order); it returns the report."""

    def __init__(self, rules: LivestockRules = LivestockRules()) -> None:
        self.rules = rules
        self._labels = {label.casefold() for label in rules.labels}
        self._states: dict[str, _SourceState] = {}

    def update(self, result: Result, source: str = "default") -> dict[str, Any]:
        rules = self.rules
        state = self._states.setdefault(source, _SourceState())
        width, height = max(result.image_size[0], 1), max(result.image_size[1], 1)
        dets = [
            p
            for p in result.predictions
            if isinstance(p, Detection) and p.label.casefold() in self._labels and p.score >= rules.min_score
        ]
        alerts: list[dict[str, Any]] = []

        det_boxes = np.array([d.box for d in dets], dtype=np.float64).reshape(-1, 4)
        trk_boxes = np.array([t.box for t in state.tracks], dtype=np.float64).reshape(-1, 4)
        pairs = greedy_match(iou_matrix(trk_boxes, det_boxes), rules.iou_threshold)
        matched_t = {r for r, _ in pairs}
        matched_d = {c for _, c in pairs}
        for r, c in pairs:
            track, det = state.tracks[r], dets[c]
            track.box, track.score, track.label = det.box, det.score, det.label
            track.hits += 1
            track.missed = 0
        for r, track in enumerate(state.tracks):
            if r not in matched_t:
                track.missed += 1
        state.tracks = [t for t in state.tracks if t.missed <= rules.max_missed]
        for c, det in enumerate(dets):
            if c not in matched_d:
                state.tracks.append(Track(id=state.next_id, label=det.label, score=det.score, box=det.box))
                state.next_id += 1

        for track in state.tracks:
            if not track.confirmed and track.hits >= rules.min_hits:
                track.confirmed = True
                state.unique += 1
                state.by_label[track.label] = state.by_label.get(track.label, 0) + 1
            if track.missed == 0:
                self._line(track, state, width, height, alerts)

        visible = [t for t in state.tracks if t.confirmed and t.missed == 0]
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
                for t in state.tracks
                if t.missed == 0
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

    def _line(self, track: Track, state: _SourceState, width: int, height: int, alerts: list[dict[str, Any]]) -> None:
        line = self.rules.count_line
        if line is None:
            return
        cx, cy = track.center()
        value, limit = (cx, line.position * width) if line.axis == "x" else (cy, line.position * height)
        side = 1 if value >= limit else -1
        previous, track.side = track.side, side
        if previous is None or previous == side or not track.confirmed:
            return
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
                if inside:
                    occupancy += 1
                    if zone.name not in track.zones and zone.alert_on_enter:
                        alerts.append({"type": "zone_enter", "zone": zone.name, "track_id": track.id})
                    track.zones.add(zone.name)
                else:
                    track.zones.discard(zone.name)
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
