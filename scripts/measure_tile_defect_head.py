"""Leave-one-acquisition-out check of ``edge-agent inspect fit --defects`` on the magnetic tiles.

The magnetic-tile photos are named ``exp<k>_num_<n>``: six acquisition runs (exp0's three photos join exp1).
Each run in turn is held out whole: ``fit_bundle`` (the shipped recipe, defect head included) is fitted on the
good photos (train/good + test/good) and the defect photos (test/<type>) of the other runs, and the held-out run's
good and defective photos are scored by the fitted bundle's own graph at its own threshold. Nothing of a held-out
run (no photo, no threshold) reaches its fit. ``--defects N`` keeps N defect photos per fit (a line that has
collected fewer confirmed defects; every Nth of the sorted list); ``--no-defects`` fits without a head (the
anomaly score alone); ``--int8`` scores with each fold's INT8 twin made as ``make models`` makes the shipped one
(static QDQ calibrated on 100 of the fold's good photos, then banks, head and threshold refitted on its own features).

    PYTHONPATH=. python scripts/measure_tile_defect_head.py [--defects N | --no-defects] [--int8] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from edge_agent.bundles.bundle import load_bundle
from edge_agent.toolchain.anomaly_fit import FitConfig, bundle_scores, fit_bundle, refit_banks
from edge_agent.toolchain.quantize.graph import calibration_images, quantize_onnx

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "inspection" / "magnetic_tile"
TYPES = ("blowhole", "break", "crack", "fray", "uneven")


def run_of(p: Path) -> str:
    g = p.name.split("_num")[0]
    return "exp1" if g == "exp0" else g


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--defects", type=int, default=0, help="Defect photos per fit (0 = all of the other runs').")
    ap.add_argument("--no-defects", action="store_true", help="No defect head (anomaly score alone).")
    ap.add_argument("--int8", action="store_true", help="Score with each fold's INT8 twin.")
    ap.add_argument("--max-false-reject", type=float, default=FitConfig().max_false_reject)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    goods = sorted((args.root / "train" / "good").iterdir()) + sorted((args.root / "test" / "good").iterdir())
    defects = sorted(p for t in TYPES for p in (args.root / "test" / t).iterdir())
    rows, rel, ys, kinds = [], [], [], []
    tmp = Path(tempfile.mkdtemp(prefix="tile-loao-"))
    try:
        for run in sorted({run_of(p) for p in goods + defects}):
            fold = tmp / run
            (fold / "good").mkdir(parents=True)
            (fold / "defect").mkdir()
            for p in goods:
                if run_of(p) != run:
                    os.symlink(p, fold / "good" / f"{p.parent.parent.name}_{p.name}")
            train_defects = [p for p in defects if run_of(p) != run]
            if args.defects:
                step = max(1, len(train_defects) // args.defects)
                train_defects = train_defects[::step][: args.defects]
            for p in train_defects:
                os.symlink(p, fold / "defect" / f"{p.parent.name}_{p.name}")
            config = FitConfig(threads=1, max_false_reject=args.max_false_reject)
            fit = fit_bundle(fold / "good", fold / "bundle", "tile_fold", config,
                             defect_dir=None if args.no_defects else fold / "defect")
            held_g = [p for p in goods if run_of(p) == run]
            held_d = [p for p in defects if run_of(p) == run]
            onnx_path, threshold = fold / "bundle" / "tile_fold.onnx", fit["threshold"]
            if args.int8:
                bundle = load_bundle(fold / "bundle")
                onnx_path = fold / "int8.onnx"
                quantize_onnx(bundle, calibration_images(fold / "good", 100), onnx_path)
                threshold = refit_banks(onnx_path, fold / "good", bundle.manifest.metadata, 1,
                                        defect_dir=None if args.no_defects else fold / "defect")["threshold"]
            s = bundle_scores(onnx_path, held_g + held_d, 1) - threshold
            y = np.r_[np.zeros(len(held_g)), np.ones(len(held_d))]
            row = {"run": run, "good": len(held_g), "defective": len(held_d), "defects_fitted": len(train_defects),
                   "fit_s": fit["seconds"], "image_auroc": round(float(roc_auc_score(y, s)), 4),
                   "false_reject": round(float((s[y == 0] > 0).mean()), 4),
                   "recall": round(float((s[y == 1] > 0).mean()), 4),
                   "cv_false_reject": fit["cv_false_reject"], "cv_defect_recall": fit.get("cv_defect_recall")}
            print(json.dumps(row), flush=True)
            rows.append(row)
            rel.append(s)
            ys.append(y)
            kinds += ["good"] * len(held_g) + [p.parent.name for p in held_d]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    s, y, kind = np.concatenate(rel), np.concatenate(ys), np.array(kinds)
    summary = {
        "pooled_image_auroc_of_margins": round(float(roc_auc_score(y, s)), 4),
        "mean_run_image_auroc": round(float(np.mean([r["image_auroc"] for r in rows])), 4),
        "false_reject": round(float((s[y == 0] > 0).mean()), 4),
        "recall": round(float((s[y == 1] > 0).mean()), 4),
        "recall_per_type": {t: round(float((s[kind == t] > 0).mean()), 4) for t in TYPES},
        "recall_at_false_reject": {f"{f:.0%}": round(float((s[y == 1] > np.quantile(s[y == 0], 1 - f)).mean()), 4)
                                   for f in (0.01, 0.05, 0.1)},
    }
    print(json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps({"runs": rows, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
