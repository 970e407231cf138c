"""Pure numpy output decoders. Boxes are (N, 4) float32 x1, y1, x2, y2 in model-input pixels.

No I/O, no state beyond cached anchor grids (read-only arrays keyed by geometry).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.types import Band

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
    if logits.ndim == 1:  # the per-image case: fewest numpy calls, it runs once per frame
        e = np.exp(logits - logits.max())
        e /= e.sum()
        one: F32 = e.astype(np.float32, copy=False)
        return one
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: F32 = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32, copy=False)
    return out


def top_k(probs: F32, k: int) -> tuple[I64, F32]:
    """Indices and values of the ``k`` largest of (C,) ``probs``, best first (ties: lower index first)."""
    n = probs.shape[0]
    k = min(k, n)
    if n <= 1024:  # one stable sort beats partition + sort at classifier sizes
        idx = np.argsort(-probs, kind="stable")[:k]
    else:
        idx = np.argpartition(-probs, k - 1)[:k]
        idx = idx[np.argsort(-probs[idx], kind="stable")]
    return idx.astype(np.int64, copy=False), probs[idx]


SMALL_CLASSES = 64
"""Up to this many classes, :func:`softmax_top_k_small` (plain Python) beats numpy: right after
``session.run`` the caches are cold and each numpy call costs tens of microseconds to warm up
(measured: 0.14 ms vs 0.28 ms for 15 classes on the crop model)."""


def softmax_top_k_small(logits: list[float], k: int, apply_softmax: bool = True) -> tuple[list[int], list[float]]:
    """Indices and (softmax) values of the ``k`` largest of a short list, best first, ties by lower index."""
    if apply_softmax:
        top = max(logits)
        e = [math.exp(v - top) for v in logits]
        total = sum(e)
        probs = [v / total for v in e]
    else:
        probs = list(logits)
    order = sorted(range(len(probs)), key=probs.__getitem__, reverse=True)[:k]  # stable: ties keep index order
    return order, [probs[i] for i in order]


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


def _overlaps(xyxy: F32, iou_threshold: float) -> npt.NDArray[np.bool_]:
    """(N, N) IoU > threshold, as ``inter > threshold * union`` with in-place outer ops (no division, few
    temporaries: 3-4x cheaper than :func:`box_iou` at a few hundred boxes; the same answer off the exact tie)."""
    x1, y1, x2, y2 = np.asarray(xyxy, dtype=np.float64).T
    area = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    w = np.minimum.outer(x2, x2)
    w -= np.maximum.outer(x1, x1)
    np.maximum(w, 0.0, out=w)
    h = np.minimum.outer(y2, y2)
    h -= np.maximum.outer(y1, y1)
    np.maximum(h, 0.0, out=h)
    w *= h  # intersection
    union = np.add.outer(area, area)
    union -= w
    union *= iou_threshold
    over: npt.NDArray[np.bool_] = w > union
    return over


def nms(xyxy: F32, scores: F32, iou_threshold: float) -> I64:
    """Greedy non-maximum suppression; returns kept indices, highest score first.

    Invariants: no two kept boxes overlap with IoU > ``iou_threshold``; the best box is kept.
    """
    order = np.argsort(-scores, kind="stable")
    if order.size <= _NMS_MATRIX_MAX:
        # one vectorised "IoU > threshold" matrix, then a cheap greedy pass over its rows
        over = _overlaps(xyxy[order], iou_threshold)
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


SMALL_NMS = 128
"""Up to this many candidates the detector tail (NMS, box mapping) runs in plain Python on lists: right after
``session.run`` each numpy call costs tens of microseconds (cold caches), and a real frame leaves a few dozen
candidates. Measured on 2-core Zen 5, 43-88 candidates: NMS + mapping 0.16-0.25 ms (numpy) -> 0.09-0.17 ms."""


def batched_nms_keep(
    xyxy: Sequence[Sequence[float]], scores: Sequence[float], class_ids: Sequence[int], iou_threshold: float,
    max_detections: int,
) -> list[int]:
    """Class-aware greedy NMS in plain Python: indices kept, best first (ties: lower index first).

    Same rule as :func:`batched_nms` (a box goes when ``intersection > iou_threshold * union`` with a kept box of
    its class), for the few candidates of a real frame; use :func:`batched_nms` for thousands.
    """
    order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)  # stable, like argsort(-s, "stable")
    kept: list[tuple[int, float, float, float, float, float, int]] = []
    for i in order:
        x1, y1, x2, y2 = xyxy[i]
        c = class_ids[i]
        area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
        for kc, kx1, ky1, kx2, ky2, karea, _ in kept:
            if kc != c:
                continue
            w = min(x2, kx2) - max(x1, kx1)
            h = min(y2, ky2) - max(y1, ky1)
            if w > 0.0 and h > 0.0 and w * h > iou_threshold * (area + karea - w * h):
                break
        else:
            kept.append((c, x1, y1, x2, y2, area, i))
            if len(kept) == max_detections:
                break
    return [k[6] for k in kept]


def batched_nms(boxes: Boxes, iou_threshold: float, max_detections: int) -> Boxes:
    """Class-aware NMS: boxes of different classes never suppress each other."""
    if len(boxes) == 0:
        return boxes
    offset = (boxes.xyxy.max() + 1.0) * boxes.class_ids.astype(np.float32)
    shifted = boxes.xyxy + offset[:, None]
    keep = nms(shifted, boxes.scores, iou_threshold)[:max_detections]
    return boxes.take(keep)


@lru_cache(maxsize=16)
def anchor_grid(width: int, height: int, strides: tuple[int, ...]) -> tuple[F32, F32]:
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
    # One flat compare over all scores (SIMD) finds the few passing rows; a row-wise max over (N, C) costs 3-4x
    # more at detector sizes (measured 28 vs 99 us for 1600 x 80).
    hits = np.flatnonzero(scores_all.reshape(-1) >= score_threshold)
    if hits.size == 0:
        return hits, np.empty(0, np.int64), np.empty(0, np.float32)
    rows = np.unique(hits // scores_all.shape[1])
    sub = scores_all[rows]
    cls = sub.argmax(axis=1).astype(np.int64)
    return rows, cls, sub[np.arange(rows.size), cls].astype(np.float32)


def decode_yolox(output: F32, input_size: tuple[int, int], strides: tuple[int, ...], score_threshold: float) -> Boxes:
    """YOLOX head without decode in graph.

    ``output``: (1, N, 5 + C) rows of (dx, dy, log w, log h, obj, cls...) with obj and cls already
    sigmoid-ed; N = sum over strides of (W/s)*(H/s). Score = obj * cls.
    """
    out = output[0]
    grid, stride = anchor_grid(input_size[0], input_size[1], strides)
    # obj * cls <= obj (both in [0, 1]): only rows whose objectness passes can pass at all. Few numpy calls
    # from here on: right after session.run each one runs with cold caches (tens of microseconds apiece).
    cand = np.flatnonzero(out[:, 4] >= score_threshold)
    if cand.size == 0:
        return Boxes.empty()
    sub = out[cand]
    cls_scores = sub[:, 5:] * sub[:, 4:5]
    cls = cls_scores.argmax(axis=1)
    scores = np.take_along_axis(cls_scores, cls[:, None], axis=1)[:, 0]
    keep = np.flatnonzero(scores >= score_threshold)
    if keep.size == 0:
        return Boxes.empty()
    rows = cand[keep]
    sel = sub[keep]
    s = stride[rows, None]
    xyxy = np.empty((keep.size, 4), np.float32)
    centre = (sel[:, 0:2] + grid[rows]) * s
    half = np.exp(sel[:, 2:4]) * (s * 0.5)
    np.subtract(centre, half, out=xyxy[:, 0:2])
    np.add(centre, half, out=xyxy[:, 2:4])
    return Boxes(xyxy, scores[keep].astype(np.float32, copy=False), cls[keep].astype(np.int64))


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
    rows_l: list[npt.NDArray[np.intp]] = []
    best_l: list[F32] = []
    cls_l: list[npt.NDArray[np.intp]] = []
    reg_l: list[F32] = []
    offset = 0
    for c_out, r_out in zip(cls_outputs, reg_outputs, strict=True):
        scores_all = c_out[0]
        hits = np.flatnonzero(scores_all.reshape(-1) >= score_threshold)  # one flat SIMD compare per level
        if hits.size:
            local = hits // scores_all.shape[1]
            if local.size > 1:  # hits are sorted: drop repeated rows (several classes of one cell)
                local = local[np.concatenate(([True], local[1:] != local[:-1]))]
            sub = scores_all[local]
            cls = sub.argmax(axis=1)
            best_l.append(np.take_along_axis(sub, cls[:, None], axis=1)[:, 0])
            cls_l.append(cls)
            rows_l.append(local + offset)
            reg_l.append(r_out[0][local])
        offset += scores_all.shape[0]
    if not rows_l:
        return Boxes.empty()
    one = len(rows_l) == 1
    rows = rows_l[0] if one else np.concatenate(rows_l)
    reg_all = reg_l[0] if one else np.concatenate(reg_l)
    grid, stride = anchor_grid(input_size[0], input_size[1], strides)
    s = stride[rows, None]
    centre = grid[rows] * s + (s - 1) / 2
    bins = softmax(reg_all.reshape(-1, 4, reg_max + 1))
    dist = (bins @ np.arange(reg_max + 1, dtype=np.float32)) * s
    xyxy = np.empty((rows.size, 4), np.float32)
    np.subtract(centre, dist[:, 0:2], out=xyxy[:, 0:2])
    np.add(centre, dist[:, 2:4], out=xyxy[:, 2:4])
    scores = (best_l[0] if one else np.concatenate(best_l)).astype(np.float32, copy=False)
    cls_ids = (cls_l[0] if one else np.concatenate(cls_l)).astype(np.int64)
    return Boxes(xyxy, scores, cls_ids)


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


def open_set_band(top1: float, ood: float, ood_threshold: float, unsure_below: float,
                  unsure_ood: float | None = None) -> Band:
    """The answer band of one classification: ``unknown`` when the OOD score is above ``ood_threshold``,
    ``unsure`` when the top-1 probability is below ``unsure_below`` or the OOD score above ``unsure_ood``,
    else ``known``. A NaN score counts as unknown (never a confident answer from a broken output)."""
    if not ood <= ood_threshold:  # also NaN
        return "unknown"
    if not top1 >= unsure_below or (unsure_ood is not None and ood > unsure_ood):
        return "unsure"
    return "known"


def anomaly_score(score_output: F32) -> float:
    """Image score from a (1,), (1, 1) or scalar output."""
    return float(np.asarray(score_output).reshape(-1)[0])


def anomaly_map(map_output: F32) -> F32:
    """(h, w) float32 heat map from a (1, 1, h, w), (1, h, w) or (h, w) output."""
    arr = np.asarray(map_output, dtype=np.float32)
    while arr.ndim > 2:
        arr = arr[0]
    return arr


def region_level(heatmap: F32, anomaly: float, region: float | None) -> float:
    """Map level above which cells form regions. Plain anomaly bundles: their threshold. Bundles whose score fuses
    other evidence (``thresholds.region``): that level, or, when the map stays under it on a failed part, halfway
    from the map's median to its peak, so the most anomalous area is still shown."""
    if region is None:
        return anomaly
    values = np.asarray(heatmap, dtype=np.float32)
    peak = float(values.max())
    if peak > region:
        return region
    return (float(np.median(values)) + peak) / 2


def anomaly_regions(
    heatmap: F32, threshold: float, max_regions: int = 8
) -> list[tuple[tuple[float, float, float, float], float, float]]:
    """Connected areas (8-neighbourhood) of ``heatmap`` above ``threshold``, largest peak first.

    Each is ((x1, y1, x2, y2) as fractions 0..1 of the map's width and height, peak value, share of the map's
    cells). A map cell covers [i/w, (i+1)/w) of the image, so boxes are given at cell edges. Labelled by runs
    of cells per row joined with a union-find (a few dozen runs on a 60x60 map: well under a millisecond).
    """
    values = np.asarray(heatmap, dtype=np.float32)
    above = values > threshold
    if not above.any():
        return []
    h, w = above.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = above
    edges = np.diff(padded, axis=1)
    runs: list[tuple[int, int, int]] = []  # (row, first column, end column exclusive)
    for y in np.nonzero(above.any(axis=1))[0].tolist():
        starts = np.nonzero(edges[y] == 1)[0].tolist()
        ends = np.nonzero(edges[y] == -1)[0].tolist()
        runs.extend((y, a, b) for a, b in zip(starts, ends, strict=True))
    parent = list(range(len(runs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev: list[int] = []  # indices of the runs of the row above
    cur: list[int] = []
    row = -1
    for i, (y, a, b) in enumerate(runs):
        if y != row:
            prev, cur, row = (cur if y == row + 1 else []), [], y
        for j in prev:
            _, pa, pb = runs[j]
            if pa <= b and a <= pb:  # overlapping or touching diagonally (ends are exclusive)
                parent[root(j)] = root(i)
        cur.append(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(runs)):
        groups.setdefault(root(i), []).append(i)
    regions: list[tuple[tuple[float, float, float, float], float, float]] = []
    for members in groups.values():
        ys = [runs[i][0] for i in members]
        x1 = min(runs[i][1] for i in members)
        x2 = max(runs[i][2] for i in members)
        peak = max(float(values[runs[i][0], runs[i][1]:runs[i][2]].max()) for i in members)
        cells = sum(runs[i][2] - runs[i][1] for i in members)
        regions.append(((x1 / w, min(ys) / h, x2 / w, (max(ys) + 1) / h), peak, cells / (h * w)))
    regions.sort(key=lambda r: -r[1])
    return regions[:max_regions]
