"""Train and export the FP32 crop-disease and steel-defect classifiers (``make models`` step 1).

    python -m models.training.build_classifiers --out var/models

Writes FP32 bundles ``crop_disease_fp32`` and ``steel_defects_fp32`` under ``--out`` and the deterministic
splits (symlink folders) under var/splits/ that ``edge-agent eval`` / ``quantize`` use afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from training import finetune, heads, open_set
from training.common import (
    CACHE,
    DATASETS,
    REPO,
    Sample,
    _stable_hash,
    list_class_folder,
    plantvillage_groups,
    prune,
    require_shared,
    split_groups,
)
from training.export import classifier_graph, classifier_manifest, finetuned_classifier_graph, write_bundle
from training.features import extract, extract_block13

log = logging.getLogger("build_classifiers")
SPLITS = REPO / "var" / "splits"
IBEAN_ALIASES = {
    "angular_leaf_spot": "Bean___angular_leaf_spot",
    "bean_rust": "Bean___bean_rust",
    "healthy": "Bean___healthy",
}
HEAD_NODES = ["pool_p14", "pool_p7a", "concat_embedding", "head_fc"]
# Kept in float by the INT8 quantizer: the stem and block 0 (quantizing them cost steel 2 points) and the head.
STEM_NODES = ["/_conv_stem/Conv", "/_blocks.0/_depthwise_conv/Conv", "/_blocks.0/_project_conv/Conv"]
OPEN_SET_REJECT = 0.0125  # share of known leaves (out-of-fold, training side) above the "not a crop I know"
# threshold (1.25%: the lowest rate measured at which every leave-one-crop-out fold still rejects >= 90% of the
# unknown crop, FP32)
OPEN_SET_VIEWS = open_set.VIEWS  # augmented views the open-set head is fitted on
OPEN_SET_CROP_W = open_set.CROP_W  # weight of its crop-level part (0: none)
OPEN_SET_W = open_set.W  # weight of its max-logit part
TAIL_BLOCK14 = False  # fine-tune block 14 too (from cached block-13 output; the frozen block 14 stays for pooling)
# The classifier: blocks FINETUNE_FROM..15 + head conv fine-tuned from pixels with online augmentation
# (``finetune.py``), a copy beside the frozen blocks that feed the open-set head. None: the older recipe (block 15
# only, on cached views, linear head on [pool(block10), pool(block14), features]).
FINETUNE_FROM: int | None = 5
FINETUNE_EPOCHS = 12
# The answer's logits = fine-tuned logits + CLASSIFIER_BLEND x the open-set head's logistic-regression logits (frozen
# features, already computed for the open-set score); chosen on an inner validation split of the training leaves
# (``inner_val.py``). 0: the fine-tuned classifier alone.
CLASSIFIER_BLEND = 0.5  # inner split, four runs: w 0 / 0.5 / 1 -> 57 / 44 / 44 errors (MODEL_CARD.md)
UNSURE_BELOW = 0.3  # top-1 probability below which a known-looking leaf is answered "not sure"
CROP_LICENSE = "CC-BY-SA-3.0 (PlantVillage) + CC-BY-4.0 (iBean); EfficientNet-Lite0 weights Apache-2.0"
STEEL_LICENSE = "NEU surface defect database: research use, cite Song & Yan 2013; EfficientNet-Lite0 Apache-2.0"


def link_split(name: str, samples: Sequence[Sample]) -> Path:
    """Materialise a split as ``var/splits/<name>/<class>/<file>`` symlinks (eval/quantize read folders)."""
    root = SPLITS / name
    for s in samples:
        dst = root / s.label / s.path.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.is_symlink():
            os.symlink(s.path, dst)
    return root


def _rows(d: dict[str, np.ndarray], samples: Sequence[Sample], all_samples: Sequence[Sample]) -> np.ndarray:
    index = {str(s.path): i for i, s in enumerate(all_samples)}
    return np.array([index[str(s.path)] for s in samples], dtype=np.int64)


def crop_data() -> dict[str, Any]:
    """The crop samples, their leaf-grouped split, labels and cached backbone activations (3 views)."""
    pv_root = DATASETS / "crops" / "plantvillage" / "train"
    pv = list_class_folder(pv_root, plantvillage_groups(pv_root))
    ib = list_class_folder(DATASETS / "crops" / "ibean" / "train")
    pv_tr, pv_he = split_groups(pv)
    ib_tr, ib_he = split_groups(ib)
    everything = pv + ib
    data = extract(everything, "crops", 3)
    labels = sorted({s.label for s in pv} | set(IBEAN_ALIASES.values()))
    lab = {name: i for i, name in enumerate(labels)}
    y = np.array([lab[IBEAN_ALIASES.get(s.label, s.label)] for s in everything])
    train = np.zeros(len(everything), bool)
    train[_rows(data, pv_tr + ib_tr, everything)] = True
    a7 = data["a7"]
    pre = np.concatenate([data["p14"][:, 0], a7[:, 0].astype(np.float32).mean(axis=(2, 3))], axis=1)
    return {
        "pv": pv, "ib": ib, "pv_tr": pv_tr, "pv_he": pv_he, "ib_tr": ib_tr, "ib_he": ib_he,
        "everything": everything, "data": data, "labels": labels, "y": y, "train": train,
        "is_pv": np.array([i < len(pv) for i in range(len(everything))]),
        "crop": np.array([labels[i].split("___")[0] for i in y]),
        "groups": np.array([_stable_hash(s.group) for s in everything], dtype=np.uint64),
        "pre": pre,
        "pre_views": np.concatenate([data["p14"], a7.astype(np.float32).mean(axis=(3, 4))], axis=2),
    }


def build_crop(out: Path, epochs: int) -> dict[str, object]:
    d = crop_data()
    pv_tr, pv_he, ib_tr, ib_he = d["pv_tr"], d["pv_he"], d["ib_tr"], d["ib_he"]
    link_split("crop_pv_holdout", pv_he)
    link_split("crop_ibean_holdout", ib_he)
    link_split("crop_calib", (pv_tr[::8] + ib_tr[::8]))
    everything, data, labels, y_all = d["everything"], d["data"], d["labels"], d["y"]
    tr = _rows(data, pv_tr + ib_tr, everything)
    he = _rows(data, pv_he + ib_he, everything)
    tail: heads.Tail | None = None
    ft: finetune.FineTuned | None = None
    if FINETUNE_FROM is not None:
        ft = finetune.train_cached(CACHE / f"crop_ft_b{FINETUNE_FROM}_e{FINETUNE_EPOCHS}.pt", pv_tr + ib_tr, y_all[tr],
                                   len(labels), FINETUNE_FROM, FINETUNE_EPOCHS)
        logits = finetune.predict_logits(ft, pv_he + ib_he)
    else:
        a7 = data["a7"]
        extra = np.concatenate([data["p14"], a7.astype(np.float32).mean(axis=(3, 4))], axis=2)
        tail_in = extract_block13(everything, "crops", 3) if TAIL_BLOCK14 else a7
        tail_path = CACHE / f"crop_tail{'14' if TAIL_BLOCK14 else ''}_e{epochs}.pt"
        if tail_path.exists():
            saved = torch.load(tail_path, weights_only=False)
            tail, head = saved["tail"], saved["head"]
        else:
            tail, head, _, _ = heads.train(extra[tr], y_all[tr], len(labels), a7=tail_in[tr], epochs=epochs,
                                           block14=TAIL_BLOCK14)
            torch.save({"tail": tail, "head": head}, tail_path)
        emb_he = heads.embed(tail, extra[he, 0], tail_in[he, 0])
        logits = emb_he @ head.weight.T + head.bias
    # open-set head on the frozen pre-tail features; threshold from the training leaves' out-of-fold scores
    pre = d["pre"]
    pre_fit = d["pre_views"] if OPEN_SET_VIEWS == 3 else pre
    groups = d["groups"]
    cid = open_set.crop_ids(d["crop"])
    os_head, threshold, oof = open_set.fit_calibrated(pre_fit[tr], y_all[tr], groups[tr], OPEN_SET_REJECT,
                                                      crops=cid[tr], crop_weight=OPEN_SET_CROP_W, weight=OPEN_SET_W)
    held_scores = os_head.score(pre[he])
    if CLASSIFIER_BLEND:
        logits = logits + CLASSIFIER_BLEND * os_head.class_logits(pre[he])
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    pred = logits.argmax(1)
    is_pv = d["is_pv"][he]
    ok = pred == y_all[he]
    unknown = held_scores > threshold
    unsure = ~unknown & (prob.max(1) < UNSURE_BELOW)
    diagnosed_ok = ok & ~unknown & ~unsure
    stats: dict[str, object] = {
        "split": "leaf-grouped 80/20 of train/ (seed fixed); figures on the held-out 20%",
        "fp32_pv_accuracy": round(float(ok[is_pv].mean()), 4),
        "fp32_ibean_accuracy": round(float(ok[~is_pv].mean()), 4),
        "fp32_pv_top1_rejections_wrong": round(float(diagnosed_ok[is_pv].mean()), 4),
        "fp32_ibean_top1_rejections_wrong": round(float(diagnosed_ok[~is_pv].mean()), 4),
        "n_pv": int(is_pv.sum()),
        "n_ibean": int((~is_pv).sum()),
        "ood_threshold": threshold,
        "ood_rule": f"{1 - OPEN_SET_REJECT:.2%} quantile of the training leaves' out-of-fold open-set score",
        "oof_known_rejected": round(float((oof > threshold).mean()), 4),
        "ood_leaf_rejected": round(float(unknown.mean()), 4),
        "unsure": round(float(unsure.mean()), 4),
    }
    loco = open_set.leave_one_crop_out(pre_fit, y_all, d["crop"], d["train"], groups, OPEN_SET_REJECT,
                                       OPEN_SET_CROP_W, OPEN_SET_W)
    # off-domain photos, measured only (never trained on)
    off = offdomain_pre()
    stats["ood_offdomain_rejected"] = round(float((os_head.score(off) > threshold).mean()), 4)
    stats["n_offdomain"] = len(off)
    log.info("crop: %s", stats)
    if ft is not None:
        arrays = {k: v.numpy().astype(np.float32) for k, v in ft.net.named_inits(ft.start).items()}
        model = finetuned_classifier_graph(ft.start, arrays, ft.weight, ft.bias)
    else:
        model = classifier_graph(["p14", "p7a", "features"], head.weight, head.bias,
                                 tail.onnx_arrays() if tail else None)
    open_set.add_to_graph(model, ["p14", "p7a"], os_head)
    if CLASSIFIER_BLEND:
        open_set.blend_logits(model, CLASSIFIER_BLEND)
    model = prune(model)
    recipe = (f"fine-tune blocks {ft.start}-15 + head conv from pixels, online augmentation (random crop, flips, "
              "90-degree turns, +-15 degree rotation, colour jitter), linear head on the fine-tuned 1280-d features; "
              "the frozen blocks stay for the open-set head" if ft is not None else
              "fine-tune block 15 + head conv on cached block-14 activations, 3 views (as is, h-flip, "
              "crop+v-flip); linear head on [pool(block10), pool(block14), features]")
    onnx.checker.check_model(model)
    manifest = classifier_manifest(
        "crop_disease_fp32",
        labels,
        CROP_LICENSE,
        "edge-agent models/training/build_classifiers.py from ../shared/datasets/crops (PlantVillage subset, iBean)",
        "Leaf disease classifier: 12 PlantVillage classes + 3 iBean bean classes; answers 'not a crop I know' for "
        "leaves of other plants and for photos that are not leaves.",
        ood_threshold=threshold,
        label_aliases=IBEAN_ALIASES,
        metadata={"quantize": {"nodes_to_exclude": STEM_NODES + HEAD_NODES + open_set.NODES},
                  "training": {"epochs": FINETUNE_EPOCHS if ft is not None else epochs, "recipe": recipe,
                               "open_set": f"z(Mahalanobis, per-class Ledoit-Wolf covariance) + {OPEN_SET_W:g} z(-max "
                               f"logit of a logistic regression) + {OPEN_SET_CROP_W:g} z(-max logit of a crop-level "
                               f"logistic regression), on frozen [pool(block10), pool(block14)], fitted on "
                               f"{OPEN_SET_VIEWS} view(s); z and threshold from 5-fold out-of-fold scores of the "
                               "training leaves",
                               "classifier_blend": open_set.blend_note(CLASSIFIER_BLEND)},
                  "holdout": stats,
                  "open_set": {
                      "method": f"z(per-class Ledoit-Wolf Mahalanobis) + {OPEN_SET_W:g} z(-max logit) + "
                                f"{OPEN_SET_CROP_W:g} z(-max crop logit), frozen pool(block10) + pool(block14), "
                                f"{OPEN_SET_VIEWS} view(s)",
                      "reject_rule": f"threshold = {1 - OPEN_SET_REJECT:.2%} quantile of the training leaves' "
                                     "out-of-fold score",
                      "leave_one_crop_out": loco,
                  }},
    )
    manifest["version"] = "3.1.0"
    manifest["open_set"] = {"unsure_below": UNSURE_BELOW}
    write_bundle(out / "crop_disease_fp32", model, manifest, "crop_disease_fp32.onnx")
    return stats


def offdomain_samples() -> list[Sample]:
    tiles = list_class_folder(DATASETS / "inspection" / "magnetic_tile" / "train")
    coco_dir = DATASETS / "livestock" / "coco_demo" / "images"
    coco = [Sample(p, "coco", p.name) for p in sorted(coco_dir.iterdir())]
    return tiles + coco


def offdomain_pre() -> np.ndarray:
    """Frozen [pool(block10), pool(block14)] of the off-domain photos (steel, tiles, COCO animals)."""
    steel = extract(list_class_folder(DATASETS / "inspection" / "neu_steel" / "train"), "steel", 3)
    extra = extract(offdomain_samples(), "offdomain_extra", 1)
    return np.concatenate([
        np.concatenate([d["p14"][:, 0], d["a7"][:, 0].astype(np.float32).mean(axis=(2, 3))], axis=1)
        for d in (steel, extra)])


def build_steel(out: Path) -> dict[str, object]:
    steel = list_class_folder(DATASETS / "inspection" / "neu_steel" / "train")
    tr_s, he_s = split_groups(steel)
    link_split("steel_holdout", he_s)
    link_split("steel_calib", tr_s[::4])
    data = extract(steel, "steel", 3)
    labels = sorted({s.label for s in steel})
    lab = {name: i for i, name in enumerate(labels)}
    y = np.array([lab[s.label] for s in steel])
    tr, he = _rows(data, tr_s, steel), _rows(data, he_s, steel)
    extra = np.concatenate([data["p14"], data["p7"], data["feat"]], axis=2)
    _, head, _, _ = heads.train(extra[tr], y[tr], len(labels), epochs=30)
    pred = (extra[he, 0] @ head.weight.T + head.bias).argmax(1)
    stats: dict[str, object] = {
        "split": "stratified 80/20 of train/ (seed fixed); figures on the held-out 20%",
        "fp32_accuracy": round(float((pred == y[he]).mean()), 4),
        "n": len(he),
    }
    log.info("steel: %s", stats)
    model = classifier_graph(["p14", "p7b", "features"], head.weight, head.bias)
    manifest = classifier_manifest(
        "steel_defects_fp32",
        labels,
        STEEL_LICENSE,
        "edge-agent models/training/build_classifiers.py from ../shared/datasets/inspection/neu_steel",
        "Hot-rolled steel surface defect classifier (NEU, 6 classes).",
        metadata={"quantize": {"nodes_to_exclude": [*STEM_NODES, "pool_p14", "pool_p7b", "concat_embedding",
                                                      "head_fc"]},
                  "training": {"epochs": 30, "recipe": "frozen EfficientNet-Lite0; linear head on "
                               "[pool(block10), pool(block15), features], 3 views"}, "holdout": stats},
    )
    write_bundle(out / "steel_defects_fp32", model, manifest, "steel_defects_fp32.onnx")
    return stats


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "var" / "models")
    parser.add_argument("--epochs", type=int, default=8, help="crop with FINETUNE_FROM = None only: epochs of the "
                        "cached-view tail training (the fine-tuned classifier uses FINETUNE_EPOCHS)")
    parser.add_argument("--only", choices=["crop", "steel"], default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    require_shared()
    report: dict[str, object] = {}
    if args.only in (None, "steel"):
        report["steel"] = build_steel(args.out)
    if args.only in (None, "crop"):
        report["crop"] = build_crop(args.out, args.epochs)
    suffix = f"_{args.only}" if args.only else ""
    (args.out / f"classifiers_report{suffix}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
