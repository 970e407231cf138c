"""The naive tutorial loop, the baseline: Pillow decode and resize, numpy normalise, decode every anchor, per-class
NMS."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage

from edge_agent.bundles.manifest import (
    AnomalyDecoder,
    DetectionsDecoder,
    InputSpec,
    Manifest,
    NanodetDecoder,
    SoftmaxDecoder,
    YoloxDecoder,
    decoder_feeds,
)
from edge_agent.toolchain.bench.common import Stages
from edge_agent.types import U8Image
from edge_agent.vision import postprocess as pp
from edge_agent.vision.preprocess import center_crop_geometry, letterbox_geometry


# ------------------------------------------------------------------ the naive tutorial loop
class NaiveLoop:
    """The everyday baseline, written the way onnxruntime and common tutorials do it."""

    def __init__(self, manifest: Manifest, session: Any) -> None:
        self.m = manifest
        self.session = session

    def photo(self, data: bytes) -> Stages:
        t0 = time.perf_counter()
        im = PILImage.open(io.BytesIO(data)).convert("RGB")
        return self._image(im, t0)

    def frame(self, bgr: U8Image) -> Stages:
        t0 = time.perf_counter()
        im = PILImage.fromarray(bgr[:, :, ::-1].copy())  # tutorials convert BGR->RGB via PIL too
        return self._image(im, t0)

    def _image(self, im: PILImage.Image, t0: float) -> Stages:
        spec = self.m.input
        t1 = time.perf_counter()
        x = self._preprocess(im, spec)
        t2 = time.perf_counter()
        outs = self.session.run(None, {spec.name: x, **decoder_feeds(self.m)})
        t3 = time.perf_counter()
        self._postprocess(dict(zip([o.name for o in self.session.get_outputs()], outs, strict=True)))
        t4 = time.perf_counter()
        ms = 1000.0
        return {"decode": (t1 - t0) * ms, "preprocess": (t2 - t1) * ms, "inference": (t3 - t2) * ms,
                "postprocess": (t4 - t3) * ms}

    @staticmethod
    def _preprocess(im: PILImage.Image, spec: InputSpec) -> npt.NDArray[Any]:
        w, h = im.size
        big = (spec.width, spec.height)
        mode = spec.resize.mode
        if mode == "stretch":
            im = im.resize(big, PILImage.Resampling.BILINEAR)
        elif mode == "letterbox":
            r = min(big[0] / w, big[1] / h)
            nw, nh = max(1, round(w * r)), max(1, round(h * r))
            pad = spec.resize.pad_value
            canvas = PILImage.new("RGB", big, (pad, pad, pad))
            at = ((big[0] - nw) // 2, (big[1] - nh) // 2) if spec.resize.placement == "center" else (0, 0)
            canvas.paste(im.resize((nw, nh), PILImage.Resampling.BILINEAR), at)
            im = canvas
        else:
            r = max(big[0] / w, big[1] / h) / spec.resize.crop_fraction
            rw, rh = max(big[0], round(w * r)), max(big[1], round(h * r))
            im = im.resize((rw, rh), PILImage.Resampling.BILINEAR)
            left, top = (rw - big[0]) // 2, (rh - big[1]) // 2
            im = im.crop((left, top, left + big[0], top + big[1]))
        x = np.array(im).astype(np.float32)
        if spec.color == "BGR":
            x = x[:, :, ::-1]
        norm = spec.normalize
        x = (x * np.float32(norm.scale) - np.array(norm.mean, np.float32)) / np.array(norm.std, np.float32)
        if spec.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        x = np.expand_dims(x, 0)
        return np.ascontiguousarray(x.astype(np.float32 if spec.dtype == "float32" else np.uint8))

    def _postprocess(self, outs: dict[str, npt.NDArray[Any]]) -> list[Any]:
        m = self.m
        dec = m.decoder
        if isinstance(dec, SoftmaxDecoder):
            logits = outs[dec.output].reshape(-1)
            e = np.exp(logits - np.max(logits))
            probs = e / np.sum(e)
            top = np.argsort(probs)[::-1][: dec.top_k]
            return [(m.labels[i], float(probs[i])) for i in top]
        if isinstance(dec, AnomalyDecoder):
            return [float(outs[dec.score_output].reshape(-1)[0])]
        if isinstance(dec, DetectionsDecoder):  # the graph already filtered, decoded and NMS-ed
            return [(int(c), float(s), b.tolist()) for b, s, c in zip(
                outs[dec.boxes_output], outs[dec.scores_output], outs[dec.class_ids_output], strict=True)]
        size = (m.input.width, m.input.height)
        if isinstance(dec, YoloxDecoder):  # decode every anchor, then filter (YOLOX demo style)
            boxes = pp.decode_yolox(outs[dec.output], size, dec.strides, 0.0)
        elif isinstance(dec, NanodetDecoder):
            boxes = pp.decode_nanodet([outs[n] for n in dec.cls_outputs], [outs[n] for n in dec.reg_outputs],
                                      size, dec.strides, dec.reg_max, 0.0)
        else:
            boxes = pp.decode_yolov8(outs[dec.output], 0.0)
        keep = boxes.scores >= m.thresholds.score
        boxes = boxes.take(np.nonzero(keep)[0])
        found: list[tuple[int, float, list[float]]] = []
        for c in np.unique(boxes.class_ids):  # per-class NMS loop
            idx = np.nonzero(boxes.class_ids == c)[0]
            kept = pp.nms(boxes.xyxy[idx], boxes.scores[idx], m.thresholds.iou)
            found.extend((int(c), float(boxes.scores[idx[k]]), boxes.xyxy[idx[k]].tolist()) for k in kept)
        return found


def resize_size(spec: InputSpec, size: tuple[int, int]) -> tuple[int, int]:
    """(w, h) the pre-processing resizes a ``size`` picture to (before padding or cropping)."""
    mode = spec.resize.mode
    if mode == "stretch":
        return (spec.width, spec.height)
    if mode == "letterbox":
        return letterbox_geometry(size, (spec.width, spec.height), spec.resize.placement)[0]
    return center_crop_geometry(size, (spec.width, spec.height), spec.resize.crop_fraction)[0]


