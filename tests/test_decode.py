"""Untrusted image bytes: every bad-input row of the design note gets a stable error code,
and good images of every kind come out upright, 3-channel uint8."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from edge_agent.errors import ImageEmptyError, ImageError, ImageTooLargeError, UnsupportedFormatError
from edge_agent.vision.decode import decode_image, jpeg_header, sniff_format

from .conftest import COCO_DEMO


def _encode(arr: np.ndarray, fmt: str = "JPEG", **kw: object) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _marked(w: int = 64, h: int = 32) -> np.ndarray:
    """Black image with a white block in the top-left corner, to check orientation."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 4, : w // 4] = 255
    return a


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def _png_header_only(w: int, h: int, extra: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + extra
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_claiming(w: int, h: int) -> bytes:
    good = _encode(np.zeros((8, 8, 3), np.uint8))
    sof = good.find(b"\xff\xc0")
    assert sof > 0
    return good[: sof + 5] + struct.pack(">HH", h, w) + good[sof + 9 :]


BAD_ROWS = [
    ("empty", b"", ImageEmptyError, "image_empty"),
    ("pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\n", UnsupportedFormatError, "image_unsupported_format"),
    ("html", b"<html><body>hi</body></html>", UnsupportedFormatError, "image_unsupported_format"),
    ("elf", b"\x7fELF\x02\x01\x01" + b"\0" * 100, UnsupportedFormatError, "image_unsupported_format"),
    ("zip", b"PK\x03\x04" + b"\0" * 100, UnsupportedFormatError, "image_unsupported_format"),
    ("tiff", b"II*\x00" + b"\0" * 100, UnsupportedFormatError, "image_unsupported_format"),
    ("psd", b"8BPS\x00\x01" + b"\0" * 100, UnsupportedFormatError, "image_unsupported_format"),
    ("eps", b"%!PS-Adobe-3.0 EPSF-3.0\n", UnsupportedFormatError, "image_unsupported_format"),
    ("jp2", b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\0" * 100, UnsupportedFormatError, "image_unsupported_format"),
    ("png bomb 30000x30000", _png_header_only(30000, 30000), ImageTooLargeError, "image_too_large"),
    ("jpeg header 65500x65500", _jpeg_claiming(65500, 65500), ImageTooLargeError, "image_too_large"),
]


@pytest.mark.parametrize(("name", "data", "error", "code"), BAD_ROWS, ids=[r[0] for r in BAD_ROWS])
def test_bad_input_gets_a_stable_code(name: str, data: bytes, error: type[ImageError], code: str) -> None:
    with pytest.raises(error) as info:
        decode_image(data)
    assert info.value.code == code


def test_truncated_and_bit_flipped_jpegs_raise_image_errors_not_crashes() -> None:
    good = (COCO_DEMO / "images" / "000000214753.jpg").read_bytes()
    with pytest.raises(ImageError):
        decode_image(good[: len(good) // 2])
    rng = np.random.default_rng(1)
    for _ in range(20):
        flipped = bytearray(good)
        for pos in rng.integers(200, len(good), size=30):
            flipped[pos] ^= 0xFF
        try:
            img = decode_image(bytes(flipped))
        except ImageError:
            continue
        assert img.pixels.dtype == np.uint8 and img.pixels.shape[2] == 3


def test_png_with_huge_text_chunk_is_decoded_or_refused_cleanly() -> None:
    png = _encode(np.zeros((4, 4, 3), np.uint8), "PNG")
    huge = _png_chunk(b"tEXt", b"k\0" + b"x" * 5_000_000)
    data = png[:33] + huge + png[33:]
    try:
        img = decode_image(data)
    except ImageError as exc:
        assert exc.code.startswith("image_")
    else:
        assert img.size == (4, 4)


def test_jpeg_with_zip_appended_decodes_as_the_jpeg() -> None:
    data = _encode(_marked()) + b"PK\x03\x04" + b"\0" * 200
    img = decode_image(data)
    assert img.original_size == (64, 32)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    ("orientation", "size"),
    [(1, (64, 32)), (3, (64, 32)), (6, (32, 64)), (8, (32, 64)), (2, (64, 32)), (5, (32, 64)), (7, (32, 64))],
)
def test_exif_orientation_comes_out_upright(orientation: int, size: tuple[int, int], fast: bool) -> None:
    # Store the picture so that applying `orientation` gives back _marked() (white block top-left).
    upright = PILImage.fromarray(_marked())
    inverse = {
        1: None,
        2: PILImage.Transpose.FLIP_LEFT_RIGHT,
        3: PILImage.Transpose.ROTATE_180,
        4: PILImage.Transpose.FLIP_TOP_BOTTOM,
        5: PILImage.Transpose.TRANSPOSE,
        6: PILImage.Transpose.ROTATE_90,
        7: PILImage.Transpose.TRANSVERSE,
        8: PILImage.Transpose.ROTATE_270,
    }[orientation]
    stored = upright if inverse is None else upright.transpose(inverse)
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    img = decode_image(buf.getvalue(), fast_jpeg=fast)
    assert img.original_size == (64, 32)
    assert img.size == (64, 32)
    gray = img.pixels.mean(axis=2)
    assert gray[:4, :8].mean() > 200, "white block must be top-left"
    assert gray[-4:, -8:].mean() < 50


def test_malformed_exif_is_ignored() -> None:
    buf = io.BytesIO()
    PILImage.fromarray(_marked()).save(buf, format="JPEG", exif=b"Exif\x00\x00MM\x00*garbage")
    img = decode_image(buf.getvalue())
    assert img.original_size == (64, 32)


@pytest.mark.parametrize(
    "make",
    [
        lambda: PILImage.fromarray(_marked()).convert("CMYK"),
        lambda: PILImage.fromarray(_marked()).convert("L"),
        lambda: PILImage.fromarray(_marked()).convert("P"),
        lambda: PILImage.fromarray(_marked()[:, :, 0].astype(np.uint16) * 257),
        lambda: PILImage.fromarray(_marked()).convert("RGBA"),
    ],
    ids=["cmyk", "gray", "palette", "16bit", "rgba"],
)
def test_unusual_modes_are_converted_to_rgb(make: object) -> None:
    im = make()  # type: ignore[operator]
    fmt = "JPEG" if im.mode in ("CMYK", "L") else "PNG"
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    img = decode_image(buf.getvalue())
    assert img.pixels.shape == (32, 64, 3) and img.pixels.dtype == np.uint8
    assert img.pixels[:4, :8].mean() > 200


@pytest.mark.parametrize("shape", [(1, 1), (1, 100000), (100000, 1)])
def test_degenerate_sizes_decode(shape: tuple[int, int]) -> None:
    img = decode_image(_encode(np.full((*shape, 3), 200, np.uint8), "PNG"))
    assert img.size == (shape[1], shape[0])


def test_webp_is_accepted() -> None:
    img = decode_image(_encode(_marked(), "WEBP"))
    assert img.size == (64, 32)


def test_large_jpeg_is_decoded_at_reduced_size_but_keeps_original_size() -> None:
    big = np.zeros((3000, 4000, 3), np.uint8)
    big[:750, :1000] = 255
    data = _encode(big, quality=80)
    img = decode_image(data, size_hint=lambda w, h: (w // 10, h // 10))
    assert img.original_size == (4000, 3000)
    assert img.size == (500, 375), "1/8 DCT decode is enough for a 400x300 need"
    assert img.size[0] >= 400 and img.size[1] >= 300


def test_fast_and_pillow_jpeg_paths_agree(tmp_path: Path) -> None:
    data = (COCO_DEMO / "images" / "000000573455.jpg").read_bytes()
    fast = decode_image(data, fast_jpeg=True)
    slow = decode_image(data, fast_jpeg=False)
    a = fast.pixels[:, :, ::-1] if fast.color == "BGR" else fast.pixels
    b = slow.pixels if slow.color == "RGB" else slow.pixels[:, :, ::-1]
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0


def test_sniff_format() -> None:
    assert sniff_format(b"\xff\xd8\xff\xe0") == "JPEG"
    assert sniff_format(b"\x89PNG\r\n\x1a\n....") == "PNG"
    assert sniff_format(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP"
    assert sniff_format(b"GIF89a") is None


def _pillow_header(data: bytes) -> tuple[int, int, str, int]:
    im = PILImage.open(io.BytesIO(data))
    value = im.getexif().get(0x0112, 1)
    return im.size[0], im.size[1], im.mode, value if isinstance(value, int) and 1 <= value <= 8 else 1


def _exif_jpeg(orientation_entry: bytes, order: bytes = b"MM") -> bytes:
    """A JPEG whose EXIF IFD0 holds the one raw 12-byte entry given (in ``order`` byte order)."""
    e = ">" if order == b"MM" else "<"
    tiff = order + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", 1) + orientation_entry + b"\0\0\0\0"
    return _encode(_marked(), exif=b"Exif\x00\x00" + tiff)


def test_jpeg_header_agrees_with_pillow_on_real_and_crafted_jpegs() -> None:
    samples = [p.read_bytes() for p in sorted((COCO_DEMO / "images").glob("*.jpg"))[:10]]
    for orientation in range(1, 9):
        exif = PILImage.Exif()
        exif[0x0112] = orientation
        samples.append(_encode(_marked(), exif=exif.tobytes()))
    samples += [
        _encode(_marked(), progressive=True),
        _encode(_marked()[:, :, 0]),  # grey
        _encode(_marked(), exif=b"Exif\x00\x00MM\x00*garbage"),  # malformed EXIF: upright
        _exif_jpeg(struct.pack("<HHI", 0x0112, 3, 1) + struct.pack("<HH", 6, 0), b"II"),  # little-endian SHORT
        _exif_jpeg(struct.pack(">HHI", 0x0112, 4, 1) + struct.pack(">I", 8)),  # LONG
        _exif_jpeg(struct.pack(">HHI", 0x0112, 3, 2) + struct.pack(">HH", 6, 3)),  # two values: Pillow takes the first
        _exif_jpeg(struct.pack(">HHI", 0x0112, 3, 0) + struct.pack(">HH", 6, 0)),  # no value
        _exif_jpeg(struct.pack(">HHI", 0x0112, 3, 1) + struct.pack(">HH", 9, 0)),  # out of range
    ]
    assert jpeg_header(_jpeg_claiming(65500, 65500)) == (65500, 65500, 3, 1)  # Pillow refuses to open it at all
    for data in samples:
        mine = jpeg_header(data)
        assert mine is not None
        w, h, mode, orientation = _pillow_header(data)
        assert (mine[0], mine[1], mine[3]) == (w, h, orientation)
        assert {1: "L", 3: "RGB"}[mine[2]] == mode


def test_jpeg_header_gives_up_on_anything_odd_and_pillow_decides() -> None:
    good = _encode(_marked())
    sof = good.find(b"\xff\xc0")
    assert jpeg_header(good[:sof]) is None  # no frame header before the data ends
    assert jpeg_header(good[:sof] + b"\xff\xc0\x00\x40" + good[sof + 4 :]) is None  # length past the end... or odd
    assert jpeg_header(good[:sof] + good[sof : sof + 4] + b"\x0c" + good[sof + 5 :]) is None  # 12-bit samples
    twice = good[:sof] + good[sof : sof + 19] + good[sof:]
    assert jpeg_header(twice) is None  # two frame headers
    buf = io.BytesIO()
    PILImage.fromarray(_marked()).convert("CMYK").save(buf, format="JPEG")
    cmyk = buf.getvalue()
    assert jpeg_header(cmyk) is not None and jpeg_header(cmyk)[2] == 4  # type: ignore[index]
    assert decode_image(cmyk).pixels.shape == (32, 64, 3)  # 4 components: the Pillow path converts it
    rng = np.random.default_rng(0)
    for _ in range(300):  # bit flips in the header: a tuple or None, never an exception
        flipped = bytearray(good)
        for at in rng.integers(2, min(len(good), 700), 3):
            flipped[at] ^= 1 << int(rng.integers(0, 8))
        out = jpeg_header(bytes(flipped))
        assert out is None or (len(out) == 4 and 1 <= out[3] <= 8)
