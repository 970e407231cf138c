"""Typed values that flow through edge-agent: images, pre-processing metadata, results.

Everything here is frozen and free of I/O. Arrays are numpy; shapes are in the docstrings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

ColorOrder = Literal["RGB", "BGR"]
Task = Literal["classification", "detection", "anomaly"]
U8Image = npt.NDArray[np.uint8]
F32Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Image:
    """A decoded image ready for pre-processing.

    ``pixels``: (H, W, 3) uint8, channel order ``color``.
    ``original_size``: (width, height) of the image as the user sees it (after EXIF
    orientation), which may be larger than ``pixels`` when it was decoded at reduced size.
    """

    pixels: U8Image
    color: ColorOrder
    original_size: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of ``pixels``."""
        return (int(self.pixels.shape[1]), int(self.pixels.shape[0]))

    @classmethod
    def from_array(cls, pixels: U8Image, color: ColorOrder = "BGR") -> Image:
        """Wrap a camera frame (H, W, 3) uint8; BGR is OpenCV's order."""
        return cls(pixels=pixels, color=color, original_size=(pixels.shape[1], pixels.shape[0]))


@dataclass(frozen=True)
class PreprocessMeta:
    """How model-input coordinates map back to original-image pixels.

    original_x = (model_x - pad_x) / scale_x  (likewise for y), where scale already
    includes any reduced-size decode.
    """

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    original_size: tuple[int, int]


@dataclass(frozen=True)
class Timings:
    """Per-stage wall time in milliseconds."""

    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    inference_ms: float = 0.0
    postprocess_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.decode_ms + self.preprocess_ms + self.inference_ms + self.postprocess_ms

    def to_dict(self) -> dict[str, float]:
        return {
            "decode": round(self.decode_ms, 3),
            "preprocess": round(self.preprocess_ms, 3),
            "inference": round(self.inference_ms, 3),
            "postprocess": round(self.postprocess_ms, 3),
            "total": round(self.total_ms, 3),
        }


@dataclass(frozen=True)
class Classification:
    label: str
    score: float
    index: int

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": round(self.score, 5), "index": self.index}


@dataclass(frozen=True)
class Detection:
    """One detected object; ``box`` is (x1, y1, x2, y2) in original-image pixels."""

    label: str
    score: float
    class_id: int
    box: tuple[float, float, float, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "score": round(self.score, 5),
            "class_id": self.class_id,
            "box": [round(v, 1) for v in self.box],
        }


@dataclass(frozen=True)
class AnomalyRegion:
    """A connected area of the anomaly map above the threshold: ``box`` (x1, y1, x2, y2) in original-image pixels,
    ``score`` its peak, ``area`` its share of the image (0..1)."""

    box: tuple[float, float, float, float]
    score: float
    area: float

    def to_dict(self) -> dict[str, Any]:
        return {"box": [round(v, 1) for v in self.box], "score": round(self.score, 6), "area": round(self.area, 5)}


@dataclass(frozen=True)
class AnomalyScore:
    """Image-level anomaly verdict; ``heatmap`` is (h, w) float32 in model-input space; ``regions`` are the areas
    of the map above the threshold (largest peak first), empty for a good part."""

    score: float
    threshold: float
    heatmap: F32Array | None = field(default=None, compare=False, repr=False)
    regions: tuple[AnomalyRegion, ...] = ()
    map_threshold: float | None = field(default=None, compare=False)
    """The heat map's own pass/fail level when its units are not the score's (a score that fuses other evidence,
    ``thresholds.region``); None: ``threshold``."""

    @property
    def is_anomalous(self) -> bool:
        return self.score > self.threshold

    @property
    def label(self) -> str:
        return "anomalous" if self.is_anomalous else "good"

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "score": round(self.score, 6),
            "threshold": round(self.threshold, 6),
            "anomalous": self.is_anomalous,
            "regions": [r.to_dict() for r in self.regions],
        }


Prediction = Classification | Detection | AnomalyScore
Band = Literal["known", "unsure", "unknown"]
"""Answer band of a classifier with an open-set section: confident, not sure, or not something it knows."""


@dataclass(frozen=True)
class Result:
    """What one model said about one image."""

    model: str
    model_version: str
    task: Task
    predictions: tuple[Prediction, ...]
    image_size: tuple[int, int]
    timings: Timings
    rejected: bool = False
    """True when a classifier decided the input is out of its domain (e.g. not a leaf)."""
    ood_score: float | None = None
    """The classifier's out-of-domain score (higher = less like its training data), when it has one."""
    band: Band | None = None
    """known / unsure / unknown, for a classifier whose manifest has an ``open_set`` section."""

    @property
    def detections(self) -> tuple[Detection, ...]:
        return tuple(p for p in self.predictions if isinstance(p, Detection))

    @property
    def classifications(self) -> tuple[Classification, ...]:
        return tuple(p for p in self.predictions if isinstance(p, Classification))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_version": self.model_version,
            "task": self.task,
            "image_size": list(self.image_size),
            "rejected": self.rejected,
            **({"ood_score": round(self.ood_score, 6)} if self.ood_score is not None else {}),
            **({"band": self.band} if self.band is not None else {}),
            "predictions": [p.to_dict() for p in self.predictions],
            "timings_ms": self.timings.to_dict(),
        }
