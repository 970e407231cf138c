"""What operator feedback buys on magnetic tiles: `inspect fit --add` measured on photos it never saw.

A line whose anomaly model was fitted on few photos rejects too many good parts. Here (one honest split of
``../shared/datasets/inspection/magnetic_tile``, the training goods taken in turn, so neighbouring photos spread):

1. fit on train goods 0, 3, 6, ... (100 photos; `inspect fit` defaults: 20-fold threshold for 5% false rejects);
2. "production": train goods 1, 4, 7, ... (100) scored by it; its false rejects are what an operator flags;
3. the flagged parts are added: (a) memory banks extended, threshold kept (`inspect fit --add DIR --base`), at the
   fit's coreset fraction and at 1.0; (b) a full refit on the 100 fit photos plus them (`inspect fit GOOD --add`);
4. every model is measured on what none of this saw: train goods 2, 5, 8, ... (100) and magnetic_tile/test
   (50 good, 198 defective): false rejects, defects caught at the model's own threshold, image AUROC on test; and,
   to compare the models with "just raise the base's threshold", the share of defects each catches at the threshold
   that rejects exactly 2, 5 and 10 of the 150 unseen good parts.

    PYTHONPATH=. python scripts/measure_feedback_refit.py [--shared ../shared] [--out build/feedback_refit]

Writes ``<out>/result.json`` and prints it. About 3 minutes on two busy CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundles.bundle import load_bundle
from edge_agent.toolchain.anomaly_fit import FitConfig, fit_bundle
from edge_agent.toolchain.anomaly_refit import _Graph, add_good_parts, refit_with_added

ROOT = Path(__file__).resolve().parents[1]


def _link(paths: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        if not (folder / p.name).exists():
            os.symlink(p.resolve(), folder / p.name)
    return folder


def _scores(bundle_dir: Path, paths: list[Path]) -> tuple[np.ndarray[Any, Any], float]:
    bundle = load_bundle(bundle_dir)
    graph = _Graph(bundle.onnx_path, bundle.manifest.metadata["fit"]["config"]["scales"], 1)
    threshold = bundle.manifest.thresholds.anomaly
    assert threshold is not None
    return graph.scores(graph.patches(paths, None, ""), graph.banks), float(threshold)


def _auroc(neg: np.ndarray[Any, Any], pos: np.ndarray[Any, Any]) -> float:
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "feedback_refit")
    args = ap.parse_args()
    data = args.shared / "datasets" / "inspection" / "magnetic_tile"
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    backbone = ROOT / "models" / "tile_anomaly" / "tile_anomaly.onnx"
    goods = sorted((data / "train" / "good").iterdir())
    fit_set, production, later = goods[0::3], goods[1::3], goods[2::3]
    test_good = sorted((data / "test" / "good").iterdir())
    defects = sorted(p for c in sorted((data / "test").iterdir()) if c.name != "good" for p in sorted(c.iterdir()))
    config = FitConfig(threads=1)
    fit_dir = _link(fit_set, out / "fit")
    shutil.rmtree(out / "base", ignore_errors=True)
    fit_report = fit_bundle(fit_dir, out / "base", "tile_line", config, backbone=backbone)

    def measure(bundle_dir: Path) -> dict[str, Any]:
        s_later, threshold = _scores(bundle_dir, later)
        s_good, _ = _scores(bundle_dir, test_good)
        s_bad, _ = _scores(bundle_dir, defects)
        unseen = np.sort(np.concatenate([s_later, s_good]))[::-1]
        matched = {f"recall_at_{k}_of_{len(unseen)}_false_rejects": round(float((s_bad > unseen[k]).mean()), 4)
                   for k in (2, 5, 10)}
        return {**matched, "threshold": round(threshold, 4),
                "false_rejects_unseen_train_goods": f"{int((s_later > threshold).sum())}/{len(s_later)}",
                "false_rejects_test_goods": f"{int((s_good > threshold).sum())}/{len(s_good)}",
                "defects_caught_test": f"{int((s_bad > threshold).sum())}/{len(s_bad)}",
                "recall_test": round(float((s_bad > threshold).mean()), 4),
                "image_auroc_test": round(_auroc(s_good, s_bad), 4)}

    s_prod, threshold = _scores(out / "base", production)
    flagged = [p for p, s in zip(production, s_prod, strict=True) if s > threshold]
    feedback = out / "feedback" / "false_reject"
    shutil.rmtree(feedback, ignore_errors=True)
    _link(flagged, feedback)
    result: dict[str, Any] = {
        "split": "train goods: fit 0::3 (100), production 1::3 (100), unseen 2::3 (100); test: 50 good, 198 defects",
        "fit_seconds": fit_report["seconds"],
        "production_false_rejects_flagged": f"{len(flagged)}/{len(production)}",
        "base (fit on 100)": measure(out / "base"),
    }
    for fraction in (None, 1.0):
        name = f"banks extended, threshold kept, coreset {fraction or 'of the fit (0.1)'}"
        target = out / f"added_{fraction or 'fit'}"
        shutil.rmtree(target, ignore_errors=True)
        report = add_good_parts(out / "base", feedback, target, coreset_fraction=fraction, threads=1)
        result[name] = {**measure(target), "seconds": report["seconds"],
                        "bank_size": report["bank_size"], "bank_size_before": report["bank_size_before"],
                        "added_passing_out_of_fold": f"{report['added_out_of_fold']['passing']}/{report['added']}"}
    shutil.rmtree(out / "refit", ignore_errors=True)
    refit = refit_with_added(fit_dir, feedback, out / "refit", "tile_line", config, base_dir=out / "base",
                             backbone=backbone)
    result["full refit on the 100 + flagged, threshold cross-validated"] = {**measure(out / "refit"),
                                                                           "seconds": refit["seconds"]}
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
