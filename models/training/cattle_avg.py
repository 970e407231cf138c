"""Weight-averaging experiments on the cattle recipe (models/cattle_overhead/MODEL_CARD.md, "Weight averaging").

One fit of a temporal fold (``cattle_cv.split``) records the raw and the EMA weights of the trained convolutions at
the end of each of the last epochs; ``--score`` then writes and scores (``cattle_cv.score``: held-out AP50 of the
chute frames) the weights of several averages of one run (EMA as shipped, the last raw weights, uniform averages of
the last k epochs' raw weights) and across the runs of one fold with different seeds (a "soup" of their EMA weights).

    PYTHONPATH=models:. python -m models.training.cattle_avg --fold 0 --seed 0    # fit, keep snapshots (~7 min)
    PYTHONPATH=models:. python -m models.training.cattle_avg --score              # every variant of every run
Snapshots and results go to var/models/cattle_avg/.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundles.bundle import load_bundle
from edge_agent.toolchain import detect_fit as df
from training.cattle_cv import CV_FILE, FRAMES, score, split
from training.common import REPO

OUT = REPO / "var" / "models" / "cattle_avg"
KEEP = 15
"""Snapshots kept: the last KEEP epochs."""


def run_name(fold: int, seed: int, tag: str) -> str:
    return f"f{fold}_s{seed}" + (f"_{tag}" if tag else "")


def fit(fold: int, config: df.DetectFitConfig, tag: str) -> Path:
    from edge_agent.toolchain import detect_train

    frames, labels = df.read_frames(FRAMES)
    train, _ = split(fold, len(frames))
    base = load_bundle(REPO / "models" / "yolox_nano")
    model, head = df.base_graph(base)
    keep = df._scope(model, head, config.train_scope)
    data = [df.load_frame(frames[i]) for i in train]
    tc = detect_train.TrainConfig(
        size=config.size, epochs=config.epochs, batch=config.batch, lr=config.lr,
        augment=detect_train.Augment(mosaic=config.mosaic, top_down=config.top_down),
        seed=config.seed, threads=config.threads, **config.extra,
    )
    snaps: dict[str, np.ndarray] = {}

    def on_epoch(epoch: int, raw: dict[str, np.ndarray], ema: dict[str, np.ndarray]) -> None:
        if epoch >= config.epochs - KEEP:
            for kind, w in (("raw", raw), ("ema", ema)):
                for name, v in w.items():
                    if keep(name):
                        snaps[f"{epoch}|{kind}|{name}"] = v

    t0 = time.perf_counter()
    override = df.class_init(model, head, base.manifest.labels, labels)
    detect_train.train(model, head.outputs(), head.strides, override, data, tc, keep, on_epoch=on_epoch)
    seconds = time.perf_counter() - t0
    out = OUT / run_name(fold, config.seed, tag)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "snapshots.npz", **snaps)  # type: ignore[arg-type]
    (out / "run.json").write_text(json.dumps({"fold": fold, "seed": config.seed, "tag": tag, "epochs": config.epochs,
                                              "size": config.size, "lr": config.lr, "train_seconds": round(seconds)}))
    return out


def load_snaps(run: Path) -> tuple[dict[str, Any], dict[tuple[int, str], dict[str, np.ndarray]]]:
    meta = json.loads((run / "run.json").read_text())
    z = np.load(run / "snapshots.npz")
    by: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key in z.files:
        epoch, kind, name = key.split("|", 2)
        by.setdefault((int(epoch), kind), {})[name] = z[key]
    return meta, by


def mean(ws: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.mean([w[k] for w in ws], axis=0).astype(np.float32) for k in ws[0]}


def score_weights(weights: dict[str, np.ndarray], fold: int, size: int) -> dict[str, Any]:
    _frames, labels = df.read_frames(FRAMES)
    base = load_bundle(REPO / "models" / "yolox_nano")
    model, head = df.base_graph(base)
    out = OUT / "_scratch"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = replace(df.DetectFitConfig(), size=size)
    df.write_graph(model, head, weights, len(labels), size, out / "m.onnx")
    (out / "manifest.json").write_text(json.dumps(df._manifest("m", "m.onnx", out, base, labels, config, "cv")))
    r = score(out, fold)
    return {k: r[k]["ap50"] for k in ("all", "chute", "drone") if k in r} | {
        "thr": r["all"]["best_f1_threshold"]}


def variants(meta: dict[str, Any], by: dict[tuple[int, str], dict[str, np.ndarray]]) -> dict[str, Any]:
    last = meta["epochs"] - 1
    return {
        "ema": by[(last, "ema")],
        "raw": by[(last, "raw")],
        "swa5": mean([by[(e, "raw")] for e in range(last - 4, last + 1)]),
        "swa10": mean([by[(e, "raw")] for e in range(last - 9, last + 1)]),
        "swa15": mean([by[(e, "raw")] for e in range(last - KEEP + 1, last + 1)]),
    }


def score_all() -> dict[str, Any]:
    results_file = OUT / "results.json"
    results: dict[str, Any] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    runs = sorted(p for p in OUT.iterdir() if (p / "run.json").is_file())
    groups: dict[tuple[int, str, int], list[Path]] = {}
    for run in runs:
        meta, by = load_snaps(run)
        groups.setdefault((meta["fold"], meta["tag"], meta["size"]), []).append(run)
        for v, w in variants(meta, by).items():
            key = f"{run.name}:{v}"
            if key not in results:
                results[key] = score_weights(w, meta["fold"], meta["size"])
                print(key, results[key], flush=True)
                results_file.write_text(json.dumps(results, indent=2))
    for (fold, _tag, size), members in groups.items():
        for a, b in itertools.combinations(members, 2):
            for v in ("ema", "swa10"):
                key = f"soup({a.name}+{b.name}):{v}"
                if key not in results:
                    ws = [variants(*load_snaps(r))[v] for r in (a, b)]
                    results[key] = score_weights(mean(ws), fold, size)
                    print(key, results[key], flush=True)
                    results_file.write_text(json.dumps(results, indent=2))
    return results


def export(fold: int, seeds: list[int], tag: str = "") -> dict[str, Any]:
    """Write the soup of the EMA weights of ``seeds`` (runs of ``fold``) as cattle_cv's fold model and result (what
    ``cattle_cv --fold`` writes for a recipe with ``soup = len(seeds)``), for ``cattle_cv --collect``."""
    from training import cattle_cv

    runs = [load_snaps(OUT / run_name(fold, s, tag)) for s in seeds]
    weights = mean([variants(meta, by)["ema"] for meta, by in runs])
    _frames, labels = df.read_frames(FRAMES)
    base = load_bundle(REPO / "models" / "yolox_nano")
    model, head = df.base_graph(base)
    size = runs[0][0]["size"]
    config = replace(df.DetectFitConfig(), size=size, soup=len(seeds))
    out = cattle_cv.OUT / f"fold_{fold}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    df.write_graph(model, head, weights, len(labels), size, out / "m.onnx")
    (out / "manifest.json").write_text(json.dumps(df._manifest("m", "m.onnx", out, base, labels, config, "cv")))
    result = score(out, fold)
    result["train_seconds"] = sum(meta["train_seconds"] for meta, _ in runs)
    result["seeds"] = seeds
    (cattle_cv.OUT / f"fold_{fold}.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fold", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--tag", default="")
    parser.add_argument("--score", action="store_true")
    parser.add_argument("--export", type=int, action="append", help="Write this fold's soup for cattle_cv.")
    parser.add_argument("--seeds", default="0,1", help="Seeds of the exported soup.")
    args = parser.parse_args(argv)
    recipe = json.loads(CV_FILE.read_text())["recipe"]
    config = replace(df.DetectFitConfig(), **(recipe | {"seed": args.seed}))
    for k in ("size", "lr", "epochs"):
        if getattr(args, k) is not None:
            config = replace(config, **{k: getattr(args, k)})
    if args.fold is not None:
        print(fit(args.fold, config, args.tag), flush=True)
    if args.score:
        score_all()
    for fold in args.export or []:
        r = export(fold, [int(x) for x in args.seeds.split(",")], args.tag)
        print(fold, {k: r[k]["ap50"] for k in ("all", "chute", "drone") if k in r})


if __name__ == "__main__":
    main()
