"""Part-present detection by frame change. Pure: numpy only, no I/O, no clock.

Each frame is shrunk to a small grey image and compared with a background reference of the empty belt: the mean
absolute difference (grey levels, 0-255) is the *change*. With hysteresis::

    absent --change >= enter for settle_frames frames--> present  (event "arrived": trigger an inspection)
    present --change < leave for settle_frames frames--> absent   (event "left")

The background is the first frame, then follows the empty belt slowly (``background_rate``: an exponential
moving average, updated only while absent and the change is below ``leave``), so slow light changes do not
trigger. The arrival is reported on the ``settle_frames``-th changed frame: the part has come to rest or is
fully in view, and that frame is the one to inspect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

Event = Literal["arrived", "left"]


def small_grey(frame: npt.NDArray[np.uint8], width: int = 64) -> npt.NDArray[np.float32]:
    """``frame`` (H, W) or (H, W, C) uint8 as grey float32 about ``width`` pixels wide (block-mean, no resampling
    library): cheap enough to run on every frame of a camera."""
    grey = frame.astype(np.float32) if frame.ndim == 2 else frame.astype(np.float32).mean(axis=2)
    h, w = grey.shape
    step = max(1, w // max(1, width))
    hh, ww = (h // step) * step, (w // step) * step
    if hh == 0 or ww == 0:
        return grey
    blocks = grey[:hh, :ww].reshape(hh // step, step, ww // step, step)
    small: npt.NDArray[np.float32] = blocks.mean(axis=(1, 3), dtype=np.float32)
    return small


@dataclass
class PresenceDetector:
    """Feed frames to :meth:`update`; it returns ``"arrived"``, ``"left"`` or None."""

    enter: float = 12.0
    leave: float = 6.0
    settle_frames: int = 2
    size: int = 64
    background_rate: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 <= self.leave < self.enter:
            raise ValueError("need 0 <= leave < enter (hysteresis)")
        if self.settle_frames < 1:
            raise ValueError("settle_frames must be at least 1")
        self.background: npt.NDArray[np.float32] | None = None
        self.present = False
        self.change = 0.0
        self._run = 0

    def reset(self) -> None:
        self.background, self.present, self.change, self._run = None, False, 0.0, 0

    def update(self, frame: npt.NDArray[np.uint8]) -> Event | None:
        grey = small_grey(frame, self.size)
        if self.background is None or self.background.shape != grey.shape:
            self.background, self.present, self._run = grey, False, 0  # first frame (or a new resolution)
            self.change = 0.0
            return None
        self.change = float(np.abs(grey - self.background).mean())
        if not self.present:
            if self.change >= self.enter:
                self._run += 1
                if self._run >= self.settle_frames:
                    self.present, self._run = True, 0
                    return "arrived"
                return None
            self._run = 0
            if self.change < self.leave and self.background_rate > 0.0:
                self.background += self.background_rate * (grey - self.background)
            return None
        if self.change < self.leave:
            self._run += 1
            if self._run >= self.settle_frames:
                self.present, self._run = False, 0
                return "left"
            return None
        self._run = 0
        return None
