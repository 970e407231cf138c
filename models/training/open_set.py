"""Open-set head of the crop model: "is this a leaf of a crop we know?", chosen by leave-one-crop-out measurement.

Score (higher = less like a known crop) = z(Mahalanobis) + W z(-max logit) + CROP_W z(-max crop logit), on the
FROZEN pre-tail features [pool(block 10), pool(block 14)] (304-d, ImageNet weights, independent of the fine-tuned
classifier), fitted on VIEWS augmented views of each training leaf:

* Mahalanobis: squared distance to the nearest class under that class's OWN covariance (Ledoit-Wolf shrinkage,
  on standardised features), divided by the dimension (304);
* max logit of a separate L2-regularised logistic regression on the standardised features (its logits are also
  blended into the classifier's answer, ``blend_logits``); max crop logit: the same over the five crops;
* z: (score - median) / IQR of out-of-fold scores of the training leaves (5 leaf-grouped folds).

Because both parts only see frozen features, a leave-one-crop-out check is exact: fit on four crops, calibrate on
their out-of-fold scores, test on the fifth (``python -m models.training.open_set``, see MODEL_CARD.md).
The reject threshold is a quantile of the training leaves' out-of-fold combined score, so the held-out leaves
stay unseen for reporting.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)
C = 0.1
W = 2.0  # weight of the max-logit part (chosen by leave-one-crop-out with VIEWS = 3, CROP_W = 2; MODEL_CARD.md)
FOLDS = 5
VIEWS = 3  # augmented views the head is fitted on (1: as is; 3: + h-flip, crop + v-flip)
CROP_W = 2.0  # weight of the crop-level max-logit part ("which of the known crops"; 0: not used)
NODES = ["os_concat", "os_project", "os_centre", "os_reshape", "os_norm", "os_min", "os_lr", "os_max",
         "os_scale_m", "os_scale_l", "os_sum", "os_out", "os_lrc", "os_maxc", "os_scale_c", "os_sum_c",
         "os_blend_scale", "os_blend"]


@dataclass
class OpenSetHead:
    maha_w: np.ndarray  # (D, C*D): per class c, columns c*D..(c+1)*D = whitening factor of class c's covariance
    maha_b: np.ndarray  # (C*D,): (x @ maha_w - maha_b) restricted to class c = whitened (x - mean_c)
    lr_w: np.ndarray  # (C, D) logistic regression, standardisation folded in
    lr_b: np.ndarray  # (C,)
    norm: tuple[float, ...] = (0.0, 1.0, 0.0, 1.0)  # median/IQR of Mahalanobis, of -max logit (, of -crop logit)
    weight: float = W
    crop_w: np.ndarray | None = None  # (K, D) optional crop-level logistic regression ("which crop"), folded
    crop_b: np.ndarray | None = None  # (K,)
    crop_weight: float = 0.0

    @property
    def dim(self) -> int:
        return int(self.maha_w.shape[0])

    def class_logits(self, x: np.ndarray) -> np.ndarray:
        """(N, C) logits of the class-level logistic regression (the graph's ``os_logits``)."""
        return np.asarray(x @ self.lr_w.T + self.lr_b)

    def parts(self, x: np.ndarray) -> np.ndarray:
        """(N, 2): Mahalanobis score and -max logit (N, 3 with the crop-level part: + -max crop logit)."""
        z = (x @ self.maha_w - self.maha_b).reshape(len(x), -1, self.dim)
        maha = (z**2).sum(2).min(1) / self.dim
        logits = self.class_logits(x)
        cols = [maha, -logits.max(1)]
        if self.crop_w is not None and self.crop_b is not None:
            cols.append(-(x @ self.crop_w.T + self.crop_b).max(1))
        return np.stack(cols, 1)

    def score(self, x: np.ndarray) -> np.ndarray:
        p = self.parts(x)
        return self.combine(p)

    def combine(self, p: np.ndarray) -> np.ndarray:
        m1, i1, m2, i2 = self.norm[:4]
        out = (p[:, 0] - m1) / i1 + self.weight * (p[:, 1] - m2) / i2
        if p.shape[1] > 2:
            m3, i3 = self.norm[4:6]
            out = out + self.crop_weight * (p[:, 2] - m3) / i3
        return np.asarray(out)


def _maha_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class Ledoit-Wolf covariance on standardised features, as one (D, C*D) matrix and (C*D,) offset."""
    from sklearn.covariance import LedoitWolf

    mu, sd = x.mean(0), x.std(0) + 1e-3
    xn = ((x - mu) / sd).astype(np.float64)
    ws, bs = [], []
    for c in np.unique(y):
        lw = LedoitWolf().fit(xn[y == c])
        evals, evecs = np.linalg.eigh(lw.covariance_)
        factor = evecs / np.sqrt(np.maximum(evals, 1e-9))  # factor @ factor.T = inverse covariance
        ws.append(factor / sd[:, None])
        bs.append((mu / sd + lw.location_) @ factor)
    return np.concatenate(ws, 1).astype(np.float32), np.concatenate(bs).astype(np.float32)


def lr_fit(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    mu, sd = x.mean(0), x.std(0) + 1e-3
    clf = LogisticRegression(C=c, max_iter=500).fit((x - mu) / sd, y)
    w = clf.coef_ / sd[None, :]
    b = clf.intercept_ - w @ mu
    if w.shape[0] == 1:  # binary problem: sklearn returns one row; make it two logits
        w, b = np.concatenate([-w / 2, w / 2]), np.array([-b[0] / 2, b[0] / 2])
    return w.astype(np.float32), b.astype(np.float32)


def fit_head(
    x: np.ndarray, y: np.ndarray, c: float = C, crops: np.ndarray | None = None, crop_weight: float = 0.0,
    weight: float = W,
) -> OpenSetHead:
    """Fit the parts on frozen features with integer labels (any subset of classes).

    ``x``: (N, D), or (N, V, D) augmented views (every view is a training row). ``crops``: integer crop of each
    row; with ``crop_weight`` > 0 a crop-level logistic regression is added (its -max logit is the third part)."""
    views = x.shape[1] if x.ndim == 3 else 1
    xf = x.reshape(-1, x.shape[-1])
    yf = np.repeat(y, views)
    maha_w, maha_b = _maha_fit(xf, yf)
    w, b = lr_fit(xf, yf, c)
    head = OpenSetHead(maha_w, maha_b, w, b, weight=weight)
    if crops is not None and crop_weight > 0:
        head.crop_w, head.crop_b = lr_fit(xf, np.repeat(crops, views), c)
        head.crop_weight = crop_weight
    return head


def view_parts(head: OpenSetHead, x: np.ndarray, score_views: int = 1) -> np.ndarray:
    """The head's parts for photos as they arrive (view 0 of (N, V, D), or (N, D)); with ``score_views`` = k > 1
    the mean of the parts over the first k cached views (test-time augmentation: k backbone passes per photo)."""
    if x.ndim == 2:
        return head.parts(x)
    return np.asarray(np.mean([head.parts(x[:, v]) for v in range(score_views)], axis=0))


def fit_calibrated(
    x: np.ndarray, y: np.ndarray, groups: Sequence[int], reject: float, folds: int = FOLDS,
    crops: np.ndarray | None = None, crop_weight: float = 0.0, weight: float = W, score_views: int = 1,
) -> tuple[OpenSetHead, float, np.ndarray]:
    """Fit on everything; median/IQR and the threshold (reject ``reject`` of known leaves) from out-of-fold scores.

    ``groups``: a fold id source per row (e.g. a hash of the leaf) so one leaf never sits on both sides.
    ``x`` (N, D) or (N, V, D) views (fitted on all views, out-of-fold scores on view 0, as photos arrive;
    ``score_views`` > 1: on the mean of the first k views' parts, a test-time average measured and not shipped).
    Returns (head, threshold, out-of-fold combined scores)."""
    fold = np.asarray(groups) % folds
    oof = np.zeros((len(x), 3 if crop_weight > 0 else 2))
    for f in range(folds):
        tr = fold != f
        head = fit_head(x[tr], y[tr], crops=crops[tr] if crops is not None else None, crop_weight=crop_weight,
                        weight=weight)
        oof[fold == f] = view_parts(head, x[fold == f], score_views)
    q75, q25 = np.percentile(oof, [75, 25], axis=0)
    med = np.median(oof, axis=0)
    iqr = q75 - q25
    norm = tuple(float(v) for pair in zip(med, iqr, strict=True) for v in pair)
    head = fit_head(x, y, crops=crops, crop_weight=crop_weight, weight=weight)
    head.norm = norm
    combined = head.combine(oof)
    threshold = float(np.quantile(combined, 1.0 - reject))
    return head, threshold, combined


def add_to_graph(model: onnx.ModelProto, inputs: Sequence[str], head: OpenSetHead, output: str = "ood") -> None:
    """Append the score as graph output ``output`` (N, 1), computed from the concatenation of ``inputs``."""
    g = model.graph
    d = head.dim
    m1, i1, m2, i2 = head.norm[:4]
    const = -m1 / i1 - head.weight * m2 / i2
    with_crop = head.crop_w is not None and head.crop_b is not None
    if with_crop:
        m3, i3 = head.norm[4:6]
        const -= head.crop_weight * m3 / i3
    g.initializer.extend([
        numpy_helper.from_array(head.maha_w.astype(np.float32), "os_maha_w"),
        numpy_helper.from_array(head.maha_b.astype(np.float32), "os_maha_b"),
        numpy_helper.from_array(np.array([-1, head.maha_w.shape[1] // d, d], np.int64), "os_shape"),
        numpy_helper.from_array(head.lr_w.astype(np.float32), "os_lr_w"),
        numpy_helper.from_array(head.lr_b.astype(np.float32), "os_lr_b"),
        numpy_helper.from_array(np.array(1.0 / (d * i1), np.float32), "os_a_m"),
        numpy_helper.from_array(np.array(-head.weight / i2, np.float32), "os_a_l"),
        numpy_helper.from_array(np.array(const, np.float32), "os_c"),
    ])
    g.node.extend([
        helper.make_node("Concat", list(inputs), ["os_x"], axis=1, name="os_concat"),
        helper.make_node("MatMul", ["os_x", "os_maha_w"], ["os_z0"], name="os_project"),
        helper.make_node("Sub", ["os_z0", "os_maha_b"], ["os_z"], name="os_centre"),
        helper.make_node("Reshape", ["os_z", "os_shape"], ["os_zc"], name="os_reshape"),
        helper.make_node("ReduceSumSquare", ["os_zc"], ["os_d"], axes=[2], keepdims=0, name="os_norm"),
        helper.make_node("ReduceMin", ["os_d"], ["os_dmin"], axes=[1], keepdims=1, name="os_min"),
        helper.make_node("Gemm", ["os_x", "os_lr_w", "os_lr_b"], ["os_logits"], transB=1, name="os_lr"),
        helper.make_node("ReduceMax", ["os_logits"], ["os_lmax"], axes=[1], keepdims=1, name="os_max"),
        helper.make_node("Mul", ["os_dmin", "os_a_m"], ["os_sm"], name="os_scale_m"),
        helper.make_node("Mul", ["os_lmax", "os_a_l"], ["os_sl"], name="os_scale_l"),
        helper.make_node("Add", ["os_sm", "os_sl"], ["os_s"], name="os_sum"),
    ])
    total = "os_s"
    if with_crop:
        assert head.crop_w is not None and head.crop_b is not None
        g.initializer.extend([
            numpy_helper.from_array(head.crop_w.astype(np.float32), "os_lrc_w"),
            numpy_helper.from_array(head.crop_b.astype(np.float32), "os_lrc_b"),
            numpy_helper.from_array(np.array(-head.crop_weight / i3, np.float32), "os_a_c"),
        ])
        g.node.extend([
            helper.make_node("Gemm", ["os_x", "os_lrc_w", "os_lrc_b"], ["os_clogits"], transB=1, name="os_lrc"),
            helper.make_node("ReduceMax", ["os_clogits"], ["os_cmax"], axes=[1], keepdims=1, name="os_maxc"),
            helper.make_node("Mul", ["os_cmax", "os_a_c"], ["os_sc"], name="os_scale_c"),
            helper.make_node("Add", ["os_s", "os_sc"], ["os_s2"], name="os_sum_c"),
        ])
        total = "os_s2"
    g.node.append(helper.make_node("Add", [total, "os_c"], [output], name="os_out"))
    g.output.append(helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, ["N", 1]))


def blend_note(weight: float) -> str:
    """The manifest's description of :func:`blend_logits` (``metadata.training.classifier_blend``)."""
    return (f"logits = classifier logits + {weight:g} x the open-set head's logistic-regression logits (frozen "
            "features); weight chosen on an inner validation split of the training leaves (inner_val.py)")


def blend_logits(model: onnx.ModelProto, weight: float, logits: str = "logits") -> None:
    """Make the graph's ``logits`` output = classifier logits + ``weight`` x the open-set head's logistic-regression
    logits (``os_logits``, same classes, frozen features), in place; call after :func:`add_to_graph`."""
    g = model.graph
    producer = next(n for n in g.node if logits in n.output)
    producer.output[list(producer.output).index(logits)] = "cls_logits"
    g.initializer.append(numpy_helper.from_array(np.array(weight, np.float32), "os_blend_w"))
    g.node.extend([
        helper.make_node("Mul", ["os_logits", "os_blend_w"], ["os_blend_l"], name="os_blend_scale"),
        helper.make_node("Add", ["cls_logits", "os_blend_l"], [logits], name="os_blend"),
    ])


# ------------------------------------------------------------------------------------ leave-one-crop-out check


def crop_ids(crop: np.ndarray) -> np.ndarray:
    names = sorted(set(crop.tolist()))
    return np.array([names.index(c) for c in crop.tolist()])


def leave_one_crop_out(
    x: np.ndarray, y: np.ndarray, crop: np.ndarray, train: np.ndarray, groups: np.ndarray, reject: float,
    crop_weight: float = 0.0, weight: float = W, score_views: int = 1,
) -> dict[str, dict[str, float | int]]:
    """Per held-out crop H: fit + calibrate on the training leaves of the other crops (threshold from their
    out-of-fold scores, rejecting ``reject``); report the share of ALL of H's leaves rejected and of the other
    crops' held-out leaves rejected. ``x`` (N, D) or (N, V, D) (fitted on all views, scored on view 0)."""
    out: dict[str, dict[str, float | int]] = {}
    cid = crop_ids(crop)
    for h in sorted(set(crop.tolist())):
        known = crop != h
        fit = known & train
        head, thr, _ = fit_calibrated(x[fit], y[fit], groups[fit], reject, crops=cid[fit], crop_weight=crop_weight,
                                      weight=weight, score_views=score_views)
        s = head.combine(view_parts(head, x, score_views))
        out[h] = {
            "unknown_rejected": round(float((s[crop == h] > thr).mean()), 4),
            "n_unknown": int((crop == h).sum()),
            "known_rejected": round(float((s[known & ~train] > thr).mean()), 4),
            "n_known": int((known & ~train).sum()),
        }
        log.info("LOCO %s: %s", h, out[h])
    return out


def quantized_features(onnx_path: str, paths: Sequence[str]) -> np.ndarray:
    """[pool(block10), pool(block14)] as the quantized crop graph computes them (its ``p14``/``p7a`` tensors)."""
    from pathlib import Path

    import onnxruntime as ort

    from training.common import load_rgb, to_input

    model = onnx.load(onnx_path)
    for name in ("p14", "p7a"):
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out = []
    for p in paths:
        p14, p7a = sess.run(["p14", "p7a"], {"pixels": to_input(load_rgb(Path(p)))[None]})
        out.append(np.concatenate([p14[0], p7a[0]]))
    return np.stack(out)


def leave_one_crop_out_quantized(
    x: np.ndarray, xq: np.ndarray, y: np.ndarray, crop: np.ndarray, train: np.ndarray, groups: np.ndarray,
    calib: np.ndarray, reject: float, crop_weight: float = 0.0, weight: float = W,
) -> dict[str, dict[str, float]]:
    """The same check as the INT8 model runs it: fit and calibrate on FP32 features (``x``), move the threshold
    by the median paired shift on the ``calib`` training rows (as ``calibrate_ood --match``), score INT8 ``xq``."""
    out: dict[str, dict[str, float]] = {}
    cid = crop_ids(crop)
    x0 = x[:, 0] if x.ndim == 3 else x
    for h in sorted(set(crop.tolist())):
        known = crop != h
        fit = known & train
        head, thr, _ = fit_calibrated(x[fit], y[fit], groups[fit], reject, crops=cid[fit], crop_weight=crop_weight,
                                      weight=weight)
        c = calib & known
        t = thr + float(np.median(head.score(xq[c]) - head.score(x0[c])))
        s = head.score(xq)
        out[h] = {"unknown_rejected": round(float((s[crop == h] > t).mean()), 4),
                  "known_rejected": round(float((s[known & ~train] > t).mean()), 4)}
        log.info("LOCO INT8 %s: %s", h, out[h])
    return out


def held_out_rejected(d: dict[str, object], x: np.ndarray, reject: float, crop_weight: float, weight: float,
                      score_views: int = 1) -> dict[str, int]:
    """Held-out PlantVillage / iBean photos the head fitted on all five crops' training leaves rejects (FP32)."""
    y, train, is_pv = np.asarray(d["y"]), np.asarray(d["train"]), np.asarray(d["is_pv"])
    cid = crop_ids(np.asarray(d["crop"]))
    head, thr, _ = fit_calibrated(x[train], y[train], np.asarray(d["groups"])[train], reject, crops=cid[train],
                                  crop_weight=crop_weight, weight=weight, score_views=score_views)
    s = head.combine(view_parts(head, x, score_views))
    return {"pv": int((s[~train & is_pv] > thr).sum()), "ibean": int((s[~train & ~is_pv] > thr).sum())}


def main(argv: Sequence[str] | None = None) -> None:
    """Run the leave-one-crop-out check on the cached crop features (var/training/crops_v3.npz); with ``--int8
    ONNX`` also on the features of that quantized crop graph."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--reject", type=float, nargs="+", default=[0.05])
    parser.add_argument("--int8", default=None, help="e.g. models/crop_disease/crop_disease.onnx")
    parser.add_argument("--views", type=int, default=VIEWS, choices=[1, 3], help="augmented views to fit on")
    parser.add_argument("--crop-weight", type=float, default=CROP_W, help="weight of the crop-level part")
    parser.add_argument("--weight", type=float, default=W, help="weight of the max-logit part")
    parser.add_argument("--held-out", action="store_true", help="also count held-out leaves the 5-crop head rejects")
    parser.add_argument("--score-views", type=int, default=1, choices=[1, 2, 3],
                        help="score on the mean over this many views (test-time average; shipped: 1)")
    args = parser.parse_args(argv)
    if args.score_views > args.views:
        parser.error(f"--score-views {args.score_views} needs --views 3 (the cached views it averages over)")
    if args.score_views > 1 and args.int8:
        parser.error("--score-views applies to the FP32 check only, not to --int8")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from training.build_classifiers import crop_data

    d = crop_data()
    x = d["pre_views"] if args.views == 3 else d["pre"]
    cw, w = args.crop_weight, args.weight
    report: dict[str, object] = {
        f"{r:.2%}": leave_one_crop_out(x, d["y"], d["crop"], d["train"], d["groups"], r, cw, w, args.score_views)
        for r in args.reject
    }
    if args.score_views > 1 or args.held_out:
        report["held-out rejected, 5-crop head"] = {f"{r:.2%}": held_out_rejected(d, x, r, cw, w, args.score_views)
                                                    for r in args.reject}
    if args.int8:
        xq = quantized_features(args.int8, [str(s.path) for s in d["everything"]])
        rows = {str(s.path): i for i, s in enumerate(d["everything"])}
        calib = np.zeros(len(xq), bool)
        calib[[rows[str(s.path)] for s in d["pv_tr"][::8] + d["ib_tr"][::8]]] = True  # = var/splits/crop_calib
        report.update({f"int8 {r:.2%}": leave_one_crop_out_quantized(
            x, xq, d["y"], d["crop"], d["train"], d["groups"], calib, r, cw, w) for r in args.reject})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
