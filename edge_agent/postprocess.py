"""Pure numpy output decoders. Boxes are (N, 4) float32 x1, y1, x2, y2 in model-input pixels.

No I/O, no state beyond cached anchor grids (read-only arrays keyed by geometry).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Boxes:
    """Detections as arrays: ``xyxy`` (N, 4) float32, ``scores`` (N,) float32, ``class_ids`` (N,) int64."""

    xyxy: F32
    scores: F32
    class_ids: I64

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def empty() -> Boxes:
        return Boxes(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64))

    def take(self, idx: npt.NDArray[np.intp] | I64) -> Boxes:
        return Boxes(self.xyxy[idx], self.scores[idx], self.class_ids[idx])


def softmax(logits: F32) -> F32:
    """Softmax over the last axis of (..., C) logits, numerically stable."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: F32 = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32, copy=False)
    return out


def top_k(probs: F32, k: int) -> tuple[I64, F32]:
    """Indices and values of the ``k`` largest of (C,) ``probs``, best first."""
    k = min(k, probs.shape[0])
    idx = np.argpartition(-probs, k - 1)[:k]
    idx = idx[np.argsort(-probs[idx], kind="stable")]
    return idx.astype(np.int64), probs[idx]


def box_iou(a: npt.NDArray[np.floating[Any]], b: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    """IoU matrix (N, M) between (N, 4) and (M, 4) xyxy boxes; 0 where the union is empty."""
    a64 = np.asarray(a, dtype=np.float64).reshape(-1, 4).T
    b64 = np.asarray(b, dtype=np.float64).reshape(-1, 4).T
    w = np.minimum(a64[2][:, None], b64[2]) - np.maximum(a64[0][:, None], b64[0])
    h = np.minimum(a64[3][:, None], b64[3]) - np.maximum(a64[1][:, None], b64[1])
    inter = np.maximum(w, 0.0) * np.maximum(h, 0.0)
    area_a = np.maximum(a64[2] - a64[0], 0.0) * np.maximum(a64[3] - a64[1], 0.0)
    area_b = np.maximum(b64[2] - b64[0], 0.0) * np.maximum(b64[3] - b64[1], 0.0)
    union = area_a[:, None] + area_b - inter
    out: npt.NDArray[np.float64] = inter / np.maximum(union, 1e-12)
    out[union <= 0] = 0.0
    return out


_NMS_MATRIX_MAX = 512
"""Up to this many candidates, NMS builds the full IoU matrix (512^2 float64 = 2 MiB)."""


def nms(xyxy: F32, scores: F32, iou_threshold: float) -> I64:
    """Greedy non-maximum suppression; returns kept indices, highest score first.

    Invariants: no two kept boxes overlap with IoU > ``iou_threshold``; the best box is kept.
    """
    order = np.argsort(-scores, kind="stable")
    if order.size <= _NMS_MATRIX_MAX:
        # one vectorised IoU matrix, then a cheap greedy pass over its rows
        over = box_iou(xyxy[order], xyxy[order]) > iou_threshold
        suppressed = np.zeros(order.size, dtype=bool)
        kept: list[int] = []
        for i in range(order.size):
            if not suppressed[i]:
                kept.append(i)
                suppressed |= over[i]
        return order[kept].astype(np.int64)
    x1, y1, x2, y2 = xyxy[:, 0], xyxy[:, 1], xyxy[:, 2], xyxy[:, 3]
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        union = areas[i] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: Boxes, iou_threshold: float, max_detections: int) -> Boxes:
    """Class-aware NMS: boxes of different classes never suppress each other."""
    if len(boxes) == 0:
        return boxes
    offset = (boxes.xyxy.max() + 1.0) * boxes.class_ids.astype(np.float32)
    shifted = boxes.xyxy + offset[:, None]
    keep = nms(shifted, boxes.scores, iou_threshold)[:max_detections]
    return boxes.take(keep)


@lru_cache(maxsize=16)
def _grid(width: int, height: int, strides: tuple[int, ...]) -> tuple[F32, F32]:
    """Cell (col, row) grid (N, 2) and per-cell stride (N,) for row-major feature maps per stride."""
    grids = []
    steps = []
    for s in strides:
        gw, gh = width // s, height // s
        ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        grids.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        steps.append(np.full(gw * gh, s))
    g = np.concatenate(grids).astype(np.float32)
    st = np.concatenate(steps).astype(np.float32)
    g.flags.writeable = False
    st.flags.writeable = False
    return g, st


def _select(scores_all: F32, score_threshold: float) -> tuple[npt.NDArray[np.intp], I64, F32]:
    """Per row best class; returns (rows kept, class ids, scores) above the threshold.

    The class is looked up only for the rows that pass, which are few in a real frame.
    """
    best = scores_all.max(axis=1)
    rows = np.flatnonzero(best >= score_threshold)
    cls = scores_all[rows].argmax(axis=1).astype(np.int64)
    return rows, cls, best[rows].astype(np.float32)


def decode_yolox(output: F32, input_size: tuple[int, int], strides: tuple[int, ...], score_threshold: float) -> Boxes:
    """YOLOX head without decode in graph.

    ``output``: (1, N, 5 + C) rows of (dx, dy, log w, log h, obj, cls...) with obj and cls already
    sigmoid-ed; N = sum over strides of (W/s)*(H/s). Score = obj * cls.
    """
    out = output[0]
    grid, stride = _grid(input_size[0], input_size[1], strides)
    # obj * cls <= obj (both in [0, 1]): only rows whose objectness passes can pass at all
    cand = np.flatnonzero(out[:, 4] >= score_threshold)
    if cand.size == 0:
        return Boxes.empty()
    sub = out[cand]
    local, cls, scores = _select(sub[:, 4:5] * sub[:, 5:], score_threshold)
    if local.size == 0:
        return Boxes.empty()
    rows = cand[local]
    sel = sub[local]
    s = stride[rows, None]
    centre = (sel[:, 0:2] + grid[rows]) * s
    wh = np.exp(sel[:, 2:4]) * s
    xyxy = np.concatenate([centre - wh / 2, centre + wh / 2], axis=1).astype(np.float32)
    return Boxes(xyxy, scores, cls)


def decode_nanodet(
    cls_outputs: list[F32],
    reg_outputs: list[F32],
    input_size: tuple[int, int],
    strides: tuple[int, ...],
    reg_max: int,
    score_threshold: float,
) -> Boxes:
    """NanoDet GFL head.

    ``cls_outputs[i]``: (1, N_i, C) sigmoid class scores; ``reg_outputs[i]``: (1, N_i, 4*(reg_max+1))
    distance bins for left, top, right, bottom. Cell centre = (col*s + (s-1)/2, row*s + (s-1)/2);
    distance = s * sum(softmax(bins) * [0..reg_max]).
    """
    parts = []
    offset = 0
    for c_out, r_out in zip(cls_outputs, reg_outputs, strict=True):
        local, c_ids, c_scores = _select(c_out[0], score_threshold)
        parts.append((local + offset, c_ids, c_scores, r_out[0][local]))
        offset += c_out.shape[1]
    rows = np.concatenate([p[0] for p in parts])
    if rows.size == 0:
        return Boxes.empty()
    cls = np.concatenate([p[1] for p in parts])
    scores = np.concatenate([p[2] for p in parts])
    reg_all = np.concatenate([p[3] for p in parts])
    grid, stride = _grid(input_size[0], input_size[1], strides)
    s = stride[rows, None]
    centre = grid[rows] * s + (s - 1) / 2
    bins = softmax(reg_all.reshape(-1, 4, reg_max + 1))
    dist = (bins * np.arange(reg_max + 1, dtype=np.float32)).sum(axis=2) * s
    xyxy = np.concatenate([centre - dist[:, 0:2], centre + dist[:, 2:4]], axis=1).astype(np.float32)
    return Boxes(xyxy, scores, cls)


def decode_yolov8(output: F32, score_threshold: float) -> Boxes:
    """YOLOv8-style head: ``output`` (1, 4 + C, N) of cx, cy, w, h (input pixels) then class scores."""
    out = output[0].T
    rows, cls, scores = _select(out[:, 4:], score_threshold)
    if rows.size == 0:
        return Boxes.empty()
    cxcy = out[rows, 0:2]
    wh = out[rows, 2:4]
    xyxy = np.concatenate([cxcy - wh / 2, cxcy + wh / 2], axis=1).astype(np.float32)
    return Boxes(xyxy, scores, cls)


def anomaly_score(score_output: F32) -> float:
    """Image score from a (1,), (1, 1) or scalar output."""
    return float(np.asarray(score_output).reshape(-1)[0])


def anomaly_map(map_output: F32) -> F32:
    """(h, w) float32 heat map from a (1, 1, h, w), (1, h, w) or (h, w) output."""
    arr = np.asarray(map_output, dtype=np.float32)
    while arr.ndim > 2:
        arr = arr[0]
    return arr
