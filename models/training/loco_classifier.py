"""Leave-one-crop-out with the fine-tuned classifier re-trained per fold (measurement only, nothing shipped).

    PYTHONPATH=models python -m models.training.loco_classifier [--crops Apple Strawberry] [--confident 0.8 0.85 0.9]

The shipped open-set score sees frozen features only, so its leave-one-crop-out check needs no re-training. A rule
that also weighs the fine-tuned classifier's confidence ("unknown plant" only when the score is over the threshold
AND the top-1 probability is under ``p*``) is honest only with a classifier that never saw the unknown crop: per
fold, the shipped recipe (``finetune.train``, same seed and epochs) is trained on the other crops' training leaves
(~15-20 min per fold on 2 cores, cached in var/training/crop_ft_loco_<crop>.pt). Reports, per fold and ``p*``, the
share of the unknown crop's leaves and of the known crops' held-out leaves answered "not a crop I know".
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence

import numpy as np

from training import finetune, open_set
from training.build_classifiers import FINETUNE_EPOCHS, FINETUNE_FROM, OPEN_SET_REJECT, crop_data
from training.common import CACHE

log = logging.getLogger("loco_classifier")


def fold_confidence(d: dict[str, object], unknown: str) -> np.ndarray:
    """Top-1 probability of every photo (view 0) under a classifier trained without ``unknown``'s leaves."""
    everything = d["everything"]
    y, crop, train = (np.asarray(d[k]) for k in ("y", "crop", "train"))
    assert isinstance(everything, list)
    path = CACHE / f"crop_ft_loco_{unknown}.pt"
    npz = CACHE / f"crop_ft_loco_{unknown}_conf.npy"
    if npz.exists():
        cached: np.ndarray = np.load(npz)
        return cached
    keep = np.flatnonzero(train & (crop != unknown))
    classes = sorted(set(y[keep].tolist()))
    remap = {c: i for i, c in enumerate(classes)}
    ft = finetune.train_cached(path, [everything[i] for i in keep], np.array([remap[c] for c in y[keep]]), len(classes),
                               FINETUNE_FROM or 5, FINETUNE_EPOCHS)
    logits = finetune.predict_logits(ft, everything)
    p = np.exp(logits - logits.max(1, keepdims=True))
    conf: np.ndarray = (p / p.sum(1, keepdims=True)).max(1)
    np.save(npz, conf)
    return conf


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--crops", nargs="+", default=None, help="folds to run (default: all five)")
    parser.add_argument("--confident", type=float, nargs="+", default=[0.8, 0.85, 0.9])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    d = crop_data()
    y, crop, train, groups = (np.asarray(d[k]) for k in ("y", "crop", "train", "groups"))
    x3, x0 = np.asarray(d["pre_views"]), np.asarray(d["pre"])
    cid = open_set.crop_ids(crop)
    report: dict[str, dict[str, dict[str, float]]] = {}
    for h in args.crops or sorted(set(crop.tolist())):
        conf = fold_confidence(d, h)
        known = crop != h
        fit = known & train
        head, thr, _ = open_set.fit_calibrated(x3[fit], y[fit], groups[fit], OPEN_SET_REJECT, crops=cid[fit],
                                               crop_weight=open_set.CROP_W, weight=open_set.W)
        over = head.score(x0) > thr
        unk, kn = crop == h, known & ~train
        rows = {"score only": over}
        rows.update({f"score and top-1 < {p:g}": over & (conf < p) for p in args.confident})
        report[h] = {name: {"unknown_rejected": round(float(r[unk].mean()), 4),
                            "known_rejected": round(float(r[kn].mean()), 4)} for name, r in rows.items()}
        log.info("%s: %s", h, report[h])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
