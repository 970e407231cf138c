"""Evaluate a model bundle on a labelled folder: classification, anomaly (MVTec layout) or detection (YOLO txt).

The metric functions are pure (lists and arrays in, numbers out); the ``evaluate_*`` functions read the folder
and run a :class:`~edge_agent.vision.model.Model`.
Layouts:

* classification: ``DIR/<class>/*.jpg``; folder names pass through the manifest's ``label_aliases``. Folders
  whose class the model does not know count as *off-domain*: they are left out of ``accuracy`` and reported
  with the fraction the model rejected ("not recognised"). ``bands`` counts the answer bands (``known``,
  ``unsure``, ``unknown``: the crop verdict's diagnosis / not sure / not a crop I know; a model without an
  ``open_set`` section has only known and unknown = rejected) and ``top1_with_rejections`` is the top-1 accuracy
  with every unsure or unknown answer counted as wrong. ``--unknown DIR`` (:func:`evaluate_unknown`): a folder of
  images that should all be answered unknown (e.g. leaves of plants the model does not know).
* anomaly: ``DIR/test/<good|defect type>/*`` (or ``DIR/<good|defect>/*``); every folder but ``good`` is anomalous.
* detection: ``DIR/images/*`` + ``DIR/labels/<stem>.txt`` (YOLO: class cx cy w h, normalised); AP at IoU 0.5,
  class-agnostic unless ``class_map`` maps dataset class ids to model labels, from detections down to score
  0.01; recall and precision at the bundle's shipped score threshold.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.errors import EdgeAgentError, InputNotFoundError, require_extra
from edge_agent.types import AnomalyScore, Classification, Detection
from edge_agent.vision.model import Model
from edge_agent.vision.postprocess import box_iou

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
Progress = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------- pure metrics


def classification_metrics(
    truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str] | None = None
) -> dict[str, Any]:
    """``accuracy``, ``per_class`` {label: {n, correct, recall, precision}} and ``confusion`` (rows = truth)."""
    if len(truth) != len(predicted):
        raise ValueError("truth and predicted differ in length")
    names = list(labels) if labels is not None else sorted(set(truth) | set(predicted))
    for extra in sorted((set(truth) | set(predicted)) - set(names)):
        names.append(extra)
    index = {n: i for i, n in enumerate(names)}
    conf = np.zeros((len(names), len(names)), dtype=np.int64)
    for t, p in zip(truth, predicted, strict=True):
        conf[index[t], index[p]] += 1
    per_class: dict[str, dict[str, float | int]] = {}
    for name, i in index.items():
        n = int(conf[i].sum())
        if n == 0:
            continue
        predicted_as = int(conf[:, i].sum())
        per_class[name] = {
            "n": n,
            "correct": int(conf[i, i]),
            "recall": round(float(conf[i, i]) / n, 4),
            "precision": round(float(conf[i, i]) / predicted_as, 4) if predicted_as else 0.0,
        }
    total = len(truth)
    return {
        "n": total,
        "accuracy": round(float(np.trace(conf)) / total, 4) if total else 0.0,
        "per_class": per_class,
        "confusion": {"labels": names, "matrix": conf.tolist()},
    }


def roc_auc(
    scores: Sequence[float] | npt.NDArray[np.floating[Any]], positive: Sequence[bool] | npt.NDArray[Any]
) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction); positives should score higher.

    Vectorised (average ranks of tied scores via ``np.unique``): fine for millions of pixels.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    pos = np.asarray(positive, dtype=bool).reshape(-1)
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative samples")
    order = np.argsort(s, kind="mergesort")
    _, inverse, counts = np.unique(s[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = (ends - counts + ends - 1) / 2.0 + 1.0  # 1-based mean rank of each run of equal scores
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = average_rank[inverse]
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def threshold_for_false_reject(good_scores: Sequence[float] | npt.NDArray[Any], rate: float) -> float:
    """The lowest threshold at which at most ``rate`` of the good scores are rejected (score > threshold)."""
    g = np.sort(np.asarray(good_scores, dtype=np.float64))[::-1]
    if len(g) == 0:
        raise ValueError("need good scores")
    allowed = int(np.floor(rate * len(g) + 1e-9))
    return float(g[min(allowed, len(g) - 1)])


def operating_points(
    good_scores: Sequence[float] | npt.NDArray[Any],
    bad_scores: Sequence[float] | npt.NDArray[Any],
    threshold: float,
    rates: Sequence[float] = (0.01, 0.05, 0.1),
) -> dict[str, Any]:
    """Recall (defects caught) and false-reject rate at ``threshold``, and the best recall at each false-reject
    rate in ``rates`` (threshold chosen on these good scores: an upper bound for a threshold set beforehand)."""
    g = np.asarray(good_scores, dtype=np.float64)
    b = np.asarray(bad_scores, dtype=np.float64)
    return {
        "recall": round(float(np.mean(b > threshold)), 4) if len(b) else 0.0,
        "false_reject": round(float(np.mean(g > threshold)), 4) if len(g) else 0.0,
        "recall_at_false_reject": {
            f"{r:.0%}": round(float(np.mean(b > threshold_for_false_reject(g, r))), 4) for r in rates
        } if len(g) and len(b) else {},
    }


def roc_curve(
    scores: Sequence[float] | npt.NDArray[np.floating[Any]], positive: Sequence[bool]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(false positive rate, true positive rate) over all thresholds, from (0, 0) to (1, 1)."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    order = np.argsort(-s, kind="mergesort")
    tp = np.concatenate([[0], np.cumsum(pos[order])])
    fp = np.concatenate([[0], np.cumsum(~pos[order])])
    return fp / max(1, int((~pos).sum())), tp / max(1, int(pos.sum()))


def match_detections(
    detections: Sequence[tuple[int, float, tuple[float, float, float, float]]],
    truths: Mapping[int, Sequence[tuple[float, float, float, float]]],
    iou_threshold: float = 0.5,
) -> list[tuple[float, bool]]:
    """Greedy matching, best score first (each truth found at most once): (score, hit) per detection, best first.

    Detections above any score threshold are matched exactly as if the others did not exist, so one matching
    serves AP and the recall at every threshold.
    """
    used = {k: np.zeros(len(v), dtype=bool) for k, v in truths.items()}
    gt = {k: np.asarray(v, dtype=np.float64).reshape(-1, 4) for k, v in truths.items()}
    out: list[tuple[float, bool]] = []
    for img, score, box in sorted(detections, key=lambda d: -d[1]):
        boxes = gt.get(img)
        hit = False
        if boxes is not None and len(boxes):
            ious = box_iou(np.asarray([box], dtype=np.float64), boxes)[0]
            ious[used[img]] = 0.0
            j = int(np.argmax(ious))
            if ious[j] >= iou_threshold:
                used[img][j] = True
                hit = True
        out.append((float(score), hit))
    return out


def ap_from_matches(matches: Sequence[tuple[float, bool]], n_truth: int) -> float:
    """All-point interpolated AP from :func:`match_detections` output."""
    if n_truth == 0:
        return 0.0
    h = np.asarray([hit for _, hit in matches], dtype=bool)
    tp = np.cumsum(h)
    fp = np.cumsum(~h)
    recall = np.concatenate([[0.0], tp / n_truth, [1.0]])
    precision = np.concatenate([[1.0], tp / np.maximum(tp + fp, 1), [0.0]])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def average_precision(
    detections: Sequence[tuple[int, float, tuple[float, float, float, float]]],
    truths: Mapping[int, Sequence[tuple[float, float, float, float]]],
    iou_threshold: float = 0.5,
) -> float:
    """All-point interpolated AP. ``detections`` are (image index, score, box); ``truths`` image -> boxes."""
    n_truth = sum(len(v) for v in truths.values())
    return ap_from_matches(match_detections(detections, truths, iou_threshold), n_truth)


def recall_precision(matches: Sequence[tuple[float, bool]], n_truth: int, threshold: float) -> dict[str, Any]:
    """Recall, precision and counts of the detections scoring >= ``threshold``."""
    kept = [hit for score, hit in matches if score >= threshold]
    tp = sum(kept)
    return {
        "threshold": threshold,
        "recall": round(tp / n_truth, 4) if n_truth else 0.0,
        "precision": round(tp / len(kept), 4) if kept else 0.0,
        "found": tp,
        "false_positives": len(kept) - tp,
        "n_truth": n_truth,
    }


def best_f1_threshold(matches: Sequence[tuple[float, bool]], n_truth: int) -> float:
    """The score threshold (a detection's score, floored to 4 decimals) with the best F1 (ties: the higher)."""
    best, best_f1, tp = 0.5, -1.0, 0
    for k, (score, hit) in enumerate(matches, start=1):
        tp += hit
        f1 = 2 * tp / (k + n_truth) if n_truth else 0.0
        if f1 > best_f1 + 1e-12:
            best, best_f1 = score, f1
    return math.floor(best * 1e4) / 1e4


# ----------------------------------------------------------------------------------------------- folders


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def list_classification(root: Path) -> list[tuple[Path, str]]:
    """(image, folder name) for ``root/<class>/*``, sorted."""
    if not root.is_dir():
        raise InputNotFoundError(f"{root}: not a folder")
    items = [(p, d.name) for d in sorted(root.iterdir()) if d.is_dir() for p in _images(d)]
    if not items:
        raise InputNotFoundError(f"{root}: no images in <class>/ sub-folders")
    return items


def list_anomaly(root: Path) -> list[tuple[Path, bool]]:
    """(image, is_anomalous) for the MVTec layout ``root/test/<good|defect>/*`` (or ``root/<good|defect>/*``)."""
    base = root / "test" if (root / "test").is_dir() else root
    items = [(p, d.name != "good") for p, d in ((p, p.parent) for p, _ in list_classification(base))]
    if not any(a for _, a in items) or all(a for _, a in items):
        raise InputNotFoundError(f"{base}: needs a good/ folder and at least one defect folder")
    return items


def list_detection(root: Path) -> list[tuple[Path, Path]]:
    """(image, YOLO label file) pairs for ``root/images`` + ``root/labels``."""
    img_dir, lab_dir = root / "images", root / "labels"
    if not img_dir.is_dir():
        raise InputNotFoundError(f"{root}: no images/ folder")
    return [(p, lab_dir / f"{p.stem}.txt") for p in _images(img_dir)]


def read_yolo_labels(path: Path, width: int, height: int) -> list[tuple[int, tuple[float, float, float, float]]]:
    """YOLO txt (class cx cy w h, normalised) -> [(class, pixel x1 y1 x2 y2)]; a missing file = no boxes."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        c, cx, cy, w, h = int(float(parts[0])), *(float(v) for v in parts[1:5])
        out.append((c, ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)))
    return out


# ----------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Scored:
    """Per-image outcome, kept for plots and for the quantization gate."""

    path: Path
    truth: str
    predicted: str
    score: float
    rejected: bool
    band: str | None = None
    """known / unsure / unknown (None: not a classifier)."""


BANDS = ("known", "unsure", "unknown")


def band_of(rejected: bool, band: str | None) -> str:
    """A classification's band; a model without an ``open_set`` section: unknown when rejected, else known."""
    if band in BANDS:
        return band
    return "unknown" if rejected else "known"


def band_report(truth: Sequence[str], predicted: Sequence[str], bands: Sequence[str]) -> dict[str, Any]:
    """Counts per band and the top-1 accuracy with every unsure or unknown answer counted as wrong (pure)."""
    if not len(truth) == len(predicted) == len(bands):
        raise ValueError("truth, predicted and bands differ in length")
    n = len(truth)
    counts = {b: sum(1 for x in bands if x == b) for b in BANDS}
    right = sum(1 for t, p, b in zip(truth, predicted, bands, strict=True) if b == "known" and t == p)
    return {
        "bands": counts,
        "band_shares": {b: round(c / n, 4) if n else 0.0 for b, c in counts.items()},
        "top1_with_rejections": round(right / n, 4) if n else 0.0,
    }


def _run(model: Model, paths: Iterable[Path], progress: Progress | None, total: int) -> Iterable[tuple[Path, Any]]:
    for i, path in enumerate(paths):
        try:
            result = model.predict_bytes(path.read_bytes())
        except (EdgeAgentError, OSError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        finally:
            if progress is not None:
                progress(i + 1, total)
        yield path, result


def evaluate_classification(model: Model, root: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Top-1 metrics over known classes plus the rejection rate (``rejected``) per folder."""
    items = list_classification(root)
    m = model.manifest
    known = set(m.labels)
    truth_of = {p: m.label_aliases.get(name, name) for p, name in items}
    scored: list[Scored] = []
    for path, result in _run(model, (p for p, _ in items), progress, len(items)):
        top = result.predictions[0]
        assert isinstance(top, Classification)
        scored.append(Scored(path, truth_of[path], top.label, top.score, result.rejected,
                             band_of(result.rejected, result.band)))
    in_domain = [s for s in scored if s.truth in known]
    off = [s for s in scored if s.truth not in known]
    report = classification_metrics([s.truth for s in in_domain], [s.predicted for s in in_domain], m.labels)
    report["model"] = m.name
    report["n"] = len(scored)
    report["n_in_domain"] = len(in_domain)
    report["rejected"] = round(sum(s.rejected for s in in_domain) / len(in_domain), 4) if in_domain else 0.0
    report.update(band_report([s.truth for s in in_domain], [s.predicted for s in in_domain],
                              [s.band or "known" for s in in_domain]))
    if off:
        report["n_off_domain"] = len(off)
        report["off_domain_rejected"] = round(sum(s.rejected for s in off) / len(off), 4)
        report["off_domain_bands"] = {b: sum(1 for s in off if s.band == b) for b in BANDS}
    for label, row in report["per_class"].items():
        members = [s for s in in_domain if s.truth == label]
        row["rejected"] = round(sum(s.rejected for s in members) / len(members), 4) if members else 0.0
        row["unsure"] = round(sum(s.band == "unsure" for s in members) / len(members), 4) if members else 0.0
    for folder in sorted({s.truth for s in off}):
        members = [s for s in off if s.truth == folder]
        report["per_class"][folder] = {
            "n": len(members),
            "off_domain": True,
            "rejected": round(sum(s.rejected for s in members) / len(members), 4),
            "unsure": round(sum(s.band == "unsure" for s in members) / len(members), 4),
        }
    report["_scored"] = scored
    return report


def list_images(root: Path) -> list[Path]:
    """Every image under ``root`` (sub-folders included, linked folders followed), sorted."""
    if not root.is_dir():
        raise InputNotFoundError(f"{root}: not a folder")
    items = sorted(
        Path(folder) / name
        for folder, _, names in os.walk(root, followlinks=True)
        for name in names
        if Path(name).suffix.lower() in IMAGE_SUFFIXES and (Path(folder) / name).is_file()
    )
    if not items:
        raise InputNotFoundError(f"{root}: no images")
    return items


def evaluate_unknown(model: Model, root: Path, progress: Progress | None = None) -> dict[str, Any]:
    """A folder of images the classifier should NOT know (e.g. leaves of other plants): the share answered
    unknown (``rejected``), unsure, or wrongly named as a known class (``known``), and the labels it gave those."""
    if model.manifest.task != "classification":
        raise InputNotFoundError("--unknown applies to classification models only")
    items = list_images(root)
    bands: list[str] = []
    named: dict[str, int] = {}
    for _, result in _run(model, items, progress, len(items)):
        band = band_of(result.rejected, result.band)
        bands.append(band)
        if band == "known":
            top = result.predictions[0]
            assert isinstance(top, Classification)
            named[top.label] = named.get(top.label, 0) + 1
    n = len(bands)
    return {
        "n": n,
        "bands": {b: bands.count(b) for b in BANDS},
        "rejected": round(bands.count("unknown") / n, 4) if n else 0.0,
        "not_diagnosed": round((bands.count("unknown") + bands.count("unsure")) / n, 4) if n else 0.0,
        "named_as": dict(sorted(named.items(), key=lambda kv: -kv[1])),
    }


def ground_truth_mask(root: Path, path: Path) -> npt.NDArray[np.bool_] | None:
    """MVTec layout: ``root/ground_truth/<defect>/<stem>_mask.png`` for ``root/test/<defect>/<stem>.*``."""
    import cv2

    base = root if (root / "ground_truth").is_dir() else root.parent
    mask_path = base / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
    if not mask_path.is_file():
        return None
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    return None if mask is None else mask > 127


def _pixel_pairs(heatmap: npt.NDArray[np.float32], mask: npt.NDArray[np.bool_], max_side: int = 128) -> tuple[
        npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """The heat map (model-input space, stretched like the photo) and the mask at the same size, at most
    ``max_side`` a side (the mask resized nearest, the map bilinear), flattened."""
    import cv2

    h, w = mask.shape
    f = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * f)), max(1, round(h * f)))
    m = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    a = cv2.resize(np.asarray(heatmap, np.float32), size, interpolation=cv2.INTER_LINEAR)
    return np.asarray(a, np.float32).reshape(-1), m.reshape(-1)


def evaluate_anomaly(model: Model, root: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Image AUROC; recall and false rejects at the shipped threshold and the recall at 1/5/10% false rejects;
    per defect type; pixel AUROC when the folder has MVTec ``ground_truth`` masks and the model a heat map."""
    items = list_anomaly(root)
    truth = dict(items)
    m = model.manifest
    scored: list[Scored] = []
    pix_scores: list[npt.NDArray[np.float32]] = []
    pix_truth: list[npt.NDArray[np.bool_]] = []
    for path, result in _run(model, (p for p, _ in items), progress, len(items)):
        pred = result.predictions[0]
        assert isinstance(pred, AnomalyScore)
        scored.append(Scored(path, "anomalous" if truth[path] else "good", pred.label, pred.score, False))
        if pred.heatmap is not None:
            mask = ground_truth_mask(root, path) if truth[path] else None
            if mask is None and not truth[path]:
                w, h = result.image_size
                mask = np.zeros((max(1, h), max(1, w)), bool)
            if mask is not None:
                a, t = _pixel_pairs(pred.heatmap, mask)
                pix_scores.append(a)
                pix_truth.append(t)
    scores = [s.score for s in scored]
    positive = [s.truth == "anomalous" for s in scored]
    threshold = m.thresholds.anomaly
    assert threshold is not None
    flagged = [s > threshold for s in scores]
    good = [s.score for s in scored if s.truth == "good"]
    bad = [s.score for s in scored if s.truth == "anomalous"]
    per_type: dict[str, dict[str, Any]] = {}
    for kind in sorted({s.path.parent.name for s in scored if s.truth == "anomalous"}):
        members = [s.score for s in scored if s.truth == "anomalous" and s.path.parent.name == kind]
        per_type[kind] = {
            "n": len(members),
            "recall": round(float(np.mean(np.asarray(members) > threshold)), 4),
            "auroc": round(roc_auc(good + members, [False] * len(good) + [True] * len(members)), 4) if good else None,
        }
    report: dict[str, Any] = {
        "model": m.name,
        "n": len(scored),
        "n_good": positive.count(False),
        "n_anomalous": positive.count(True),
        "image_auroc": round(roc_auc(scores, positive), 4),
        "threshold": threshold,
        **operating_points(good, bad, threshold),
        "accuracy_at_threshold": round(float(np.mean(np.equal(flagged, positive))), 4),
    }
    if pix_truth:
        t = np.concatenate(pix_truth)
        if t.any() and not t.all():
            report["pixel_auroc"] = round(roc_auc(np.concatenate(pix_scores), t), 4)
    report["per_type"] = per_type
    report["_scored"] = scored
    return report


AP_SCORE_FLOOR = 0.01
"""Detections are collected down to this score for AP (the shipped threshold would cut the curve short)."""


def detection_report(
    model: Model,
    items: Sequence[tuple[Path, Path]],
    class_map: Mapping[int, str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """AP50 and, at the model's own score threshold, recall and precision over (image, YOLO label file) pairs.

    ``ap50``: class-agnostic AP at IoU 0.5 (or, with ``class_map`` from dataset ids to model labels, per mapped
    class and their mean), from detections down to :data:`AP_SCORE_FLOOR`; ``recall``/``precision``/``found``/
    ``false_positives`` at the manifest's ``thresholds.score``; ``best_f1_threshold`` (class-agnostic).
    """
    from PIL import Image as PILImage

    m = model.manifest
    shipped = m.thresholds.score
    probe = Model(m.model_copy(update={"thresholds": m.thresholds.model_copy(
        update={"score": min(AP_SCORE_FLOOR, shipped)})}), model.runtime, max_pixels=model.max_pixels)
    labels = {img: lab for img, lab in items}
    dets: dict[str, list[tuple[int, float, tuple[float, float, float, float]]]] = {}
    truths: dict[str, dict[int, list[tuple[float, float, float, float]]]] = {}
    n = 0
    for i, (path, result) in enumerate(_run(probe, (p for p, _ in items), progress, len(items))):
        n += 1
        with PILImage.open(path) as im:
            w, h = im.size
        for cls, box in read_yolo_labels(labels[path], w, h):
            key = class_map.get(cls, "") if class_map else "*"
            if key:
                truths.setdefault(key, {}).setdefault(i, []).append(box)
        for p in result.predictions:
            assert isinstance(p, Detection)
            key = "*" if not class_map else p.label
            if not class_map or key in class_map.values():
                dets.setdefault(key, []).append((i, p.score, p.box))
    matches = {k: match_detections(dets.get(k, []), v) for k, v in truths.items()}
    counts = {k: sum(len(b) for b in v.values()) for k, v in truths.items()}
    per = {k: round(ap_from_matches(matches[k], counts[k]), 4) for k in truths}
    pooled = sorted((x for v in matches.values() for x in v), key=lambda x: -x[0])
    n_truth = sum(counts.values())
    at = recall_precision(pooled, n_truth, shipped)
    return {
        "model": m.name,
        "n": n,
        "ap50": round(float(np.mean(list(per.values()))), 4) if per else 0.0,
        "per_class": per,
        "n_truth": n_truth,
        "score_threshold": shipped,
        "recall": at["recall"],
        "precision": at["precision"],
        "found": at["found"],
        "false_positives": at["false_positives"],
        "best_f1_threshold": best_f1_threshold(pooled, n_truth),
        "_matches": pooled,
        "_scored": [],
    }


def evaluate_detection(
    model: Model, root: Path, class_map: Mapping[int, str] | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """:func:`detection_report` over a YOLO folder (``root/images`` + ``root/labels``)."""
    return detection_report(model, list_detection(root), class_map, progress)


def evaluate(model: Model, root: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Dispatch on the model's task. The ``_scored`` key holds per-image outcomes (not JSON; drop it to print)."""
    task = model.manifest.task
    if task == "classification":
        return evaluate_classification(model, root, progress)
    if task == "anomaly":
        return evaluate_anomaly(model, root, progress)
    return evaluate_detection(model, root, progress=progress)


def public(report: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-ready part of a report."""
    return {k: v for k, v in report.items() if not k.startswith("_")}


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Confusion matrix (classification) or ROC curve (anomaly) as a PNG. Needs matplotlib (the ``plot`` extra)."""
    require_extra("matplotlib", "plot", "edge-agent eval --plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    try:
        if "confusion" in report:
            names = report["confusion"]["labels"]
            mat = np.asarray(report["confusion"]["matrix"])
            ax.imshow(mat, cmap="Blues")
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
            ax.set_yticks(range(len(names)), names, fontsize=6)
            for (r, c), v in np.ndenumerate(mat):
                if v:
                    ax.text(c, r, str(v), ha="center", va="center", fontsize=6)
            ax.set_title(f"{report['model']}: accuracy {report['accuracy']:.3f} (n={report['n_in_domain']})")
        elif "image_auroc" in report:
            scored = report["_scored"]
            fpr, tpr = roc_curve([s.score for s in scored], [s.truth == "anomalous" for s in scored])
            ax.plot(fpr, tpr)
            ax.plot([0, 1], [0, 1], linestyle=":")
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.set_title(f"{report['model']}: image AUROC {report['image_auroc']:.3f}")
        else:
            ax.text(0.5, 0.5, f"AP50 {report.get('ap50', 0):.3f}", ha="center")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
