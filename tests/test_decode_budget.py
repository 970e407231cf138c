"""Large images without large memory: the strip-wise PNG decoder and the agent-wide decoded-pixel budget.

Given PNGs whose rows use every PNG filter (each row of a strip may look at the row above, which lives
in the previous strip); when they are decoded strip by strip; then the pixels are exactly Pillow's, and a
shrunk decode is what shrinking the whole picture gives. Given concurrent decodes sharing one budget; then
they never hold more than it, and a large one waits its turn instead of being overtaken for ever.
"""

from __future__ import annotations

import io
import struct
import threading
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage

from edge_agent.errors import ImageError
from edge_agent.vision import decode
from edge_agent.vision.decode import PixelBudget, decode_image

from .support.wait import wait_for

T = 10.0


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _paeth(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any], c: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filtered_png(pixels: np.ndarray[Any, Any], color: int, extra: bytes = b"", after: bytes = b"") -> bytes:
    """An 8-bit PNG of ``pixels`` (h, w, channels) whose row ``y`` uses filter ``y % 5`` (None, Sub, Up,
    Average, Paeth): written by hand so that every filter meets a strip boundary. ``extra``: chunks before
    the image data (PLTE, tRNS); ``after``: chunks after it (eXIf)."""
    h, w = pixels.shape[:2]
    raw = pixels.reshape(h, -1).astype(np.int32)
    bpp = raw.shape[1] // w
    rows = []
    for y in range(h):
        x = raw[y]
        up = raw[y - 1] if y else np.zeros_like(x)
        left = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        kind = y % 5
        pred = [np.zeros_like(x), left, up, (left + up) // 2, _paeth(left, up, upleft)][kind]
        rows.append(bytes([kind]) + ((x - pred) % 256).astype(np.uint8).tobytes())
    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return b"".join((b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", header), extra,
                     _chunk(b"IDAT", zlib.compress(b"".join(rows), 6)), after, _chunk(b"IEND", b"")))


def pillow_rgb(data: bytes) -> np.ndarray[Any, Any]:
    with PILImage.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im if im.mode == "RGB" else decode._to_rgb(im))


RNG = np.random.default_rng(7)
NOISE = RNG.integers(0, 256, (97, 131, 4), dtype=np.uint8)
PALETTE = RNG.integers(0, 256, 3 * 256, dtype=np.uint8).tobytes()
CASES = {
    "grey": (NOISE[..., :1], 0, b""),
    "grey+alpha": (NOISE[..., :2], 4, b""),
    "rgb": (NOISE[..., :3], 2, b""),
    "rgba": (NOISE, 6, b""),
    "palette+trns": (NOISE[..., :1], 3, _chunk(b"PLTE", PALETTE) + _chunk(b"tRNS", bytes(range(0, 256, 2)))),
    "rgb+trns": (NOISE[..., :3], 2, _chunk(b"tRNS", b"\x00\x10\x00\x20\x00\x30")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_strip_decoding_gives_exactly_pillows_pixels(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pixels, color, extra = CASES[case]
    data = filtered_png(pixels, color, extra)
    monkeypatch.setattr(decode, "STRIP_PIXELS", 131 * 7)  # 7-row strips: 14 strip boundaries
    layout = decode._png_layout(data)
    assert layout is not None and layout.streamable
    got = decode._png_reduced(data, layout, 1)
    np.testing.assert_array_equal(got, pillow_rgb(data))


def test_shrunk_strip_decode_is_the_whole_picture_shrunk(monkeypatch: pytest.MonkeyPatch) -> None:
    pixels = np.repeat(np.repeat(NOISE[:24, :32, :3], 4, axis=0), 4, axis=1)  # 96 x 128, blocks of 4 x 4
    data = filtered_png(pixels, 2)
    monkeypatch.setattr(decode, "STRIP_PIXELS", 128 * 8)
    layout = decode._png_layout(data)
    assert layout is not None
    np.testing.assert_array_equal(decode._png_reduced(data, layout, 4), NOISE[:24, :32, :3])


def test_large_png_is_decoded_shrunk_keeps_its_original_size_and_its_exif_orientation() -> None:
    w, h = 2400, 1800  # 4.3 MP: over LARGE_PIXELS
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[: h // 4, : w // 4] = 255  # a white block top-left
    exif = PILImage.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = filtered_png(pixels, 2, after=_chunk(b"eXIf", exif.tobytes()))  # after the image data, as allowed
    image = decode_image(data, size_hint=lambda w_, h_: (224, 224))
    assert image.original_size == (h, w)  # upright: turned
    assert image.pixels.shape[0] * image.pixels.shape[1] < 500_000
    top_right = image.pixels[: image.pixels.shape[0] // 8, -image.pixels.shape[1] // 8 :]
    assert top_right.mean() > 200  # the block is now top-right


def test_truncated_or_corrupt_strip_png_is_an_image_error() -> None:
    data = filtered_png(np.zeros((2000, 2100, 3), np.uint8) + 9, 2)
    layout = decode._png_layout(data)
    assert layout is not None
    start, length = layout.idat[0]
    short = data[: start + length // 2]
    short += _chunk(b"IEND", b"")
    with pytest.raises(ImageError):
        decode_image(short, size_hint=lambda w, h: (224, 224))
    flipped = bytearray(data)
    flipped[start + 40 : start + 60] = b"\xff" * 20
    with pytest.raises(ImageError):
        decode_image(bytes(flipped), size_hint=lambda w, h: (224, 224))


def test_budget_is_never_exceeded_and_a_large_request_is_served_in_turn() -> None:
    budget = PixelBudget(100)
    order: list[str] = []
    release = {name: threading.Event() for name in ("a", "b", "big", "c")}
    started = {name: threading.Event() for name in release}

    def take(name: str, pixels: int) -> None:
        with budget.hold(pixels):
            order.append(name)
            started[name].set()
            assert budget.used <= budget.capacity
            assert release[name].wait(T)

    threads = {name: threading.Thread(target=take, args=(name, px)) for name, px in
               (("a", 40), ("b", 40), ("big", 1000), ("c", 10))}
    threads["a"].start()
    threads["b"].start()
    assert started["a"].wait(T) and started["b"].wait(T)
    threads["big"].start()  # clamped to the whole budget: waits for a and b
    assert wait_for(lambda: budget.waits == 1, T)
    threads["c"].start()  # would fit now (80 + 10), but the big one is first in line
    assert wait_for(lambda: budget.waits == 2, T)
    assert order == ["a", "b"]
    release["a"].set()
    release["b"].set()
    assert started["big"].wait(T) and budget.used == 100
    assert not started["c"].is_set()
    release["big"].set()
    assert started["c"].wait(T)
    release["c"].set()
    for t in threads.values():
        t.join(T)
    assert order == ["a", "b", "big", "c"] and budget.used == 0 and budget.peak == 100


def test_decodes_hold_their_pixels_from_the_budget() -> None:
    class Spy(PixelBudget):
        def __init__(self) -> None:
            super().__init__(24_000_000)
            self.asked: list[int] = []

        def hold(self, pixels: int) -> Any:
            self.asked.append(pixels)
            return super().hold(pixels)

    spy = Spy()
    big_png = filtered_png(np.zeros((2000, 2100, 3), np.uint8), 2)
    decode_image(big_png, size_hint=lambda w, h: (224, 224), budget=spy)  # strip-wise: a strip's worth
    small = io.BytesIO()
    PILImage.new("RGB", (300, 200)).save(small, "WEBP")
    decode_image(small.getvalue(), budget=spy)  # whole: libwebp's canvases too
    assert spy.asked[0] < 2100 * 2000 // 2 and spy.asked[1] == 3 * 300 * 200
    assert spy.used == 0
