"""Benchmark inputs: synthetic textured photos at camera and phone sizes, as JPEG bytes and decoded frames."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image as PILImage

from edge_agent.toolchain.bench.common import PHOTO_SIZES
from edge_agent.types import U8Image
from edge_agent.vision import imaging


# ------------------------------------------------------------------ test inputs
def synthetic_sources(count: int = 6, size: int = 384, seed: int = 0) -> list[U8Image]:
    """Textured RGB pictures (octaves of smooth noise plus grain) for boards without a dataset."""
    rng = np.random.default_rng(seed)
    out: list[U8Image] = []
    for _ in range(count):
        acc = np.zeros((size, size, 3), np.float32)
        for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.15)):
            low = rng.random((cells, cells, 3), dtype=np.float32)
            acc += weight * imaging.resize((low * 255).astype(np.uint8), (size, size), "linear").astype(np.float32)
        acc += rng.normal(0, 6, acc.shape).astype(np.float32)
        out.append(np.clip(acc, 0, 255).astype(np.uint8))
    return out


def compose(sources: Sequence[U8Image], size: tuple[int, int], tiles_per_row: int, grain: float, seed: int) -> U8Image:
    """Tile RGB ``sources`` (upscaled as needed) into a (size) RGB picture with sensor-like grain."""
    w, h = size
    tile = math.ceil(w / tiles_per_row)
    rows = math.ceil(h / tile)
    canvas = np.empty((rows * tile, tiles_per_row * tile, 3), np.uint8)
    for r in range(rows):
        for c in range(tiles_per_row):
            src = sources[(r * tiles_per_row + c + seed) % len(sources)]
            canvas[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = imaging.resize(src, (tile, tile), "linear")
    out = canvas[:h, :w]
    if grain > 0:
        noise = np.random.default_rng(seed).normal(0, grain, out.shape).astype(np.float32)
        out = np.clip(out.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


def encode_jpeg(rgb: U8Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rgb, "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class BenchInputs:
    """Camera frame (1080p BGR array), photos (JPEG bytes by kind), and a 1080p JPEG stream."""

    frame: U8Image
    photos: dict[str, bytes]
    stream: tuple[bytes, ...]

    def describe(self) -> dict[str, Any]:
        return {
            "frame": list(self.frame.shape),
            "photos": {k: {"size": list(jpeg_size(v)), "bytes": len(v)} for k, v in self.photos.items()},
            "stream": {"frames": len(self.stream), "bytes_mean": int(np.mean([len(b) for b in self.stream]))},
        }


def make_inputs(
    sources: Sequence[U8Image], stream_len: int = 4, sizes: Mapping[str, tuple[int, int]] = PHOTO_SIZES
) -> BenchInputs:
    """Build 1080p and 12 MP test JPEGs from small RGB ``sources`` by tiling and upscaling.

    ``sizes`` maps the kinds "1080p" (also the camera frame and the stream) and "12mp" to pixel sizes.
    """
    photos: dict[str, bytes] = {}
    frame_rgb = compose(sources, sizes["1080p"], 3, 2.0, 0)
    photos["1080p"] = encode_jpeg(frame_rgb)
    photos["12mp"] = encode_jpeg(compose(sources, sizes["12mp"], 12, 3.0, 1))
    stream = tuple(encode_jpeg(compose(sources, sizes["1080p"], 3, 2.0, i)) for i in range(stream_len))
    return BenchInputs(frame=np.ascontiguousarray(frame_rgb[:, :, ::-1]), photos=photos, stream=stream)


def jpeg_size(data: bytes) -> tuple[int, int]:
    with PILImage.open(io.BytesIO(data)) as im:
        return (int(im.size[0]), int(im.size[1]))


def reduction_for(size: tuple[int, int], need: tuple[int, int]) -> int:
    """Largest JPEG DCT reduction (8, 4, 2, 1) that still yields ``need`` pixels (as decode.py picks)."""
    w, h = size
    for factor in (8, 4, 2):
        if -(-w // factor) >= need[0] and -(-h // factor) >= need[1]:
            return factor
    return 1


