"""Photo-quality checks before a crop diagnosis: blur, darkness, over-exposure, "leaf too small in the frame".

Cheap (well under a millisecond per photo: every measure is taken on a copy scaled so its shorter side is
:data:`WORK_SIDE` pixels, about what the crop model sees) and pure: numpy and OpenCV on pixels, no I/O.

Measures (:class:`PhotoMeasures`):

* ``sharpness``: variance of the Laplacian of the grey image, divided by the grey image's own variance
  (a contrast-normalised blur measure: a dim but sharp photo is not called blurry; a blurred one is).
* ``brightness``: mean luma (0-255); ``clipped``: fraction of pixels with luma >= 250 (burnt out).
* ``leaf_fraction``: fraction of pixels coloured like a leaf: green to yellow hues, or the brown/orange of
  lesions and scorch *when* they touch the green part (so brown soil or a wooden table does not count as leaf,
  but a leaf half eaten by disease still does). Colour only: a small leaf in front of other green leaves is
  not caught (the whole frame is green).

Thresholds (:class:`QualityThresholds`) were measured on the PlantVillage and iBean training photos
(``docs/photo-quality.md``: each refuses well under 2% of real photos); :func:`check` returns the first failed
check, in the order exposure (too dark, too bright), blur, leaf size, with a hint code the farmer page and
the advice files turn into a sentence in the farmer's language. Exposure is judged on the leaf as well as on the
frame (``leaf_brightness``): a well-lit leaf on black cloth or a white wall is not refused for its background.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from edge_agent.types import ColorOrder, Image, U8Image

WORK_SIDE = 224
"""Shorter side, in pixels, of the copy every measure is taken on."""

CODES: tuple[str, ...] = ("too_dark", "too_bright", "blurry", "leaf_too_small")
"""Retake hint codes, in the order they are checked (the first failed one is the hint)."""


@dataclass(frozen=True)
class QualityThresholds:
    """Refuse a photo when a measure is outside these bounds.

    The defaults are what ``python -m benchmarks.photo_quality`` suggests: for each check, the bound refusing at
    most 0.25% of the even-numbered PlantVillage and iBean training photos (together they refused 0.92% and 0.51% of
    the odd-numbered ones, which they never saw; ``docs/photo-quality.md``)."""

    min_brightness: float = 79.0
    max_brightness: float = 190.0
    max_clipped: float = 0.04
    min_sharpness: float = 0.31
    min_leaf_fraction: float = 0.12


@dataclass(frozen=True)
class PhotoMeasures:
    brightness: float
    clipped: float
    sharpness: float
    leaf_fraction: float
    leaf_brightness: float = -1.0
    """Mean luma of the leaf-coloured pixels (-1: none): tells a dark or bright *background* from bad light."""

    def to_dict(self) -> dict[str, float]:
        return {
            "brightness": round(self.brightness, 2),
            "clipped": round(self.clipped, 4),
            "sharpness": round(self.sharpness, 5),
            "leaf_fraction": round(self.leaf_fraction, 4),
            "leaf_brightness": round(self.leaf_brightness, 2),
        }


@dataclass(frozen=True)
class QualityReport:
    """``ok`` or the first failed check's ``code`` (one of :data:`CODES`); ``failed`` lists every failed one."""

    measures: PhotoMeasures
    failed: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def code(self) -> str | None:
        return self.failed[0] if self.failed else None

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "code": self.code, "failed": list(self.failed), "measures": self.measures.to_dict()}


def work_copy(pixels: U8Image) -> U8Image:
    """``pixels`` scaled so the shorter side is :data:`WORK_SIDE` (area filter down, linear up)."""
    h, w = pixels.shape[:2]
    k = WORK_SIDE / max(1, min(h, w))
    size = (max(1, round(w * k)), max(1, round(h * k)))
    if size == (w, h):
        return pixels
    interp = cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(pixels, size, interpolation=interp), dtype=np.uint8)


# Leaf colours, OpenCV HSV (H 0-180), on a half-size copy (the area filter averages away the chroma noise of dark
# pixels, which otherwise takes random hues). Green: yellow-green to blue-green, either pale (grey-green undersides,
# leaves in bright light: some colour, lit) or dark (shaded leaves: more colour, little light). Brown: the
# orange-brown of lesions and scorch, counted only within ~10 px (at WORK_SIDE) of the green, so soil, wood and
# dark ground away from the leaf do not count.
_PALE_GREEN = ((25, 25, 60), (95, 255, 255))
_DARK_GREEN = ((30, 70, 30), (95, 255, 255))
_BROWN = ((0, 70, 60), (25, 255, 235))
_NEAR = np.ones((5, 5), np.uint8)


def measure(pixels: U8Image, color: ColorOrder = "RGB") -> PhotoMeasures:
    """Every measure of one (H, W, 3) uint8 photo in channel order ``color``."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.size == 0:
        raise ValueError(f"expected an (H, W, 3) image, got shape {pixels.shape}")
    small = work_copy(np.ascontiguousarray(pixels, dtype=np.uint8))
    rgb2 = cv2.COLOR_RGB2GRAY if color == "RGB" else cv2.COLOR_BGR2GRAY
    gray = cv2.cvtColor(small, rgb2)
    brightness = float(gray.mean())
    clipped = float(np.count_nonzero(gray >= 250)) / gray.size
    g = gray.astype(np.float32)
    contrast = float(g.var())
    lap = cv2.Laplacian(g, cv2.CV_32F, ksize=3)
    sharpness = float(lap.var()) / (contrast + 25.0)  # +25: a flat photo (var < 5^2) never passes as sharp
    half = cv2.resize(small, (max(1, small.shape[1] // 2), max(1, small.shape[0] // 2)), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(half, cv2.COLOR_RGB2HSV if color == "RGB" else cv2.COLOR_BGR2HSV)
    green = cv2.bitwise_or(cv2.inRange(hsv, *_PALE_GREEN), cv2.inRange(hsv, *_DARK_GREEN))
    brown = cv2.inRange(hsv, _BROWN[0], _BROWN[1])
    near_green = cv2.dilate(green, _NEAR)
    leaf = cv2.bitwise_or(green, cv2.bitwise_and(brown, near_green))
    leaf_pixels = np.count_nonzero(leaf)
    leaf_fraction = float(leaf_pixels) / leaf.size
    half_gray = cv2.cvtColor(half, cv2.COLOR_RGB2GRAY if color == "RGB" else cv2.COLOR_BGR2GRAY)
    leaf_brightness = float(half_gray[leaf > 0].mean()) if leaf_pixels else -1.0
    return PhotoMeasures(brightness, clipped, sharpness, leaf_fraction, leaf_brightness)


def check(measures: PhotoMeasures, thresholds: QualityThresholds = QualityThresholds()) -> QualityReport:
    """Which checks ``measures`` fail under ``thresholds``, in :data:`CODES` order.

    Exposure is judged on the leaf as well as the frame: a frame darker than ``min_brightness`` is "too dark" only
    when its leaf-coloured pixels are too (or there are none), and one brighter than ``max_brightness`` "too bright"
    only when they are too; so a well-lit leaf on black cloth, dark soil or a white wall is not refused for its
    background (it may still be "leaf too small"). Burnt-out pixels over ``max_clipped`` are "too bright" anyway.
    """
    t = thresholds
    leaf = measures.leaf_brightness  # -1: no leaf-coloured pixels
    failed: list[str] = []
    if measures.brightness < t.min_brightness and leaf < t.min_brightness:
        failed.append("too_dark")
    glare = measures.brightness > t.max_brightness and (leaf < 0 or leaf > t.max_brightness)
    if measures.clipped > t.max_clipped or glare:
        failed.append("too_bright")
    if measures.sharpness < t.min_sharpness:
        failed.append("blurry")
    if measures.leaf_fraction < t.min_leaf_fraction:
        failed.append("leaf_too_small")
    return QualityReport(measures, tuple(failed))


def check_photo(image: Image, thresholds: QualityThresholds = QualityThresholds()) -> QualityReport:
    """Measure and check one decoded photo."""
    return check(measure(image.pixels, image.color), thresholds)
