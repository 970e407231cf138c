"""OpenCV adapter: the one module that imports cv2 for pixel work.

Resizing into preallocated buffers and JPEG decode at reduced size (1/2, 1/4, 1/8 in the DCT).
Bytes given to :func:`decode_jpeg_reduced` must already have been identified as JPEG by
``decode.py`` (Pillow header check); OpenCV is never asked to guess a format.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from edge_agent.types import U8Image

Interpolation = Literal["linear", "linear_exact", "area", "nearest"]

# "linear" is OpenCV's INTER_LINEAR, vectorised differently on x86 (AVX2/AVX-512) and ARM (NEON): 13-22% of a
# resized photo's values come out one level apart between the two, which moves detector boxes by up to ~11 px and
# anomaly scores by ~1.3% (`make arm64-check` states its tolerances accordingly). The bit-exact INTER_LINEAR_EXACT
# would make FP32 inputs identical, but costs 0.1-0.45 ms more per picture on x86 (1920x1080 -> 416x234:
# 0.15 -> 0.59 ms), which the frame loop's budget (benchmarks/) cannot afford; the models were trained with it too.
# "linear_exact" (INTER_LINEAR_EXACT) is for small inputs whose score is that sensitive: the anomaly bundles of
# `inspect fit` (a photo <= ~256 px resized to 192: one level apart on x86 vs ARM moved their score by up to 0.11
# on x86 itself, the drift `make arm64-check` measured; `linear_exact` makes the input the same on both).
_INTERP = {
    "linear": cv2.INTER_LINEAR,
    "linear_exact": cv2.INTER_LINEAR_EXACT,
    "area": cv2.INTER_AREA,
    "nearest": cv2.INTER_NEAREST,
}

_REDUCED = {
    1: cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION,
    2: cv2.IMREAD_REDUCED_COLOR_2 | cv2.IMREAD_IGNORE_ORIENTATION,
    4: cv2.IMREAD_REDUCED_COLOR_4 | cv2.IMREAD_IGNORE_ORIENTATION,
    8: cv2.IMREAD_REDUCED_COLOR_8 | cv2.IMREAD_IGNORE_ORIENTATION,
}


def resize_into(src: U8Image, dst: U8Image, interpolation: Interpolation = "linear") -> None:
    """Resize (h, w, 3) ``src`` into ``dst`` (H, W, 3), which may be a view into a larger canvas."""
    out = cv2.resize(src, (dst.shape[1], dst.shape[0]), dst=dst, interpolation=_INTERP[interpolation])
    if out is not dst and not np.shares_memory(out, dst):  # OpenCV could not write in place
        dst[...] = out


def resize(src: U8Image, size: tuple[int, int], interpolation: Interpolation = "linear") -> U8Image:
    """Resize (h, w, 3) ``src`` to ``size`` = (width, height); returns a new array."""
    out = cv2.resize(src, size, interpolation=_INTERP[interpolation])
    return np.asarray(out, dtype=np.uint8)


def split_into(src: U8Image, planes: list[U8Image]) -> None:
    """De-interleave (h, w, 3) ``src`` into three preallocated (h, w) uint8 ``planes`` (channel order kept)."""
    out = cv2.split(src, planes)
    for got, want in zip(out, planes, strict=True):
        if got is not want and not np.shares_memory(got, want):  # OpenCV could not write in place
            want[...] = got


def decode_jpeg_reduced(data: bytes, factor: int) -> U8Image | None:
    """Decode JPEG bytes at 1/``factor`` size (factor in 1, 2, 4, 8); BGR (h, w, 3) or None on failure.

    EXIF orientation is ignored here; the caller applies it.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, _REDUCED[factor])
    if img is None or img.ndim != 3:
        return None
    return np.asarray(img, dtype=np.uint8)


def set_threads(n: int) -> None:
    """Limit OpenCV's own worker threads (0 or less = OpenCV's default; 1 = no worker pool).

    OpenCV itself reads 0 as "sequential", which is why 0 is mapped to its "default" (-1).
    """
    cv2.setNumThreads(n if n > 0 else -1)
