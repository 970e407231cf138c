"""Choose classifier settings on an inner validation split of the TRAINING leaves (measurement only).

    PYTHONPATH=models python -m models.training.inner_val [--start 5] [--epochs 12] [--blend 0 0.25 0.5 1]

The held-out 20% of the crop photos is for reporting only, so choices about the classifier are made here: the
training leaves are split again, grouped by leaf (the same deterministic rule, ``split_groups``), the fine-tuned
recipe is trained on the inner 80% (~16-25 min with two threads, cached in
var/training/crop_ft_inner_b<start>_e<epochs>[_s<seed>].pt) and scored on the inner 20%. ``--blend`` also scores
the fine-tuned logits plus ``a`` times the logits of the frozen-feature logistic regression that the open-set head
already computes (``os_lr``, refitted on the inner 80%); ``--features`` / ``--lr-c`` try that regression on other
frozen features (pool of block 15, the 1280-d head features) and L2 strengths.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence

import numpy as np

from training import finetune, open_set
from training.build_classifiers import FINETUNE_EPOCHS, FINETUNE_FROM, crop_data
from training.common import CACHE, SEED, split_groups

log = logging.getLogger("inner_val")


def inner_split(d: dict[str, object]) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (into ``d["everything"]``) of the inner-train and inner-validation training leaves."""
    everything = d["everything"]
    assert isinstance(everything, list)
    rows = {str(s.path): i for i, s in enumerate(everything)}
    inner_tr: list[int] = []
    inner_va: list[int] = []
    for part in ("pv_tr", "ib_tr"):
        samples = d[part]
        assert isinstance(samples, list)
        tr, va = split_groups(samples)
        inner_tr += [rows[str(s.path)] for s in tr]
        inner_va += [rows[str(s.path)] for s in va]
    return np.array(inner_tr), np.array(inner_va)


def inner_logits(d: dict[str, object], start: int, epochs: int, seed: int = SEED) -> np.ndarray:
    """Fine-tuned logits on the inner-validation rows (cached)."""
    everything = d["everything"]
    assert isinstance(everything, list)
    y = np.asarray(d["y"])
    tr, va = inner_split(d)
    tag = f"crop_ft_inner_b{start}_e{epochs}" + (f"_s{seed}" if seed != SEED else "")
    npy = CACHE / f"{tag}_logits.npy"
    if npy.exists():
        cached: np.ndarray = np.load(npy)
        return cached
    ft = finetune.train_cached(CACHE / f"{tag}.pt", [everything[i] for i in tr], y[tr], len(np.asarray(d["labels"])),
                               start, epochs, seed)
    logits = finetune.predict_logits(ft, [everything[i] for i in va])
    np.save(npy, logits)
    return logits


FEATURES = ("pre", "pre+p7", "pre+p7+feat", "p7+feat", "feat")


def frozen_views(d: dict[str, object], features: str = "pre") -> np.ndarray:
    """(N, 3, D) frozen features of every view: ``pre`` = [pool(block 10), pool(block 14)] (the open-set head's,
    shipped), ``p7`` = pool(block 15), ``feat`` = the 1280-d pooled head features; joined with ``+``."""
    data = d["data"]
    assert isinstance(data, dict)
    parts = {"pre": np.asarray(d["pre_views"]), "p7": data["p7"], "feat": data["feat"]}
    return np.concatenate([parts[name] for name in features.split("+")], axis=2)


def report(d: dict[str, object], logits: np.ndarray, blends: Sequence[float], features: str = "pre",
           c: float = open_set.C) -> dict[str, object]:
    y, is_pv = np.asarray(d["y"]), np.asarray(d["is_pv"])
    labels = list(np.asarray(d["labels"]))
    tr, va = inner_split(d)
    x3 = frozen_views(d, features)
    w, b = open_set.lr_fit(x3[tr].reshape(-1, x3.shape[-1]), np.repeat(y[tr], x3.shape[1]), c)
    classes = np.unique(y[tr])
    lr = np.full((len(va), len(labels)), -1e9, np.float32)
    lr[:, classes] = x3[va, 0] @ w.T + b
    out: dict[str, object] = {"n_inner_train": len(tr), "n_val_pv": int(is_pv[va].sum()),
                              "n_val_ibean": int((~is_pv[va]).sum()), "features": features, "C": c}
    for a in blends:
        pred = (logits + a * lr).argmax(1)
        ok = pred == y[va]
        wrong: dict[str, int] = {}
        for t, p in zip(y[va][~ok], pred[~ok], strict=True):
            key = f"{labels[t]} -> {labels[p]}"
            wrong[key] = wrong.get(key, 0) + 1
        out[f"blend {a:g}"] = {"pv_wrong": int((~ok & is_pv[va]).sum()), "ibean_wrong": int((~ok & ~is_pv[va]).sum()),
                               "pv": round(float(ok[is_pv[va]].mean()), 4),
                               "ibean": round(float(ok[~is_pv[va]].mean()), 4),
                               "errors": dict(sorted(wrong.items(), key=lambda kv: -kv[1]))}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--start", type=int, default=FINETUNE_FROM or 5)
    parser.add_argument("--epochs", type=int, default=FINETUNE_EPOCHS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--blend", type=float, nargs="+", default=[0.0])
    parser.add_argument("--features", choices=FEATURES, default="pre",
                        help="frozen features of the blended regression (pre = the open-set head's, shipped)")
    parser.add_argument("--lr-c", type=float, default=open_set.C, help="its L2 strength (C)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    d = crop_data()
    logits = inner_logits(d, args.start, args.epochs, args.seed)
    print(json.dumps(report(d, logits, args.blend, args.features, args.lr_c), indent=1))


if __name__ == "__main__":
    main()
