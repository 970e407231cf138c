"""Livestock events a farmer acts on, from the tracker's per-frame output. Pure: no I/O, no threads, no clock.

Time is passed in (the frame's capture time, seconds since the epoch), so the same frames give the same
events however fast they are processed; a frame older than the last one of its source counts as the
last one's time (time never runs backwards). One state per source.

The seam with the tracker is :class:`FrameView` (:func:`frame_view` builds it from the tracker's report):
the confirmed tracks seen in the frame (id, label, box), the occupancy of each zone, the animals in
frame and the cumulative line-crossing counters.

Three kinds of event, each a JSON-ready dict with ``type`` and ``ts`` (the capture time it was decided at):

- ``headcount`` (a report, not an alert): per interval of ``report_interval_s`` (aligned to multiples of
  it since the epoch, so every device's minute is the same minute), for the whole frame and each zone,
  ``count`` = the median (the lower median: always a count that was seen) of the per-frame counts in the
  interval, with ``min``, ``max`` and ``frames``, plus the line crossings in the interval. It is decided
  by the first frame after the interval has ended (an interval without frames gives no report).
- ``animal_stationary`` ("stationary too long", an animal down): a track whose centre stayed within
  ``radius`` (a fraction of the frame: the distance in width and height fractions) of where it was
  anchored for ``after_s`` fires once (``state: active``); it clears (``state: cleared``) when the centre
  is more than ``clear_radius`` (>= ``radius``) away for ``clear_after_s``, or when the animal has not
  been seen for ``memory_s`` (``reason: lost``). A new track id that appears within ``radius`` of an
  unseen stationary spot takes it over (its timer and its alert), so missed detections and id switches
  of a lying animal neither restart the timer nor raise a second alert.
- ``headcount_drop``: per watched target (the whole frame, ``zone: null``, or a zone) with a baseline
  (``expected``: a configured number, or ``learn``: the highest smoothed count of the last
  ``baseline_s``), the smoothed count (median of the per-frame counts of the last ``smooth_s``) at or
  below baseline - ``drop`` for ``after_s`` fires once; it clears when the smoothed count is back at or
  above (the baseline it fired on) - ``clear_drop`` (a higher bar: ``clear_drop < drop``) for
  ``clear_after_s``, or, for a learned baseline, ``baseline_s`` after it fired (``reason: rebaselined``:
  the herd was moved on purpose, the lower count is the new normal).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Expected = int | Literal["learn"]


@dataclass(frozen=True)
class StationaryRule:
    enabled: bool = True
    after_s: float = 600.0
    radius: float = 0.05
    clear_radius: float = 0.1
    clear_after_s: float = 5.0
    memory_s: float = 60.0


@dataclass(frozen=True)
class HeadcountDropRule:
    drop: int = 1
    clear_drop: int = 0
    after_s: float = 120.0
    clear_after_s: float = 60.0
    smooth_s: float = 30.0
    baseline_s: float = 3600.0
    min_baseline: int = 1


@dataclass(frozen=True)
class HerdEventRules:
    """Mirrors the event fields of ``config.LivestockOptions``."""

    report_interval_s: float = 60.0
    """0: no headcount reports."""
    stationary: StationaryRule = StationaryRule()
    headcount_drop: HeadcountDropRule = HeadcountDropRule()
    expected: tuple[tuple[str | None, Expected], ...] = ()
    """Watched targets for headcount_drop: (None for the whole frame, or a zone name; a count or "learn")."""


@dataclass(frozen=True)
class TrackView:
    id: int
    label: str
    box: tuple[float, float, float, float]
    """x1, y1, x2, y2 in image pixels."""


@dataclass(frozen=True)
class FrameView:
    """What the events need from one frame of the tracker."""

    width: int
    height: int
    tracks: tuple[TrackView, ...]
    """Confirmed tracks matched in this frame."""
    in_frame: int
    zones: Mapping[str, int] = field(default_factory=dict)
    """Zone name -> animals in it in this frame."""
    forward: int = 0
    backward: int = 0
    """Cumulative line crossings (the tracker's counters)."""


def frame_view(report: Mapping[str, Any], image_size: tuple[int, int]) -> FrameView:
    """The tracker's per-frame report (``LivestockTracker.update``) as a :class:`FrameView`."""
    tracks = tuple(
        TrackView(int(t["id"]), str(t.get("label", "")), (float(t["box"][0]), float(t["box"][1]),
                                                          float(t["box"][2]), float(t["box"][3])))
        for t in report.get("tracks", ())
        if t.get("confirmed", True)
    )
    counts = report.get("counts", {})
    return FrameView(
        width=max(int(image_size[0]), 1),
        height=max(int(image_size[1]), 1),
        tracks=tracks,
        in_frame=int(report.get("in_frame", len(tracks))),
        zones={str(z["name"]): int(z["occupancy"]) for z in report.get("zones", ())},
        forward=int(counts.get("forward", 0)),
        backward=int(counts.get("backward", 0)),
    )


def _r(v: float, nd: int = 3) -> float:
    return round(float(v), nd)


# --- headcount per interval ------------------------------------------------------------------------------------


@dataclass
class _Interval:
    index: int
    frames: int = 0
    counts: dict[int, int] = field(default_factory=dict)
    """Histogram of the per-frame counts (count -> frames): bounded however long the interval."""
    zones: dict[str, dict[int, int]] = field(default_factory=dict)
    forward0: int = 0
    backward0: int = 0
    forward: int = 0
    backward: int = 0


def _stats(histogram: dict[int, int]) -> dict[str, int]:
    return {"count": _histogram_median_low(histogram, sum(histogram.values())), "min": min(histogram),
            "max": max(histogram)}


def _add(histogram: dict[int, int], value: int) -> None:
    histogram[value] = histogram.get(value, 0) + 1


# --- stationary ------------------------------------------------------------------------------------------------


@dataclass
class _Still:
    track_id: int
    label: str
    anchor: tuple[float, float]
    since: float
    last_seen: float
    position: tuple[float, float]
    box: tuple[float, float, float, float]
    fired: bool = False
    away_since: float | None = None


# --- headcount drop --------------------------------------------------------------------------------------------


@dataclass
class _Watch:
    expected: Expected
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    histogram: dict[int, int] = field(default_factory=dict)
    """How many of the samples hold each count: the median costs O(distinct counts), not a sort."""
    peaks: deque[tuple[float, int]] = field(default_factory=deque)
    """Learned baseline: a monotonic deque of (ts, smoothed count); the front is the window's maximum."""
    below_since: float | None = None
    active: bool = False
    fired_at: float = 0.0
    fired_baseline: int = 0
    since: float = 0.0
    ok_since: float | None = None


def _histogram_median_low(histogram: Mapping[int, int], n: int) -> int:
    """``statistics.median_low`` of the ``n`` values that ``histogram`` counts."""
    rank = (n - 1) // 2
    for value in sorted(histogram):
        rank -= histogram[value]
        if rank < 0:
            return value
    raise ValueError("empty histogram")


@dataclass
class _SourceState:
    last_ts: float = -math.inf
    interval: _Interval | None = None
    last_forward: int = 0
    last_backward: int = 0
    still: dict[int, _Still] = field(default_factory=dict)
    watches: dict[str | None, _Watch] = field(default_factory=dict)


class HerdEvents:
    """Feed it every frame of a source in capture order: ``update(ts, source, frame)`` -> the events it raised."""

    def __init__(self, rules: HerdEventRules = HerdEventRules()) -> None:
        self.rules = rules
        self._states: dict[str, _SourceState] = {}

    def update(self, ts: float, source: str, frame: FrameView) -> list[dict[str, Any]]:
        state = self._states.get(source)
        if state is None:
            state = self._states[source] = _SourceState(
                watches={target: _Watch(expected) for target, expected in self.rules.expected}
            )
        ts = max(float(ts), state.last_ts)  # time never runs backwards within a source
        state.last_ts = ts
        events: list[dict[str, Any]] = []
        self._headcount(ts, state, frame, events)
        if self.rules.stationary.enabled:
            self._stationary(ts, state, frame, events)
        for target, watch in state.watches.items():
            count = frame.in_frame if target is None else frame.zones.get(target)
            if count is not None:
                self._drop(ts, target, watch, count, events)
        return events

    # ------------------------------------------------------------------------------------------------------------

    def _headcount(self, ts: float, state: _SourceState, frame: FrameView, events: list[dict[str, Any]]) -> None:
        period = self.rules.report_interval_s
        if period <= 0:
            return
        index = math.floor(ts / period)
        current = state.interval
        if current is not None and index != current.index:
            events.append(self._report(current, period))
            current = None
        if current is None:
            # crossings before this frame belong to earlier intervals (the counters are cumulative)
            current = state.interval = _Interval(index, forward0=state.last_forward, backward0=state.last_backward)
        current.frames += 1
        _add(current.counts, frame.in_frame)
        for name, n in frame.zones.items():
            _add(current.zones.setdefault(name, {}), n)
        # a counter that went down: the tracker restarted; count from 0 again
        if frame.forward < state.last_forward or frame.backward < state.last_backward:
            current.forward0, current.backward0 = 0, 0
        current.forward, current.backward = frame.forward, frame.backward
        state.last_forward, state.last_backward = frame.forward, frame.backward

    @staticmethod
    def _report(iv: _Interval, period: float) -> dict[str, Any]:
        start = iv.index * period
        return {
            "type": "headcount",
            "ts": _r(start + period),
            "start": _r(start),
            "end": _r(start + period),
            "frames": iv.frames,
            **_stats(iv.counts),
            "crossed_forward": max(iv.forward - iv.forward0, 0),
            "crossed_backward": max(iv.backward - iv.backward0, 0),
            "zones": [{"name": name, **_stats(values)} for name, values in sorted(iv.zones.items())],
        }

    # ------------------------------------------------------------------------------------------------------------

    def _stationary(self, ts: float, state: _SourceState, frame: FrameView, events: list[dict[str, Any]]) -> None:
        rule = self.rules.stationary
        visible = {t.id for t in frame.tracks}
        for track in frame.tracks:
            x1, y1, x2, y2 = track.box
            pos = ((x1 + x2) / 2.0 / frame.width, (y1 + y2) / 2.0 / frame.height)
            st = state.still.get(track.id)
            if st is None:
                st = self._adopt(state, track, pos, visible, rule.radius) or _Still(
                    track.id, track.label, pos, ts, ts, pos, track.box
                )
                state.still[track.id] = st
            st.last_seen, st.position, st.box, st.label = ts, pos, track.box, track.label
            moved = math.dist(pos, st.anchor)
            if not st.fired:
                if moved > rule.radius:
                    st.anchor, st.since = pos, ts
                elif ts - st.since >= rule.after_s:
                    st.fired = True
                    events.append(self._still_event(st, ts, "active"))
                continue
            if moved <= rule.clear_radius:
                st.away_since = None
                continue
            st.away_since = ts if st.away_since is None else st.away_since
            if ts - st.away_since >= rule.clear_after_s:
                events.append(self._still_event(st, ts, "cleared", reason="moved"))
                st.fired, st.away_since, st.anchor, st.since = False, None, pos, ts
        for track_id, st in list(state.still.items()):
            if track_id in visible or ts - st.last_seen <= rule.memory_s:
                continue
            del state.still[track_id]
            if st.fired:
                events.append(self._still_event(st, ts, "cleared", reason="lost"))

    @staticmethod
    def _adopt(
        state: _SourceState, track: TrackView, pos: tuple[float, float], visible: set[int], radius: float
    ) -> _Still | None:
        """A new track id on an unseen stationary spot takes it over (a missed detection or an id switch)."""
        best: tuple[float, int] | None = None
        for track_id, st in state.still.items():
            if track_id in visible:
                continue  # seen as its own track in this frame
            d = math.dist(pos, st.anchor)
            if d <= radius and (best is None or d < best[0]):
                best = (d, track_id)
        if best is None:
            return None
        st = state.still.pop(best[1])
        st.track_id = track.id
        return st

    @staticmethod
    def _still_event(st: _Still, ts: float, status: str, reason: str | None = None) -> dict[str, Any]:
        event: dict[str, Any] = {
            "type": "animal_stationary",
            "ts": _r(ts),
            "state": status,
            "track_id": st.track_id,
            "label": st.label,
            "since": _r(st.since),
            "duration_s": _r(ts - st.since, 1),
            "position": [_r(st.position[0], 4), _r(st.position[1], 4)],
            "box": [round(v, 1) for v in st.box],
        }
        if reason is not None:
            event["reason"] = reason
        return event

    # ------------------------------------------------------------------------------------------------------------

    def _drop(self, ts: float, target: str | None, w: _Watch, count: int, events: list[dict[str, Any]]) -> None:
        rule = self.rules.headcount_drop
        w.samples.append((ts, count))
        _add(w.histogram, count)
        while w.samples[0][0] < ts - rule.smooth_s:
            _, old = w.samples.popleft()
            w.histogram[old] -= 1
            if not w.histogram[old]:
                del w.histogram[old]
        smoothed = _histogram_median_low(w.histogram, len(w.samples))
        learned = w.expected == "learn"
        if learned:
            while w.peaks and w.peaks[-1][1] <= smoothed:
                w.peaks.pop()
            w.peaks.append((ts, smoothed))
            while w.peaks[0][0] < ts - rule.baseline_s:
                w.peaks.popleft()
            baseline = w.peaks[0][1]
        else:
            baseline = int(w.expected)
        if w.active:
            if learned and ts - w.fired_at >= rule.baseline_s:
                events.append(self._drop_event(target, w, ts, smoothed, "cleared", reason="rebaselined"))
                w.active, w.ok_since, w.below_since = False, None, None
                return
            if smoothed >= w.fired_baseline - rule.clear_drop:
                w.ok_since = ts if w.ok_since is None else w.ok_since
                if ts - w.ok_since >= rule.clear_after_s:
                    events.append(self._drop_event(target, w, ts, smoothed, "cleared", reason="restored"))
                    w.active, w.ok_since, w.below_since = False, None, None
            else:
                w.ok_since = None
            return
        if baseline < rule.min_baseline or smoothed > baseline - rule.drop:
            w.below_since = None
            return
        w.below_since = ts if w.below_since is None else w.below_since
        if ts - w.below_since >= rule.after_s:
            w.active, w.fired_at, w.fired_baseline, w.since, w.ok_since = True, ts, baseline, w.below_since, None
            events.append(self._drop_event(target, w, ts, smoothed, "active"))

    @staticmethod
    def _drop_event(
        target: str | None, w: _Watch, ts: float, count: int, status: str, reason: str | None = None
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "type": "headcount_drop",
            "ts": _r(ts),
            "state": status,
            "zone": target,
            "count": count,
            "baseline": w.fired_baseline,
            "baseline_from": "learned" if w.expected == "learn" else "expected",
            "since": _r(w.since),
            "duration_s": _r(ts - w.since, 1),
        }
        if reason is not None:
            event["reason"] = reason
        return event


def split_events(events: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(alerts, reports): ``headcount`` reports apart from the alerts (``animal_stationary``, ``headcount_drop``)."""
    alerts: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []
    for e in events:
        (reports if e["type"] == "headcount" else alerts).append(e)
    return alerts, reports
