"""A multi-object tracker for video at a few frames per second: a Kalman filter per track, two-stage association.

Pure numpy, no I/O, no threads. One :class:`Tracker` follows one camera; feed it the detections of each frame in
order with :meth:`Tracker.update` and read its :class:`Track` objects.

How it works (ByteTrack's recipe, Zhang et al. 2022, on SORT's motion model):

* Each track carries a constant-velocity Kalman filter on its box centre and size, state
  ``(cx, cy, w, h, vcx, vcy, vw, vh)``; noise scales with the box size (a far, small animal moves fewer pixels). Before
  matching, every track is predicted to the frame's time, so an animal that walked on while the detector missed it
  is looked for where it should be now, not where it was last seen.
* Stage 1: detections scoring at least ``high_score`` are matched to all tracks by IoU with the predicted box
  (greedy by descending IoU, at least ``match_iou``).
* Stage 2: the tracks still unmatched are matched to the low-score detections (``low_score`` <= score <
  ``high_score``) at a stricter IoU (:data:`LOW_MATCH_IOU`): a half-hidden animal that the detector is unsure of
  keeps its track alive without a low-score false positive ever starting a track of its own.
* A high-score detection left over starts a new track. A track is *confirmed* after ``min_hits`` matched frames; an
  unconfirmed one is dropped after :data:`UNCONFIRMED_MAX_MISSED` misses (a one-frame flicker never becomes an
  animal); a confirmed one is kept, coasting on its prediction, for up to ``max_missed`` frames without a match.

Time: :meth:`Tracker.update` takes the frame's timestamp in seconds. The filter steps in units of the typical frame
interval (a running median of the intervals seen), so a frame the pipeline dropped is a two-interval step, and the
tuning does not depend on the camera's frame rate. A frame without a timestamp is one typical step after the
previous one (without any timestamps: one step of one "second" per frame).
Boxes are (x1, y1, x2, y2) pixels.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edge_agent.vision.postprocess import box_iou

F64 = npt.NDArray[np.float64]
Box = tuple[float, float, float, float]

LOW_MATCH_IOU = 0.5
"""Stage 2 (low-score detections) needs this much overlap with the predicted box (ByteTrack uses 0.5)."""

UNCONFIRMED_MAX_MISSED = 3
"""A track not yet confirmed survives this many missed frames (ByteTrack at 30 fps: none). At 3-10 fps an animal
entering the frame is detected on and off; on the chute runs with labelled boxes and random misses (160 runs), ID
switches fell from 31 (1 miss allowed) to 18 (2), 13 (3) and 10 (5) with the same crossing counts; 3 keeps a lone
false detection from waiting long for a second one to confirm it."""

_STD_POS = 1.0 / 20.0
"""Position noise, as a fraction of the box side (ByteTrack's/SORT's weights)."""
_STD_VEL = 1.0 / 40.0
"""Velocity noise per step, as a fraction of the box side. ByteTrack uses 1/160 at 30 fps; a step at 3-10 fps is
3-10 times longer and an animal that stops must not coast on for seconds (on the chute runs with labelled boxes and
random misses, 1/160 to 1/10 all got 154-157 of 160 crossings right, with one unconfirmed miss allowed; 1/40 lets a
stopped animal's velocity fade within a few frames)."""


def greedy_match(iou: F64, threshold: float) -> list[tuple[int, int]]:
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


def _xyxy_to_z(box: Sequence[float]) -> F64:
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([(x1 + x2) / 2.0, (y1 + y2) / 2.0, max(x2 - x1, 1e-3), max(y2 - y1, 1e-3)], dtype=np.float64)


def _z_to_xyxy(z: F64) -> Box:
    cx, cy = float(z[0]), float(z[1])
    w, h = max(float(z[2]), 1e-3), max(float(z[3]), 1e-3)
    return (cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0)


class KalmanBox:
    """Constant-velocity Kalman filter on (cx, cy, w, h); steps in units of one typical frame interval."""

    _H = np.hstack([np.eye(4), np.zeros((4, 4))])

    def __init__(self, box: Sequence[float]) -> None:
        z = _xyxy_to_z(box)
        self.x: F64 = np.concatenate([z, np.zeros(4)])
        s = self._scale(z)
        std = np.concatenate([2 * _STD_POS * s, 10 * _STD_VEL * s])
        self.P: F64 = np.diag(std * std)

    @staticmethod
    def _scale(z: F64) -> F64:
        w, h = abs(float(z[2])), abs(float(z[3]))
        return np.array([w, h, w, h], dtype=np.float64)

    def predict(self, steps: float = 1.0) -> None:
        dt = max(float(steps), 0.0)
        if dt == 0.0:
            return
        f = np.eye(8)
        f[:4, 4:] = dt * np.eye(4)
        s = self._scale(self.x[:4])
        q = np.diag(np.concatenate([(_STD_POS * s) ** 2, (_STD_VEL * s) ** 2]) * dt)
        self.x = f @ self.x
        self.x[2] = max(self.x[2], 1e-3)
        self.x[3] = max(self.x[3], 1e-3)
        self.P = f @ self.P @ f.T + q

    def update(self, box: Sequence[float]) -> None:
        z = _xyxy_to_z(box)
        s = self._scale(self.x[:4])
        r = np.diag((_STD_POS * s) ** 2)
        hm = self._H
        innovation = z - hm @ self.x
        cov = hm @ self.P @ hm.T + r
        gain = np.linalg.solve(cov, hm @ self.P).T  # P H^T S^-1 (S symmetric)
        self.x = self.x + gain @ innovation
        self.x[2] = max(self.x[2], 1e-3)
        self.x[3] = max(self.x[3], 1e-3)
        self.P = (np.eye(8) - gain @ hm) @ self.P

    @property
    def box(self) -> Box:
        return _z_to_xyxy(self.x[:4])

    @property
    def velocity(self) -> tuple[float, float]:
        """Centre velocity in pixels per step."""
        return (float(self.x[4]), float(self.x[5]))


@dataclass
class Track:
    """One followed object. Read its fields; only the :class:`Tracker` changes them.

    ``box``: the filtered box (x1, y1, x2, y2, pixels) after this frame; for a track missed this frame, where the
    motion model expects it. ``velocity``: centre velocity in pixels per second (per step without timestamps).
    ``age``: frames since the track started; ``hits``: frames with a matched detection; ``missed``: frames since the
    last match (0 = seen in this frame). ``first_seen`` / ``last_seen``: timestamps of its first and latest match.
    """

    id: int
    label: str
    score: float
    box: Box
    first_seen: float
    last_seen: float
    age: int = 1
    hits: int = 1
    missed: int = 0
    confirmed: bool = False
    velocity: tuple[float, float] = (0.0, 0.0)
    kf: KalmanBox = field(repr=False, default_factory=lambda: KalmanBox((0.0, 0.0, 1.0, 1.0)))

    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return ((x1 + x2) / 2.0, (y1 + y2) / 2.0)


@dataclass(frozen=True)
class TrackerSettings:
    high_score: float = 0.5
    """Detections at or above this start tracks and are matched first."""
    low_score: float = 0.1
    """Detections in [low_score, high_score) can only keep an existing track alive (stage 2)."""
    match_iou: float = 0.2
    """Stage 1: least IoU between a track's predicted box and a detection."""
    max_missed: int = 5
    """Frames a confirmed track coasts on its prediction without a match before it is dropped."""
    min_hits: int = 2
    """Matched frames before a track is confirmed."""


@dataclass(frozen=True)
class Observation:
    box: Box
    score: float
    label: str


class Tracker:
    """Tracks of one camera. ``update(observations, timestamp)`` once per frame, in order."""

    def __init__(self, settings: TrackerSettings = TrackerSettings()) -> None:
        self.settings = settings
        self.tracks: list[Track] = []
        self.next_id = 1
        self._last_t: float | None = None
        self._intervals: deque[float] = deque(maxlen=15)
        self.frames = 0

    def _steps(self, timestamp: float | None) -> tuple[float, float, float]:
        """(now, steps since the previous frame, seconds per step)."""
        if timestamp is None:  # one typical step after the previous frame
            typical = float(np.median(self._intervals)) if self._intervals else 1.0
            return (0.0 if self._last_t is None else self._last_t + typical), 1.0, typical
        now = float(timestamp)
        if self._last_t is None:
            return now, 1.0, 1.0
        dt = now - self._last_t
        if dt <= 0.0:  # frames arrive in order: a clock that did not move (file times of a copy) is one step
            typical = float(np.median(self._intervals)) if self._intervals else 1.0
            return self._last_t + typical, 1.0, typical
        self._intervals.append(dt)
        typical = float(np.median(self._intervals))
        return now, dt / typical, typical

    def update(self, observations: Sequence[Observation], timestamp: float | None = None) -> list[Track]:
        """Advance every track to this frame and match ``observations``; returns the tracks seen in this frame
        (``missed == 0``), new ones included, in id order. Tracks kept alive without a match stay in ``tracks``."""
        st = self.settings
        now, steps, per_step = self._steps(timestamp)
        self._last_t = now
        self.frames += 1

        for t in self.tracks:
            t.kf.predict(steps)
            t.age += 1
        high = [o for o in observations if o.score >= st.high_score]
        low = [o for o in observations if st.low_score <= o.score < st.high_score]

        pairs1 = self._match(self.tracks, high, st.match_iou)
        matched_t = {r for r, _ in pairs1}
        used_high = {c for _, c in pairs1}
        rest = [i for i in range(len(self.tracks)) if i not in matched_t]
        pairs2 = [(rest[r], c) for r, c in self._match([self.tracks[i] for i in rest], low, LOW_MATCH_IOU)]

        for r, c in pairs1:
            self._hit(self.tracks[r], high[c], now)
        for r, c in pairs2:
            self._hit(self.tracks[r], low[c], now)
        matched_t |= {r for r, _ in pairs2}
        kept: list[Track] = []
        for i, t in enumerate(self.tracks):
            if i not in matched_t:
                t.missed += 1
                if t.missed > (st.max_missed if t.confirmed else min(st.max_missed, UNCONFIRMED_MAX_MISSED)):
                    continue
            kept.append(t)
        for c, obs in enumerate(high):
            if c not in used_high:
                kept.append(self._new(obs, now))
        for t in kept:
            t.box = t.kf.box
            vx, vy = t.kf.velocity
            t.velocity = (vx / per_step, vy / per_step) if per_step > 0 else (0.0, 0.0)
            if not t.confirmed and t.hits >= st.min_hits:
                t.confirmed = True
        self.tracks = sorted(kept, key=lambda t: t.id)
        return [t for t in self.tracks if t.missed == 0]

    @staticmethod
    def _match(tracks: Sequence[Track], obs: Sequence[Observation], threshold: float) -> list[tuple[int, int]]:
        if not tracks or not obs:
            return []
        predicted = np.array([t.kf.box for t in tracks], dtype=np.float64).reshape(-1, 4)
        boxes = np.array([o.box for o in obs], dtype=np.float64).reshape(-1, 4)
        return greedy_match(box_iou(predicted, boxes), threshold)

    @staticmethod
    def _hit(track: Track, obs: Observation, now: float) -> None:
        track.kf.update(obs.box)
        track.score, track.label = obs.score, obs.label
        track.hits += 1
        track.missed = 0
        track.last_seen = now

    def _new(self, obs: Observation, now: float) -> Track:
        track = Track(
            id=self.next_id, label=obs.label, score=obs.score, box=obs.box, first_seen=now, last_seen=now,
            kf=KalmanBox(obs.box),
        )
        self.next_id += 1
        return track
