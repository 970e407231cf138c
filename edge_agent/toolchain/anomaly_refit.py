"""``edge-agent inspect fit --add DIR``: teach a fitted anomaly bundle the good parts it rejected.

Operator feedback (``delivery/feedback.py``) collects the images of confirmed false rejects under
``<state_dir>/feedback/<pipeline>/false_reject/``; any folder of photos of good parts works as well. Two ways:

* **The original good photos at hand** (``inspect fit GOOD_DIR --add DIR``): a full fit on both sets
  (``anomaly_fit.fit_bundle``), threshold cross-validated on all of them, as for any fit.
* **Only the bundle** (``inspect fit --add DIR --base BUNDLE``; the bundle does not carry its training photos):
  its memory banks are extended. Per scale, the added photos' patch features (computed by the bundle's own graph,
  so an INT8 bundle gets INT8 features) are thinned by greedy k-centre selection that starts from the existing
  bank, so the patches least like anything in the bank go in first, the same share as the fit kept
  (``coreset_fraction``, at least one patch per photo). The scale statistics and the **threshold stay as they
  were**: they were cross-validated on the original photos, which are not here, and the added photos are a
  biased sample (the good parts that scored highest) that must not set a quantile. Since a bank that only grows
  can only lower every photo's distance to it, every score can only go down: the false-reject rate on the
  original parts cannot rise, and defects that look like the added parts may now pass (``--defects DIR``
  measures that on photos of known defects).

What is reported for the added photos is honest about the bank: a photo in the bank is at distance zero from
itself, so "it now passes" would be true by construction. The report gives each added photo's score before, its
**out-of-fold** score (k-fold over the added photos: the banks extended by the other folds only), which says
whether parts *like* it now pass, and its score in the final bundle.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundles.bundle import MANIFEST_NAME, load_bundle
from edge_agent.errors import InputNotFoundError, ManifestError, require_extra
from edge_agent.fsutil import sha256_file
from edge_agent.toolchain.anomaly_fit import (
    F32,
    STRIDE,
    FitConfig,
    FitProgress,
    _session,
    bundle_scores,
    extract_patches,
    fit_bundle,
    fitted_here,
    nearest_distances,
    pooled_features,
    prune_graph,
    run_tail,
)
from edge_agent.toolchain.evaluate import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

SKIP_DIRS = frozenset({"missed_defect"})
"""Folders never taken as good parts (a feedback store holds defects there)."""


def added_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(photos to add, photos skipped): every image under ``folder`` except those under a ``missed_defect`` folder
    or whose feedback sidecar (``<id>.json``) says ``missed_defect``."""
    if not folder.is_dir():
        raise InputNotFoundError(f"{folder}: not a folder")
    take, skip = [], []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
            continue
        side = p.with_suffix(".json")
        kind = None
        if side.is_file():
            try:
                kind = json.loads(side.read_text()).get("kind")
            except (OSError, ValueError, AttributeError):
                kind = None
        if SKIP_DIRS & {folder.name, *p.relative_to(folder).parts[:-1]} or kind == "missed_defect":
            skip.append(p)
        else:
            take.append(p)
    if not take:
        raise InputNotFoundError(f"{folder}: no photos of good parts to add (JPEG, PNG, WebP; missed_defect skipped)")
    return take, skip


def next_version(version: str) -> str:
    """The version of a bundle with added parts: the fourth part of ``MAJOR.MINOR.PATCH.BUILD`` plus one."""
    try:
        parts = [int(p) for p in version.split(".")]
    except ValueError:
        parts = [1]
    parts = [*parts, 0, 0, 0, 0][:4]
    parts[3] += 1
    return ".".join(str(p) for p in parts)


class _Graph:
    """A bundle's ONNX graph: its per-scale banks and statistics, and its own feature extractor."""

    def __init__(self, onnx_path: Path, scales: Sequence[int], threads: int) -> None:
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        self.model = onnx.load(str(onnx_path))
        self.scales = tuple(sorted(scales))
        inits = {i.name: i for i in self.model.graph.initializer}
        self.banks: dict[int, F32] = {}
        self.stats: list[tuple[float, float]] = []
        for s in self.scales:
            names = (f"s{s}/pc_bank_t2", f"s{s}/pc_mu", f"s{s}/pc_inv_sd")
            missing = [n for n in names if n not in inits]
            if missing:
                raise ManifestError(f"{onnx_path}: memory bank tensors not found: {', '.join(missing)}")
            t2 = numpy_helper.to_array(inits[names[0]]).astype(np.float32)
            self.banks[s] = np.ascontiguousarray(-0.5 * t2.T)
            mu = float(numpy_helper.to_array(inits[names[1]]))
            inv = float(numpy_helper.to_array(inits[names[2]]))
            self.stats.append((mu, 1.0 / inv))
        # a defect head (inspect fit --defects): the score fuses the anomaly score with a logit that does not depend
        # on the banks, so extending the banks still only lowers scores
        self.head: tuple[F32, float, float, float] | None = None
        if "dh_w" in inits:
            self.head = (numpy_helper.to_array(inits["dh_w"]).astype(np.float32)[:, 0],
                         float(numpy_helper.to_array(inits["dh_b"]).reshape(-1)[0]),
                         float(numpy_helper.to_array(inits["dh_a_center"])),
                         float(numpy_helper.to_array(inits["dh_a_inv_scale"])))
        features = onnx.ModelProto()
        features.CopyFrom(self.model)
        prune_graph(features, {f"patches_{s}" for s in self.scales})
        del features.graph.output[:]
        features.graph.output.extend(helper.make_tensor_value_info(f"patches_{s}", TensorProto.FLOAT, None)
                                     for s in self.scales)
        self.features = _session(features, threads)
        self.threads = threads

    def patches(self, paths: Sequence[Path], progress: FitProgress | None, label: str) -> dict[int, F32]:
        # batch 1: the graph was made for one photo (and quantization folds its resize sizes to batch 1)
        return extract_patches(self.features, paths, self.scales, 1, progress, label)

    def scores(self, patches: dict[int, F32], banks: dict[int, F32]) -> F32:
        """Image scores through the graph's own tail (standardise, upsample, sum, smooth, max), fused with the
        defect head's evidence when the graph has one."""
        dists = {}
        for s in self.scales:
            g = s // STRIDE
            dists[s] = nearest_distances(patches[s], banks[s]).reshape(-1, g, g)
        anomaly = run_tail(dists, self.stats, self.threads)[1]
        if self.head is None:
            return anomaly
        w, b, center, inv_scale = self.head
        evidence = pooled_features(patches).astype(np.float64) @ w.astype(np.float64) + b
        return ((anomaly.astype(np.float64) - center) * inv_scale + evidence).astype(np.float32)

    def write(self, banks: dict[int, F32], onnx_path: Path) -> None:
        import onnx
        from onnx import numpy_helper

        values = {}
        for s in self.scales:
            bank = banks[s]
            values[f"s{s}/pc_bank_t2"] = np.ascontiguousarray((-2.0 * bank.T).astype(np.float32))
            values[f"s{s}/pc_bank_sq"] = (bank.astype(np.float64) ** 2).sum(1).astype(np.float32)
        found = set()
        for init in self.model.graph.initializer:
            if init.name in values:
                init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
                found.add(init.name)
        if found != set(values):
            raise ManifestError(f"memory bank tensors not found: {', '.join(sorted(set(values) - found))}")
        onnx.save(self.model, str(onnx_path))


def extend_bank(bank: F32, new: F32, k: int) -> F32:
    """``bank`` plus ``k`` rows of ``new`` chosen by greedy k-centre selection that starts from ``bank``: each
    step takes the new patch farthest from everything chosen so far (exact distances)."""
    flat = np.ascontiguousarray(new.reshape(-1, new.shape[-1]), dtype=np.float32)
    k = min(k, len(flat))
    if k <= 0:
        return bank
    dist = nearest_distances(flat[:, None], bank).reshape(-1).astype(np.float64) ** 2
    sq = np.einsum("ij,ij->i", flat, flat)
    chosen = []
    for _ in range(k):
        i = int(np.argmax(dist))
        chosen.append(i)
        np.minimum(dist, sq - 2 * flat @ flat[i] + sq[i], out=dist)
        dist[i] = -1.0
    return np.ascontiguousarray(np.concatenate([bank, flat[np.sort(chosen)]]), dtype=np.float32)


def _k(n_photos: int, patches_per_photo: int, fraction: float) -> int:
    return min(n_photos * patches_per_photo, max(n_photos, math.ceil(n_photos * patches_per_photo * fraction)))


def _extend_all(banks: dict[int, F32], patches: dict[int, F32], rows: np.ndarray[Any, Any],
                fraction: float) -> dict[int, F32]:
    out = {}
    for s, bank in banks.items():
        p = patches[s][rows]
        out[s] = extend_bank(bank, p, _k(len(p), p.shape[1], fraction)) if len(p) else bank
    return out


def _summary(scores: F32, threshold: float) -> dict[str, Any]:
    return {"passing": int((scores <= threshold).sum()), "of": len(scores),
            "median_score": round(float(np.median(scores)), 4), "max_score": round(float(scores.max()), 4)}


def add_good_parts(
    base_dir: Path,
    add_dir: Path,
    out_dir: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    folds: int = 5,
    defects_dir: Path | None = None,
    coreset_fraction: float | None = None,
    threads: int = 0,
    progress: FitProgress | None = None,
) -> dict[str, Any]:
    """Extend the memory banks of the bundle in ``base_dir`` with the good parts in ``add_dir`` and write the new
    bundle (``version``: by default :func:`next_version` of the base's) to ``out_dir``. Returns the report."""
    require_extra("onnx", "tools", "edge-agent inspect fit --add")
    t0 = time.perf_counter()
    base = load_bundle(base_dir)
    meta = base.manifest.metadata
    if base.manifest.task != "anomaly" or not fitted_here(meta):
        raise ManifestError(f"{base_dir}: not an anomaly bundle made by inspect fit (no metadata.fit.config)")
    if out_dir.resolve() == base.directory.resolve():
        raise InputNotFoundError(f"{out_dir}: is the base bundle itself; write the new version elsewhere (--out-dir)")
    threshold = base.manifest.thresholds.anomaly
    if threshold is None:
        raise ManifestError(f"{base_dir}: no anomaly threshold in the manifest")
    doc = dict(meta["fit"]["config"])
    fraction = coreset_fraction or float(doc.get("coreset_fraction", FitConfig().coreset_fraction))
    graph = _Graph(base.onnx_path, doc["scales"], threads)
    paths, skipped = added_images(add_dir)
    patches = graph.patches(paths, progress, "features of the added photos")
    before = graph.scores(patches, graph.banks)
    n = len(paths)
    k = max(1, min(folds, n))
    fold = np.arange(n) % k
    oof = np.zeros(n, np.float32)
    if n >= 2:
        for f in range(k):
            held = fold == f
            banks_f = _extend_all(graph.banks, patches, np.flatnonzero(~held), fraction)
            oof[held] = graph.scores({s: p[held] for s, p in patches.items()}, banks_f)
            if progress is not None:
                progress("out-of-fold scores", f + 1, k)
    else:
        oof[:] = before  # one photo: nothing else to learn it from
    banks = _extend_all(graph.banks, patches, np.arange(n), fraction)
    after = graph.scores(patches, banks)
    defects: dict[str, Any] | None = None
    if defects_dir is not None:
        if not defects_dir.is_dir():
            raise InputNotFoundError(f"{defects_dir}: not a folder")
        dpaths = sorted(p for p in defects_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not dpaths:
            raise InputNotFoundError(f"{defects_dir}: no photos of defects")
        dp = graph.patches(dpaths, progress, "features of the defect photos")
        d_before, d_after = graph.scores(dp, graph.banks), graph.scores(dp, banks)
        defects = {"of": len(dpaths), "caught_before": int((d_before > threshold).sum()),
                   "caught_after": int((d_after > threshold).sum())}

    new_version = version or next_version(base.manifest.version)
    new_name = name or base.manifest.name
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in base.directory.iterdir():  # model card, licence files...: the new version is the same model
        if item.is_file() and item.name not in (MANIFEST_NAME, base.manifest.model_file):
            shutil.copy2(item, out_dir / item.name)
    model_file = f"{new_name}.onnx"
    graph.write(banks, out_dir / model_file)
    manifest = json.loads((base.directory / MANIFEST_NAME).read_text())
    fit = dict(manifest.get("metadata", {}).get("fit", {}))
    sizes_before = {str(s): len(b) for s, b in graph.banks.items()}
    sizes_after = {str(s): len(b) for s, b in banks.items()}
    added = {
        "photos": n, "from": str(add_dir), "base_version": base.manifest.version, "at": round(time.time()),
        "bank_size_before": sizes_before, "bank_size": sizes_after,
        "threshold": "kept: cross-validated on the original photos (not on the board); scores can only go down",
        "added_passing_before": int((before <= threshold).sum()),
        "added_passing_out_of_fold": int((oof <= threshold).sum()),
    }
    fit["bank_size"] = sizes_after
    fit["added"] = [*fit.get("added", []), added]
    manifest.update({
        "name": new_name, "version": new_version, "model_file": model_file, "sha256": sha256_file(out_dir / model_file),
        "metadata": {**manifest.get("metadata", {}), "fit": fit},
    })
    tmp = out_dir / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST_NAME)
    load_bundle(out_dir)
    seconds = time.perf_counter() - t0
    log.info("added %d good parts to %s %s -> %s %s in %.1f s", n, base.manifest.name, base.manifest.version,
             new_name, new_version, seconds)
    return {
        "mode": "extend_banks",
        "bundle": str(out_dir),
        "name": new_name,
        "version": new_version,
        "base": {"name": base.manifest.name, "version": base.manifest.version},
        "added": n,
        "skipped": [str(p) for p in skipped],
        "threshold_before": threshold,
        "threshold": threshold,
        "threshold_note": added["threshold"],
        "bank_size_before": sizes_before,
        "bank_size": sizes_after,
        "added_before": _summary(before, threshold),
        "added_out_of_fold": {**_summary(oof, threshold), "folds": k if n >= 2 else 0},
        "added_in_bank": _summary(after, threshold),
        "per_photo": [{"photo": p.name, "before": round(float(b), 4), "out_of_fold": round(float(o), 4),
                       "in_bank": round(float(a), 4)} for p, b, o, a in zip(paths, before, oof, after, strict=True)],
        "defects": defects,
        "seconds": round(seconds, 2),
    }


def refit_with_added(
    good_dir: Path,
    add_dir: Path,
    out_dir: Path,
    name: str,
    config: FitConfig,
    *,
    base_dir: Path | None = None,
    backbone: Path | None = None,
    progress: FitProgress | None = None,
    defect_dir: Path | None = None,
) -> dict[str, Any]:
    """A full fit (``fit_bundle``) on the photos of ``good_dir`` and the good parts of ``add_dir`` together (with a
    defect head when ``defect_dir`` is given); the report adds the base bundle's threshold (when ``base_dir`` is
    given) and how the added photos score."""
    paths, skipped = added_images(add_dir)
    with tempfile.TemporaryDirectory(prefix="edge-agent-fit-") as tmp:
        both = Path(tmp) / good_dir.name
        (both / "original").mkdir(parents=True)
        (both / "added").mkdir()
        originals = sorted(q for q in good_dir.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        for i, p in enumerate(originals):
            os.symlink(p.resolve(), both / "original" / f"{i:06d}{p.suffix}")
        for i, p in enumerate(paths):
            os.symlink(p.resolve(), both / "added" / f"{i:06d}{p.suffix}")
        report = fit_bundle(both, out_dir, name, config, backbone=backbone, progress=progress,
                            source=f"edge-agent inspect fit {good_dir.name} --add {add_dir.name}",
                            defect_dir=defect_dir)
    bundle = load_bundle(out_dir)
    threshold = float(report["threshold"])
    scores = bundle_scores(bundle.onnx_path, paths, config.threads)
    out = {**report, "mode": "refit", "added": len(paths), "skipped": [str(p) for p in skipped],
           "added_in_bank": _summary(scores, threshold)}
    if base_dir is not None:
        base = load_bundle(base_dir)
        out["threshold_before"] = base.manifest.thresholds.anomaly
        before = bundle_scores(base.onnx_path, paths, config.threads)
        out["added_before"] = _summary(before, float(base.manifest.thresholds.anomaly or 0.0))
    return out
