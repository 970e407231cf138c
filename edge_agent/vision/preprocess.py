"""Manifest-driven pre-processing into preallocated buffers.

A :class:`Preprocessor` owns its buffers; ``run`` returns a view of them, valid until the
next call on the same instance. Use one instance per worker thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from edge_agent.bundles.manifest import InputSpec
from edge_agent.types import Image, PreprocessMeta, U8Image
from edge_agent.vision import imaging


def letterbox_geometry(
    src: tuple[int, int], dst: tuple[int, int], placement: str
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Fit ``src`` (w, h) inside ``dst`` (W, H) keeping aspect.

    Returns ((new_w, new_h), (pad_x, pad_y)); new sizes are at least 1 and at most W, H.
    """
    w, h = src
    big_w, big_h = dst
    r = min(big_w / w, big_h / h)
    nw = min(big_w, max(1, round(w * r)))
    nh = min(big_h, max(1, round(h * r)))
    if placement == "center":
        return (nw, nh), ((big_w - nw) // 2, (big_h - nh) // 2)
    return (nw, nh), (0, 0)


def center_crop_geometry(
    src: tuple[int, int], dst: tuple[int, int], crop_fraction: float
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resize ``src`` so that ``dst`` is the central ``crop_fraction`` of its short side.

    Returns ((resized_w, resized_h), (offset_x, offset_y)) of the crop inside the resized image.
    """
    w, h = src
    big_w, big_h = dst
    r = max(big_w / w, big_h / h) / crop_fraction
    rw = max(big_w, round(w * r))
    rh = max(big_h, round(h * r))
    return (rw, rh), ((rw - big_w) // 2, (rh - big_h) // 2)


class Preprocessor:
    """Turns an :class:`Image` into the model's input tensor, per an :class:`InputSpec`."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        w, h = spec.width, spec.height
        self._canvas: U8Image = np.empty((h, w, 3), dtype=np.uint8)
        dtype = np.float32 if spec.dtype == "float32" else np.uint8
        shape = (1, 3, h, w) if spec.layout == "NCHW" else (1, h, w, 3)
        self._tensor: npt.NDArray[np.generic] = np.empty(shape, dtype=dtype)
        norm = spec.normalize
        std = np.asarray(norm.std, dtype=np.float64)
        self._mul = (norm.scale / std).astype(np.float32)
        self._add = (-np.asarray(norm.mean, dtype=np.float64) / std).astype(np.float32)
        self._identity = bool(np.all(self._mul == 1.0) and np.all(self._add == 0.0))
        self._crop_buffers: dict[tuple[int, int], U8Image] = {}
        # Letterbox: the padding of a stream of same-sized frames never changes, so it is written into the
        # canvas and the tensor once per geometry; later frames only touch the picture's region.
        self._letterbox: tuple[int, int, int, int] | None = None
        self._region: tuple[slice, slice] | None = None
        self._planes: dict[tuple[int, int], list[U8Image]] = {}

    def required_size(self, width: int, height: int) -> tuple[int, int]:
        """Minimum decoded size of a (width, height) image that loses nothing at model resolution."""
        spec = self.spec
        mode = spec.resize.mode
        if mode == "stretch":
            return (min(width, spec.width), min(height, spec.height))
        if mode == "letterbox":
            r = min(spec.width / width, spec.height / height, 1.0)
        else:
            r = min(max(spec.width / width, spec.height / height) / spec.resize.crop_fraction, 1.0)
        return (max(1, math.ceil(width * r)), max(1, math.ceil(height * r)))

    def run(self, image: Image) -> tuple[npt.NDArray[np.generic], PreprocessMeta]:
        """Return (tensor, meta); ``tensor`` is this instance's buffer (do not keep it, do not write to it)."""
        self._region = None
        meta = self._resize(image)
        self._fill_tensor(image.color)
        return self._tensor, meta

    def _resize(self, image: Image) -> PreprocessMeta:
        spec = self.spec
        canvas = self._canvas
        src = image.pixels
        src_w, src_h = image.size
        orig_w, orig_h = image.original_size
        big = (spec.width, spec.height)
        interp = spec.resize.interpolation
        mode = spec.resize.mode
        if mode == "stretch":
            imaging.resize_into(src, canvas, interp)
            return PreprocessMeta(spec.width / orig_w, spec.height / orig_h, 0.0, 0.0, image.original_size)
        if mode == "letterbox":
            (nw, nh), (px, py) = letterbox_geometry((src_w, src_h), big, spec.resize.placement)
            geometry = (nw, nh, px, py)
            if geometry == self._letterbox:  # the pad is one grey level: the same in any channel order
                self._region = (slice(py, py + nh), slice(px, px + nw))
            else:  # new geometry: pad the whole canvas; _fill_tensor then converts all of it once
                canvas.fill(spec.resize.pad_value)
                self._letterbox = geometry
            imaging.resize_into(src, canvas[py : py + nh, px : px + nw], interp)
            return PreprocessMeta(nw / orig_w, nh / orig_h, float(px), float(py), image.original_size)
        (rw, rh), (ox, oy) = center_crop_geometry((src_w, src_h), big, spec.resize.crop_fraction)
        buf = self._crop_buffers.get((rw, rh))
        if buf is None:
            if len(self._crop_buffers) > 8:
                self._crop_buffers.clear()
            buf = self._crop_buffers[(rw, rh)] = np.empty((rh, rw, 3), dtype=np.uint8)
        imaging.resize_into(src, buf, interp)
        canvas[...] = buf[oy : oy + spec.height, ox : ox + spec.width]
        return PreprocessMeta(rw / orig_w, rh / orig_h, float(-ox), float(-oy), image.original_size)

    def _fill_tensor(self, color: str) -> None:
        canvas = self._canvas
        tensor = self._tensor
        swap = color != self.spec.color
        if self._region is not None:  # same letterbox as last time: the padding is already in the tensor
            rows, cols = self._region
            canvas = canvas[rows, cols]
            tensor = tensor[:, :, rows, cols] if self.spec.layout == "NCHW" else tensor[:, rows, cols]
        if self.spec.layout == "NCHW":
            dst = [tensor[0, 2 - c] if swap else tensor[0, c] for c in range(3)]  # in the canvas's channel order
            if self._identity and tensor.dtype == np.uint8 and all(d.flags.c_contiguous for d in dst):
                imaging.split_into(canvas, dst)  # one OpenCV pass: de-interleave straight into the planes
                return
            planes = self._planes_for(canvas.shape[0], canvas.shape[1])
            imaging.split_into(canvas, planes)  # contiguous planes: numpy's casts below then run at full speed
            for c in range(3):
                if self._identity:
                    np.copyto(dst[c], planes[c], casting="unsafe")
                else:
                    k = 2 - c if swap else c  # tensor channel fed by canvas channel c
                    np.multiply(planes[c], self._mul[k], out=dst[c], casting="unsafe")
                    np.add(dst[c], self._add[k], out=dst[c], casting="unsafe")
            return
        src = canvas[:, :, ::-1] if swap else canvas
        if self._identity:
            np.copyto(tensor[0], src, casting="unsafe")
        else:
            np.multiply(src, self._mul, out=tensor[0], casting="unsafe")
            np.add(tensor[0], self._add, out=tensor[0], casting="unsafe")

    def _planes_for(self, h: int, w: int) -> list[U8Image]:
        planes = self._planes.get((h, w))
        if planes is None:
            if len(self._planes) > 8:
                self._planes.clear()
            planes = self._planes[(h, w)] = [np.empty((h, w), np.uint8) for _ in range(3)]
        return planes


def map_box_to_original(box: Sequence[float], meta: PreprocessMeta) -> tuple[float, float, float, float]:
    """:func:`map_boxes_to_original` for one (x1, y1, x2, y2) box, in plain Python (a frame's few detections)."""
    x1, y1, x2, y2 = box
    sx, sy, px, py = meta.scale_x, meta.scale_y, meta.pad_x, meta.pad_y
    w, h = meta.original_size
    return (min(max((x1 - px) / sx, 0.0), w), min(max((y1 - py) / sy, 0.0), h),
            min(max((x2 - px) / sx, 0.0), w), min(max((y2 - py) / sy, 0.0), h))


def map_boxes_to_original(boxes: npt.NDArray[np.float32], meta: PreprocessMeta) -> npt.NDArray[np.float32]:
    """Map (N, 4) x1, y1, x2, y2 boxes from model-input pixels to original-image pixels, clipped."""
    out = np.empty_like(boxes)
    out[:, 0] = (boxes[:, 0] - meta.pad_x) / meta.scale_x
    out[:, 2] = (boxes[:, 2] - meta.pad_x) / meta.scale_x
    out[:, 1] = (boxes[:, 1] - meta.pad_y) / meta.scale_y
    out[:, 3] = (boxes[:, 3] - meta.pad_y) / meta.scale_y
    w, h = meta.original_size
    np.clip(out[:, 0::2], 0, w, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0, h, out=out[:, 1::2])
    return out
