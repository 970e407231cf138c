"""Temporal cross-validation of the cattle recipe (models/cattle_overhead): what `make models` ships is fitted on
every frame, so its figures come from here.

The 222 frames of livestock/cattle_chute/train, in time order, are cut into 5 contiguous blocks (frames 0-43,
44-87, 88-131, 132-177, 178-221); each is held out in turn and the recipe is fitted on the rest minus 9 frames on
both sides of the block (never neighbouring frames on both sides). Fold 4 is `detect fit`'s own default split (the
last 44 frames after a gap of 9); it holds the set's only two frames of another camera (a drone over a field,
frame_005048 and frame_005051), scored apart from the chute frames. Per fold: AP50 at IoU 0.5 (all frames, chute,
drone), the threshold with the best F1 and recall/precision there. The shipped threshold is the median of the
folds' best-F1 thresholds; recall and precision at it are reported per fold (for each fold a threshold chosen
mostly on other folds' frames). ``--int8`` runs the INT8 gate on fold 4's model (calibrated on its training
frames, judged on its held-out block).

    PYTHONPATH=models:. python -m models.training.cattle_cv --fold 0      # one fold (~7 min on a quiet 2-core CPU)
    PYTHONPATH=models:. python -m models.training.cattle_cv --collect     # write cross_validation.json
Per-fold results and models go to var/models/cattle_cv/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_agent.bundles.bundle import load_bundle
from edge_agent.toolchain import detect_fit as df
from edge_agent.toolchain.evaluate import detection_report, recall_precision
from edge_agent.vision.model import Model
from edge_agent.vision.runtime import RuntimeOptions
from training.common import DATASETS, REPO

FRAMES = DATASETS / "livestock" / "cattle_chute" / "train"
BOUNDS = (0, 44, 88, 132, 178, 222)
GAP = 9
OTHER_CAMERA = ("frame_005048", "frame_005051")
OUT = REPO / "var" / "models" / "cattle_cv"
CV_FILE = REPO / "models" / "cattle_overhead" / "cross_validation.json"


def split(fold: int, n: int) -> tuple[list[int], list[int]]:
    lo, hi = BOUNDS[fold], BOUNDS[fold + 1]
    return [i for i in range(n) if i < lo - GAP or i >= hi + GAP], list(range(lo, hi))


def run_fold(fold: int, config: df.DetectFitConfig) -> dict[str, Any]:
    frames, labels = df.read_frames(FRAMES)
    train, _ = split(fold, len(frames))
    base = load_bundle(REPO / "models" / "yolox_nano")
    model, head = df.base_graph(base)
    t0 = time.perf_counter()
    weights = df._train(model, head, base, labels, frames, train, config, lambda _s, _d, _t: None)
    seconds = time.perf_counter() - t0
    out = OUT / f"fold_{fold}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    df.write_graph(model, head, weights, len(labels), config.size, out / "m.onnx")
    (out / "manifest.json").write_text(json.dumps(df._manifest("m", "m.onnx", out, base, labels, config, "cv")))
    result = score(out, fold)
    result["train_seconds"] = round(seconds)
    (OUT / f"fold_{fold}.json").write_text(json.dumps(result, indent=2))
    return result


def score(bundle_dir: Path, fold: int) -> dict[str, Any]:
    """Held-out figures of a fold's model (AP50 all / chute / other camera; best-F1 threshold)."""
    frames, _ = df.read_frames(FRAMES)
    train, test = split(fold, len(frames))
    m = Model.load(load_bundle(bundle_dir), RuntimeOptions(intra_op_threads=1))
    other = [i for i in test if frames[i].image.stem in OTHER_CAMERA]
    parts = {"all": test, "chute": [i for i in test if i not in other], "drone": other}
    result: dict[str, Any] = {"fold": fold, "n_train": len(train), "held_out": [frames[test[0]].image.name,
                                                                              frames[test[-1]].image.name]}
    for key, idx in parts.items():
        if not idx:
            continue
        items = [(frames[i].image, FRAMES / "labels" / f"{frames[i].image.stem}.txt") for i in idx]
        r = detection_report(m, items)
        result[key] = {"n": len(idx), "n_truth": r["n_truth"], "ap50": r["ap50"],
                       "best_f1_threshold": r["best_f1_threshold"], "_matches": r["_matches"]}
    return result


def collect(recipe: dict[str, Any]) -> dict[str, Any]:
    files = [OUT / f"fold_{k}.json" for k in range(len(BOUNDS) - 1)]
    folds = [json.loads(f.read_text()) for f in files if f.is_file()]
    threshold = round(statistics.median(f["all"]["best_f1_threshold"] for f in folds), 4)
    for f in folds:
        for key in ("all", "chute", "drone"):
            if key in f:
                at = recall_precision(f[key].pop("_matches"), f[key]["n_truth"], threshold)
                f[key].update(recall=at["recall"], precision=at["precision"])
    chute = [f["chute"]["ap50"] for f in folds]
    return {
        "recipe": recipe,
        "folds": folds,
        "gap": GAP,
        "score_threshold": threshold,
        "mean": {
            "ap50_all": round(statistics.mean(f["all"]["ap50"] for f in folds), 4),
            "ap50_chute": round(statistics.mean(chute), 4),
            "recall_all": round(statistics.mean(f["all"]["recall"] for f in folds), 4),
            "precision_all": round(statistics.mean(f["all"]["precision"] for f in folds), 4),
            "recall_chute": round(statistics.mean(f["chute"]["recall"] for f in folds), 4),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fold", type=int, action="append", help="Fit and score this fold (repeatable).")
    parser.add_argument("--collect", action="store_true", help="Write cross_validation.json from the folds.")
    parser.add_argument("--int8", action="store_true", help="Run the INT8 gate on fold 4's model.")
    args = parser.parse_args(argv)
    recipe = json.loads(CV_FILE.read_text())["recipe"]
    config = replace(df.DetectFitConfig(), **recipe)
    for fold in args.fold or []:
        print(json.dumps({k: v for k, v in run_fold(fold, config).items()}, default=str)[:2000])
    if args.int8:
        gate = df.gate_int8(OUT / "fold_4", FRAMES, config, out_dir=OUT / "fold_4_int8")
        (OUT / "int8.json").write_text(json.dumps(gate, indent=2, default=str))
    if args.collect:
        cv = collect(recipe)
        int8 = OUT / "int8.json"
        if int8.is_file():
            cv["int8"] = json.loads(int8.read_text())
        CV_FILE.write_text(json.dumps(cv, indent=2) + "\n")
        print(json.dumps(cv["mean"]), cv["score_threshold"])


if __name__ == "__main__":
    main()
