"""Decode untrusted image bytes safely and no larger than the model needs.

Rules (see shared design RELIABILITY.md):
- the format is decided from the bytes, and only JPEG, PNG and WebP are ever parsed;
- the pixel count is checked from the header, before any pixel is decoded;
- EXIF orientation is applied, so photos come out upright;
- a JPEG much larger than the model input is decoded at 1/2, 1/4 or 1/8 size in the DCT
  (OpenCV reduced decode). For a complete 8-bit RGB or grey JPEG the header (size, EXIF orientation)
  comes from a bounds-checked walk over its markers (:func:`jpeg_header`); anything else, or anything
  odd about it, goes through Pillow, which reads and checks the header and gives the errors;
- a large 8-bit non-interlaced PNG much larger than the model input is decoded a strip of rows at a
  time and each strip shrunk at once (:func:`_png_reduced`), so a 116 KB PNG of 40 MP never becomes
  160 MB of pixels; other large images are shrunk right after decoding, inside the budget;
- every decode holds its decoded pixels from a :class:`PixelBudget` shared by the whole agent, so
  concurrent large images queue for memory instead of all being decoded at once.
"""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from edge_agent.errors import ImageEmptyError, ImageError, ImageTooLargeError, UnsupportedFormatError
from edge_agent.types import Image, U8Image
from edge_agent.vision import imaging

DEFAULT_MAX_PIXELS = 40_000_000
"""40 MP: above any phone photo, far below a decompression bomb."""

LARGE_PIXELS = 4_000_000
"""Images above this many pixels are shrunk while decoding when the model needs at most half their size."""
STRIP_PIXELS = 1 << 18
"""Pixels per strip of the strip-wise PNG decoder."""

SizeHint = Callable[[int, int], tuple[int, int]]
"""(original width, original height) -> minimum (width, height) the model needs."""

_ORIENT_TRANSPOSE = {
    2: PILImage.Transpose.FLIP_LEFT_RIGHT,
    3: PILImage.Transpose.ROTATE_180,
    4: PILImage.Transpose.FLIP_TOP_BOTTOM,
    5: PILImage.Transpose.TRANSPOSE,
    6: PILImage.Transpose.ROTATE_270,
    7: PILImage.Transpose.TRANSVERSE,
    8: PILImage.Transpose.ROTATE_90,
}
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, KeyError, zlib.error,
)


def sniff_format(data: bytes) -> str | None:
    """Return "JPEG", "PNG" or "WEBP" from the magic bytes, or None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _orientation(im: PILImage.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:  # malformed EXIF block: treat as upright
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_MAX_SEGMENTS = 256


def jpeg_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, components, EXIF orientation) of an 8-bit JPEG from its markers, or None.

    A quick look for the fast path only: the markers before the first scan are walked with bounds checks,
    and anything unexpected (no or several frame headers, a bad length, 12-bit samples) returns None, so
    that Pillow reads the file instead and gives its error. Pillow's own header parse costs 0.14 ms right
    after a ``session.run`` (cold caches; 2-core Zen 5), a tenth of the photo path's 10% budget.
    """
    n = len(data)
    pos = 2
    frame: tuple[int, int, int] | None = None
    orientation = 1
    exif_seen = False
    try:
        for _ in range(_MAX_SEGMENTS):
            while pos < n and data[pos] == 0xFF and pos + 1 < n and data[pos + 1] == 0xFF:
                pos += 1  # fill bytes
            if pos + 4 > n or data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if 0xD0 <= marker <= 0xD7 or marker == 0x01:
                pos += 2
                continue
            if marker in (0xDA, 0xD9):  # start of scan / end of image: the header is over
                break
            length = struct.unpack_from(">H", data, pos + 2)[0]
            end = pos + 2 + length
            if length < 2 or end > n:
                return None
            if marker in _SOF:
                if frame is not None or length < 8 or data[pos + 4] != 8:
                    return None
                h, w = struct.unpack_from(">HH", data, pos + 5)
                frame = (w, h, data[pos + 9])
            elif marker == 0xE1 and not exif_seen and data[pos + 4 : pos + 10] == b"Exif\0\0":
                exif_seen = True  # Pillow, too, reads the first EXIF block only
                orientation = _exif_orientation(data, pos + 10, end)
            pos = end
        else:
            return None
    except (struct.error, IndexError):
        return None
    if frame is None:
        return None
    return frame[0], frame[1], frame[2], orientation


def _exif_orientation(data: bytes, start: int, end: int) -> int:
    """Orientation tag (0x0112) of IFD0 in the TIFF block ``data[start:end]``; 1 if absent or malformed."""
    try:
        order = data[start : start + 2]
        if order == b"II":
            e = "<"
        elif order == b"MM":
            e = ">"
        else:
            return 1
        magic, ifd = struct.unpack_from(e + "HI", data, start + 2)
        at = start + ifd
        if magic != 42 or at + 2 > end:
            return 1
        count = struct.unpack_from(e + "H", data, at)[0]
        for i in range(min(count, 512)):
            entry = at + 2 + 12 * i
            if entry + 12 > end:
                return 1
            tag, kind, n = struct.unpack_from(e + "HHI", data, entry)
            if tag == 0x0112:
                if n == 0:
                    return 1
                if kind == 3:  # SHORT
                    value = struct.unpack_from(e + "H", data, entry + 8)[0]
                elif kind == 4:  # LONG
                    value = struct.unpack_from(e + "I", data, entry + 8)[0]
                else:
                    return 1
                return value if 1 <= value <= 8 else 1
    except struct.error:
        return 1
    return 1


def _reduction(size: tuple[int, int], need: tuple[int, int]) -> int:
    """Largest JPEG DCT reduction (8, 4, 2, 1) that still yields at least ``need`` pixels."""
    w, h = size
    for factor in (8, 4, 2):
        if -(-w // factor) >= need[0] and -(-h // factor) >= need[1]:
            return factor
    return 1


def _orient_array(pixels: U8Image, orientation: int) -> U8Image:
    """Apply an EXIF orientation (1-8) to an (H, W, 3) array."""
    if orientation in (5, 6, 7, 8):
        pixels = np.ascontiguousarray(np.swapaxes(pixels, 0, 1))
        # after a transpose: 5 = done; 6 = mirror x; 7 = rotate 180; 8 = mirror y
        if orientation == 6:
            pixels = pixels[:, ::-1]
        elif orientation == 7:
            pixels = pixels[::-1, ::-1]
        elif orientation == 8:
            pixels = pixels[::-1, :]
    elif orientation == 2:
        pixels = pixels[:, ::-1]
    elif orientation == 3:
        pixels = pixels[::-1, ::-1]
    elif orientation == 4:
        pixels = pixels[::-1, :]
    return np.ascontiguousarray(pixels)


class PixelBudget:
    """A weighted semaphore over decoded pixels, shared by every decode of one agent.

    ``hold(n)`` waits until ``n`` more pixels fit under ``capacity`` (first come, first served: a large
    image is not overtaken for ever by small ones), and gives them back on exit. A request larger than
    the whole budget is clamped to it: such an image is decoded alone.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self.waits = 0
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        n = max(1, min(int(pixels), self.capacity))
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            if self._queue[0] is not ticket or self.used + n > self.capacity:
                self.waits += 1
            while self._queue[0] is not ticket or self.used + n > self.capacity:
                self._cond.wait()
            self._queue.popleft()
            self.used += n
            self.peak = max(self.peak, self.used)
            self._cond.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


def _hold(budget: PixelBudget | None, pixels: int) -> contextlib.AbstractContextManager[None]:
    return budget.hold(pixels) if budget is not None else contextlib.nullcontext()


def decode_image(
    data: bytes,
    *,
    size_hint: SizeHint | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fast_jpeg: bool = True,
    budget: PixelBudget | None = None,
) -> Image:
    """Decode untrusted ``data`` into an upright :class:`Image`.

    ``size_hint`` receives the upright original size and returns the minimum size the
    model needs; JPEGs are then decoded at reduced size when that is enough, and so are large
    PNGs (strip by strip) and other large images (shrunk right after decoding). ``budget``: the
    agent's :class:`PixelBudget`; the decode holds the pixels it materialises from it.
    Raises ImageEmptyError, UnsupportedFormatError, ImageTooLargeError or ImageError.
    """
    if not data:
        raise ImageEmptyError("empty image")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedFormatError("not a JPEG, PNG or WebP image")
    if fmt == "JPEG" and fast_jpeg:
        fast = _fast_jpeg(data, size_hint, max_pixels, budget)
        if fast is not None:
            return fast
    with _open(data, fmt) as im:  # the header only
        w, h = im.size
        if w < 1 or h < 1:
            raise ImageError("image has no pixels")
        if w * h > max_pixels:
            raise ImageTooLargeError(f"image has {w}x{h} pixels, limit is {max_pixels}")
        layout = _png_layout(data) if fmt == "PNG" else None
        # Pillow finds a PNG's EXIF only by decoding it whole: read from the chunks when they are usual
        orientation = layout.orientation if layout is not None else None if fmt == "PNG" else _orientation(im)
    try:
        if orientation is None:  # an unusual PNG: decoded whole, inside the budget
            with _hold(budget, w * h):
                pixels, orientation = _pillow_pixels(data, fmt, None, size_hint)
        else:
            need_stored = _geometry(w, h, orientation, size_hint)[1]
            factor = _large_factor((w, h), need_stored)
            if layout is not None and layout.streamable and factor > 1:
                with _hold(budget, 2 * _strip_rows(w, factor) * w):
                    pixels = _png_reduced(data, layout, factor)
            else:
                if fmt == "JPEG" and size_hint is not None:
                    f = _reduction((w, h), need_stored)
                    weight = -(-w // f) * -(-h // f)  # what Pillow's draft (DCT scaling) decodes
                else:
                    weight = w * h * (3 if fmt == "WEBP" else 1)  # libwebp's canvases and Pillow's copy of one
                with _hold(budget, weight):  # every Pillow object of the decode is gone when the hold ends
                    pixels, _ = _pillow_pixels(data, fmt, orientation, size_hint)
        if orientation in _ORIENT_TRANSPOSE:
            pixels = _orient_array(pixels, orientation)
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image too large: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"corrupt or truncated {fmt} image: {exc}") from exc
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageError("image did not decode to 3 channels")
    upright = _geometry(w, h, orientation, size_hint)[0]
    return Image(pixels=np.ascontiguousarray(pixels), color="RGB", original_size=upright)


def _open(data: bytes, fmt: str) -> PILImage.Image:
    """Pillow's lazy open of ``fmt`` only (reads the header), its errors translated."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            return PILImage.open(io.BytesIO(data), formats=[fmt])
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"unreadable {fmt} image") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"unreadable {fmt} image: {exc}") from exc


def _pillow_pixels(
    data: bytes, fmt: str, orientation: int | None, size_hint: SizeHint | None
) -> tuple[U8Image, int]:
    """Decode with Pillow: (RGB pixels in stored orientation, shrunk when large; the EXIF orientation). Every
    Pillow object it makes is released when it returns (a WebP decoder keeps two canvases until then)."""
    with _open(data, fmt) as im:
        w, h = im.size
        if orientation is None:
            im.load()
            orientation = _orientation(im)
        need_stored = _geometry(w, h, orientation, size_hint)[1]
        if fmt == "JPEG" and size_hint is not None:
            im.draft("RGB", need_stored)
        return _load_rgb(im, _large_factor(im.size, need_stored)), orientation


def _large_factor(size: tuple[int, int], need: tuple[int, int]) -> int:
    """How much a large image (over :data:`LARGE_PIXELS`) is shrunk while decoding; 1 for the others."""
    return _shrink_factor(size, need) if size[0] * size[1] > LARGE_PIXELS else 1


def _shrink_factor(size: tuple[int, int], need: tuple[int, int]) -> int:
    """Largest integer factor that still leaves at least ``need`` pixels each way (1: no shrinking)."""
    w, h = size
    f = min(w // max(1, need[0]), h // max(1, need[1]))
    while f > 1 and (-(-w // f) < need[0] or -(-h // f) < need[1]):
        f -= 1
    return max(1, f)


def _load_rgb(im: PILImage.Image, factor: int) -> U8Image:
    """Decode ``im`` to (h, w, 3) RGB, shrunk by ``factor`` (box filter) before the copy out of Pillow."""
    im.load()
    if factor > 1 and im.mode in _REDUCIBLE:
        im = im.reduce(factor)  # before any conversion: the full-size picture exists once, in Pillow
        factor = 1
    rgb = im if im.mode == "RGB" else _to_rgb(im)
    if factor > 1:
        rgb = rgb.reduce(factor)
    return np.asarray(rgb, dtype=np.uint8)


_REDUCIBLE = frozenset(("RGB", "RGBA", "L", "LA"))


# --- strip-wise PNG decoding -----------------------------------------------------------------------------------


class _PngLayout:
    """Where a PNG's parts are: IHDR fields, the raw PLTE/tRNS chunks, the IDAT payload ranges."""

    def __init__(self, width: int, height: int, depth: int, color: int, interlace: int) -> None:
        self.width, self.height, self.depth, self.color, self.interlace = width, height, depth, color, interlace
        self.extra = b""
        self.idat: list[tuple[int, int]] = []
        self.orientation = 1
        self.animated = False

    @property
    def channels(self) -> int:
        return {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[self.color]

    @property
    def streamable(self) -> bool:
        """8-bit samples, not interlaced: rows can be cut into strips byte-exactly."""
        return self.depth == 8 and self.interlace == 0 and bool(self.idat) and not self.animated


_PNG_CHUNK_LIMIT = 100_000


def _png_layout(data: bytes) -> _PngLayout | None:
    """The chunk layout of a PNG, or None for anything unusual (Pillow then reads it whole and judges it)."""
    pos, n = 8, len(data)
    layout: _PngLayout | None = None
    for _ in range(_PNG_CHUNK_LIMIT):
        if pos + 12 > n:
            return None
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > n:
            return None
        if kind == b"IHDR":
            if layout is not None or length != 13:
                return None
            w, h, depth, color, _compression, _filter, interlace = struct.unpack_from(">IIBBBBB", data, pos + 8)
            if color not in (0, 2, 3, 4, 6):
                return None
            layout = _PngLayout(w, h, depth, color, interlace)
        elif layout is None:
            return None
        elif kind in (b"PLTE", b"tRNS"):
            layout.extra += data[pos:end]
        elif kind == b"IDAT":
            layout.idat.append((pos + 8, length))
        elif kind == b"eXIf":  # the last one counts, as with Pillow
            start = pos + 14 if data[pos + 8 : pos + 14] == b"Exif\0\0" else pos + 8
            layout.orientation = _exif_orientation(data, start, end - 4)
        elif kind == b"acTL":
            layout.animated = True
        elif kind == b"IEND":
            return layout
        pos = end
    return None


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _strip_rows(width: int, factor: int) -> int:
    """Rows per strip: a multiple of ``factor`` near :data:`STRIP_PIXELS` pixels."""
    return factor * max(1, STRIP_PIXELS // max(1, width * factor))


def _png_reduced(data: bytes, layout: _PngLayout, factor: int) -> U8Image:
    """Decode a streamable PNG shrunk by ``factor``, holding one strip of rows at a time.

    The filtered rows are inflated a strip at a time (never more than asked for: a deflate bomb inflates
    no further than the image's own size) and handed to Pillow as a small PNG of their own, whose first
    row is the previous strip's last row, unfiltered: the PNG filters that look one row up then see
    exactly what they would have seen in the whole image. Each strip is shrunk (area average) at once.
    """
    w, h = layout.width, layout.height
    row_bytes = w * layout.channels
    rows = _strip_rows(w, factor)
    out_w = -(-w // factor)
    inflater = zlib.decompressobj()
    chunks = iter(layout.idat)
    pending = b""

    def take(count: int) -> bytes:
        nonlocal pending
        got = bytearray()
        while len(got) < count:
            if not pending:
                nxt = next(chunks, None)
                if nxt is None:
                    break
                pending = data[nxt[0] : nxt[0] + nxt[1]]
            got += inflater.decompress(pending, count - len(got))
            pending = inflater.unconsumed_tail
            if inflater.eof:
                break
        return bytes(got)

    parts: list[U8Image] = []
    previous: bytes | None = None
    y = 0
    while y < h:
        k = min(rows, h - y)
        filtered = take(k * (row_bytes + 1))
        if len(filtered) != k * (row_bytes + 1):
            raise ImageError("corrupt or truncated PNG image: image data ends early")
        lead = b"" if previous is None else b"\0" + previous
        header = struct.pack(">IIBBBBB", w, k + (previous is not None), 8, layout.color, 0, 0, 0)
        strip_png = b"".join((
            b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header), layout.extra,
            _png_chunk(b"IDAT", zlib.compress(lead + filtered, 0)), _png_chunk(b"IEND", b""),
        ))
        with PILImage.open(io.BytesIO(strip_png), formats=["PNG"]) as im:
            im.load()
            rows_in = im.size[1]
            previous = np.asarray(im.crop((0, rows_in - 1, w, rows_in))).tobytes()  # raw samples, as filtered
            part = _load_rgb(im.crop((0, 1, w, rows_in)) if lead else im, factor)
        if part.shape[:2] != (-(-k // factor), out_w):
            raise ImageError("corrupt PNG image: a strip decoded to the wrong size")
        parts.append(part)
        y += k
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _geometry(
    w: int, h: int, orientation: int, size_hint: SizeHint | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(upright size, size needed in stored orientation) of a stored ``w`` x ``h`` picture."""
    turned = orientation in (5, 6, 7, 8)
    upright = (h, w) if turned else (w, h)
    need = size_hint(*upright) if size_hint is not None else upright
    return upright, ((need[1], need[0]) if turned else need)


def _fast_jpeg(data: bytes, size_hint: SizeHint | None, max_pixels: int, budget: PixelBudget | None) -> Image | None:
    """An 8-bit RGB or grey JPEG, complete (ends with EOI): header from :func:`jpeg_header`, pixels from OpenCV's
    reduced-size decode. None when any of that does not hold: the caller then goes the Pillow way (Pillow's own
    reduced-size ``draft`` decode)."""
    header = jpeg_header(data)
    if header is None or header[2] not in (1, 3) or data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        return None
    w, h, _, orientation = header
    if w < 1 or h < 1:
        return None
    if w * h > max_pixels:
        raise ImageTooLargeError(f"image has {w}x{h} pixels, limit is {max_pixels}")
    upright, need_stored = _geometry(w, h, orientation, size_hint)
    factor = _reduction((w, h), need_stored)
    with _hold(budget, -(-w // factor) * -(-h // factor)):
        bgr = imaging.decode_jpeg_reduced(data, factor)
    if bgr is None:
        return None
    return Image(pixels=_orient_array(bgr, orientation), color="BGR", original_size=upright)


def _to_rgb(im: PILImage.Image) -> PILImage.Image:
    """Convert any mode (L, P, CMYK, I;16, RGBA, LA...) to 8-bit RGB."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32)
        top = float(arr.max()) or 1.0
        scaled = (arr * (255.0 / top)).clip(0, 255).astype(np.uint8)
        return PILImage.fromarray(scaled).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")
