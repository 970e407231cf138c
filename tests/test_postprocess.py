"""Pure decoders: NMS invariants (property tests), softmax/top-k, and each detection decoder
against an independent loop-based reference."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.vision import postprocess as pp

box_lists = st.lists(
    st.tuples(
        st.floats(0, 200),
        st.floats(0, 200),
        st.floats(1, 100),
        st.floats(1, 100),
        st.floats(0.01, 1),
        st.integers(0, 3),
    ),
    min_size=1,
    max_size=40,
)


def _boxes(rows: list[tuple[float, float, float, float, float, int]]) -> pp.Boxes:
    xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h, _, _ in rows], np.float32)
    return pp.Boxes(xyxy, np.array([r[4] for r in rows], np.float32), np.array([r[5] for r in rows], np.int64))


@settings(max_examples=80)
@given(rows=box_lists, thr=st.floats(0.1, 0.9))
def test_nms_invariants(rows: list[tuple[float, float, float, float, float, int]], thr: float) -> None:
    b = _boxes(rows)
    keep = pp.nms(b.xyxy, b.scores, thr)
    assert keep.size >= 1
    assert b.scores[keep[0]] == b.scores.max(), "the best box always survives"
    assert len(set(keep.tolist())) == keep.size
    assert (np.diff(b.scores[keep]) <= 0).all(), "kept boxes come best first"
    kept = b.xyxy[keep]
    iou = pp.box_iou(kept, kept)
    np.fill_diagonal(iou, 0)
    assert (iou <= thr + 1e-6).all(), "no two survivors overlap more than the threshold"
    dropped = np.setdiff1d(np.arange(len(b)), keep)
    if dropped.size:
        assert (pp.box_iou(b.xyxy[dropped], kept).max(axis=1) > thr - 1e-6).all(), "each dropped box had a reason"


@settings(max_examples=50)
@given(rows=box_lists, thr=st.floats(0.1, 0.9))
def test_batched_nms_never_suppresses_across_classes(
    rows: list[tuple[float, float, float, float, float, int]], thr: float
) -> None:
    b = _boxes(rows)
    out = pp.batched_nms(b, thr, 1000)
    for c in np.unique(b.class_ids):
        sub = b.take(np.nonzero(b.class_ids == c)[0])
        assert (out.class_ids == c).sum() == pp.nms(sub.xyxy, sub.scores, thr).size


@settings(max_examples=80)
@given(rows=box_lists, thr=st.floats(0.1, 0.9), max_det=st.integers(1, 50))
def test_plain_python_nms_keeps_what_the_numpy_nms_keeps(
    rows: list[tuple[float, float, float, float, float, int]], thr: float, max_det: int
) -> None:
    """The detector tail's list-based NMS (few candidates) against the vectorised one, class by class."""
    b = _boxes(rows)
    xyxy, scores, cls = b.xyxy.tolist(), b.scores.tolist(), b.class_ids.tolist()
    keep = pp.batched_nms_keep(xyxy, scores, cls, thr, max_det)
    assert len(keep) <= max_det and len(set(keep)) == len(keep)
    assert all(scores[a] >= scores[c] for a, c in itertools.pairwise(keep)), "best first"
    full = pp.batched_nms_keep(xyxy, scores, cls, thr, 10_000)
    assert keep == full[:max_det]
    for c in set(cls):  # per class, the same indices as numpy's greedy NMS (same arithmetic, same tie order)
        idx = [i for i in range(len(cls)) if cls[i] == c]
        ref = [idx[k] for k in pp.nms(b.xyxy[idx], b.scores[idx], thr).tolist()]
        assert [i for i in full if cls[i] == c] == ref


def test_plain_python_nms_suppresses_within_a_class_only() -> None:
    xyxy = [[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]
    scores = [0.9, 0.8, 0.7, 0.95]
    cls = [0, 0, 1, 0]
    assert pp.batched_nms_keep(xyxy, scores, cls, 0.5, 100) == [3, 0, 2]  # 1 overlaps 0 (IoU 0.68); 2 is class 1
    assert pp.batched_nms_keep(xyxy, scores, cls, 0.7, 100) == [3, 0, 1, 2]  # IoU 0.68 <= 0.7: kept
    assert pp.batched_nms_keep(xyxy, scores, cls, 0.5, 2) == [3, 0]
    assert pp.batched_nms_keep([], [], [], 0.5, 10) == []


def test_softmax_and_top_k() -> None:
    probs = pp.softmax(np.array([1.0, 3.0, 2.0, 5.0], np.float32))
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-6)
    idx, vals = pp.top_k(probs, 3)
    assert idx.tolist() == [3, 1, 2]
    assert vals[0] > vals[1] > vals[2]


def _ref_yolox(out: np.ndarray, size: int, strides: tuple[int, ...], thr: float) -> list[tuple[float, ...]]:
    rows: list[tuple[float, ...]] = []
    r = 0
    for s in strides:
        g = size // s
        for gy in range(g):
            for gx in range(g):
                v = out[0, r]
                r += 1
                cls = int(np.argmax(v[5:]))
                score = float(v[4] * v[5 + cls])
                if score < thr:
                    continue
                cx, cy = (v[0] + gx) * s, (v[1] + gy) * s
                w, h = math.exp(v[2]) * s, math.exp(v[3]) * s
                rows.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, score, cls))
    return rows


def _ref_nanodet(
    cls_outs: list[np.ndarray],
    reg_outs: list[np.ndarray],
    size: int,
    strides: tuple[int, ...],
    reg_max: int,
    thr: float,
) -> list[tuple[float, ...]]:
    rows: list[tuple[float, ...]] = []
    for c_out, r_out, s in zip(cls_outs, reg_outs, strides, strict=True):
        g = size // s
        for i in range(c_out.shape[1]):
            gy, gx = divmod(i, g)
            cls = int(np.argmax(c_out[0, i]))
            score = float(c_out[0, i, cls])
            if score < thr:
                continue
            cx, cy = gx * s + 0.5 * (s - 1), gy * s + 0.5 * (s - 1)
            d = []
            for side in range(4):
                logits = r_out[0, i, side * (reg_max + 1) : (side + 1) * (reg_max + 1)].astype(np.float64)
                e = np.exp(logits - logits.max())
                p = e / e.sum()
                d.append(float(sum(p[k] * k for k in range(reg_max + 1))) * s)
            rows.append((cx - d[0], cy - d[1], cx + d[2], cy + d[3], score, cls))
    return rows


def _assert_same(got: pp.Boxes, ref: list[tuple[float, ...]]) -> None:
    assert len(got) == len(ref)
    order = np.lexsort((got.xyxy[:, 1], got.xyxy[:, 0], -got.scores))
    ref_sorted = sorted(ref, key=lambda r: (-r[4], r[0], r[1]))
    for i, r in zip(order, ref_sorted, strict=True):
        assert np.abs(got.xyxy[i] - np.array(r[:4])).max() <= 1.0
        assert abs(float(got.scores[i]) - r[4]) <= 1e-4
        assert int(got.class_ids[i]) == r[5]


def test_yolox_decoder_matches_reference_on_random_outputs() -> None:
    rng = np.random.default_rng(3)
    n = 8 * 8 + 4 * 4 + 2 * 2
    out = rng.normal(size=(1, n, 85)).astype(np.float32)
    out[..., 4:] = 1 / (1 + np.exp(-out[..., 4:] * 3))
    got = pp.decode_yolox(out, (64, 64), (8, 16, 32), 0.5)
    _assert_same(got, _ref_yolox(out, 64, (8, 16, 32), 0.5))


def test_nanodet_decoder_matches_reference_on_random_outputs() -> None:
    rng = np.random.default_rng(4)
    sizes = [64, 16, 4]
    cls = [(1 / (1 + np.exp(-3 * rng.normal(size=(1, n, 80))))).astype(np.float32) for n in sizes]
    reg = [rng.normal(size=(1, n, 32)).astype(np.float32) for n in sizes]
    got = pp.decode_nanodet(cls, reg, (64, 64), (8, 16, 32), 7, 0.6)
    _assert_same(got, _ref_nanodet(cls, reg, 64, (8, 16, 32), 7, 0.6))


def test_yolov8_decoder() -> None:
    out = np.zeros((1, 4 + 3, 5), np.float32)
    out[0, :4, 2] = [50, 40, 20, 10]
    out[0, 4 + 1, 2] = 0.9
    out[0, 4 + 0, 4] = 0.2
    got = pp.decode_yolov8(out, 0.25)
    assert len(got) == 1
    np.testing.assert_allclose(got.xyxy[0], [40, 35, 60, 45])
    assert int(got.class_ids[0]) == 1 and math.isclose(float(got.scores[0]), 0.9, rel_tol=1e-6)


def test_anomaly_helpers_accept_common_shapes() -> None:
    assert pp.anomaly_score(np.array([[0.7]], np.float32)) == np.float32(0.7)
    assert pp.anomaly_map(np.zeros((1, 1, 7, 5), np.float32)).shape == (7, 5)


def test_softmax_is_stable_for_huge_logits() -> None:
    probs = pp.softmax(np.array([1.0, 1000.0], np.float32))
    assert np.isfinite(probs).all() and probs[1] == 1.0


@given(
    st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=1, max_size=pp.SMALL_CLASSES),
    st.integers(1, 8),
    st.booleans(),
)
def test_small_softmax_top_k_matches_the_numpy_path(logits: list[float], k: int, apply: bool) -> None:
    arr = np.asarray(logits, dtype=np.float32)
    probs = pp.softmax(arr) if apply else arr
    want_idx, want_vals = pp.top_k(probs, k)
    idx, vals = pp.softmax_top_k_small(arr.tolist(), k, apply)
    np.testing.assert_allclose(vals, want_vals, rtol=1e-5, atol=1e-7)
    # same order wherever the values are not (numerically) tied
    for a, b, va in zip(idx, want_idx.tolist(), vals, strict=True):
        assert a == b or abs(float(probs[a]) - float(probs[b])) <= 1e-6 * max(1.0, abs(va))


def test_anomaly_regions_are_connected_areas_above_the_threshold() -> None:
    heat = np.zeros((10, 20), np.float32)
    heat[1:3, 2:5] = 2.0  # a 2x3 blob
    heat[3, 5] = 1.5  # touches the blob diagonally: same region (8-neighbourhood)
    heat[6:9, 15:17] = 4.0  # a second, stronger blob
    heat[0, 19] = 0.9  # under the threshold
    regions = pp.anomaly_regions(heat, 1.0)
    assert [r[1] for r in regions] == [4.0, 2.0]  # strongest peak first
    (box_a, _, area_a), (box_b, _, area_b) = regions
    assert box_a == pytest.approx((15 / 20, 6 / 10, 17 / 20, 9 / 10))  # cell edges, as fractions of the map
    assert box_b == pytest.approx((2 / 20, 1 / 10, 6 / 20, 4 / 10))
    assert area_a == pytest.approx(6 / 200) and area_b == pytest.approx(7 / 200)
    assert pp.anomaly_regions(heat, 5.0) == []
    assert len(pp.anomaly_regions(heat, 1.0, max_regions=1)) == 1


def _flood_fill_regions(heat: np.ndarray, threshold: float) -> list[tuple[tuple[float, ...], float, float]]:
    """Reference: plain 8-neighbourhood flood fill."""
    above = heat > threshold
    h, w = above.shape
    seen = np.zeros_like(above)
    out = []
    for y0 in range(h):
        for x0 in range(w):
            if not above[y0, x0] or seen[y0, x0]:
                continue
            stack, cells = [(y0, x0)], []
            seen[y0, x0] = True
            while stack:
                y, x = stack.pop()
                cells.append((y, x))
                for yy in range(max(0, y - 1), min(h, y + 2)):
                    for xx in range(max(0, x - 1), min(w, x + 2)):
                        if above[yy, xx] and not seen[yy, xx]:
                            seen[yy, xx] = True
                            stack.append((yy, xx))
            ys, xs = zip(*cells, strict=True)
            box = (min(xs) / w, min(ys) / h, (max(xs) + 1) / w, (max(ys) + 1) / h)
            out.append((box, float(max(heat[c] for c in cells)), len(cells) / (h * w)))
    return sorted(out)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.3, 0.8))
def test_anomaly_regions_match_a_flood_fill(seed: int, threshold: float) -> None:
    heat = np.random.default_rng(seed).random((12, 17)).astype(np.float32)
    got = sorted(pp.anomaly_regions(heat, threshold, max_regions=1000))
    want = _flood_fill_regions(heat, threshold)
    assert [(r[0], round(r[2], 9)) for r in got] == [(r[0], round(r[2], 9)) for r in want]
    assert [r[1] for r in got] == pytest.approx([r[1] for r in want])
