"""How close an emulated-aarch64 `infer --json` answer is to the x86_64 one (used by scripts/arm64_check.py).

Pure: documents in, differences out; the only I/O is reading a bundle's manifest and graph in ``precision`` and
``score_threshold``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Tolerance:
    """How far an aarch64 answer may be from the x86_64 one."""

    score: float  # |a - b| / max(1, |a|): absolute for probabilities, relative for unbounded anomaly distances
    box_px: float  # per box corner, in original-image pixels


# OpenCV's INTER_LINEAR resize rounds differently in its x86 and ARM code (13-22% of a resized picture's values
# one level apart; vision/imaging.py says why the bit-exact mode is not used), so even FP32 graphs see slightly
# different inputs: measured up to ~11 px on a YOLOX-Nano box corner and 1.3% of a tile anomaly score. INT8 graphs
# add different integer kernels (x86 VNNI/AVX2 vs ARM NEON dot products, requantisation rounding). Labels, verdicts
# and the set of detections must still match exactly.
TOLERANCES = {"fp32": Tolerance(score=0.03, box_px=16.0), "int8": Tolerance(score=0.06, box_px=16.0)}


@dataclass
class Diff:
    """How far one run's predictions are from the reference's, and what does not match."""

    max_score: float = 0.0  # largest |a - b| / max(1, |a|) over matched scores
    max_box: float = 0.0  # largest |a - b| in pixels over matched box corners
    problems: list[str] = field(default_factory=list)

    def score(self, where: str, ref: float, got: float, tol: Tolerance) -> None:
        rel = abs(ref - got) / max(1.0, abs(ref))
        self.max_score = max(self.max_score, rel)
        if rel > tol.score:
            self.problems.append(f"{where}: score {ref} vs {got} (|d| = {rel:.3g} > {tol.score})")

    def box(self, where: str, ref: list[float], got: list[float], tol: Tolerance) -> None:
        err = max(abs(a - b) for a, b in zip(ref, got, strict=True))
        self.max_box = max(self.max_box, err)
        if err > tol.box_px:
            self.problems.append(f"{where}: box {ref} vs {got} (|d| = {err:.3g} px > {tol.box_px})")


def iou(a: list[float], b: list[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def compare_docs(ref: dict[str, Any], got: dict[str, Any], tol: Tolerance, score_threshold: float | None,
                 diff: Diff) -> None:
    """One image's `infer --json` document, aarch64 (``got``) against x86_64 (``ref``).

    The same: model, version, task, image size, `rejected`; classification: the top label, and every label of the
    top-k scored within the tolerance (one that is in only one top-k must score within the tolerance of the other
    list's last, so it only crossed the cut-off); anomaly: the verdict (unless the score is within the tolerance of
    the threshold); detection: boxes paired by label and overlap, each pair's score and corners within the
    tolerance, an unpaired box allowed only within the tolerance of ``score_threshold``.
    """
    where = Path(str(ref.get("image", "?"))).name
    for key in ("model", "model_version", "task", "image_size", "rejected"):
        if ref.get(key) != got.get(key):
            diff.problems.append(f"{where}: {key} {ref.get(key)!r} vs {got.get(key)!r}")
    if "error" in ref or "error" in got:
        if ref.get("error") != got.get("error"):
            diff.problems.append(f"{where}: error {ref.get('error')!r} vs {got.get('error')!r}")
        return
    rp: list[dict[str, Any]] = ref["predictions"]
    gp: list[dict[str, Any]] = got["predictions"]
    task = ref.get("task")
    if task == "classification":
        if rp and gp and rp[0]["label"] != gp[0]["label"]:
            diff.problems.append(f"{where}: top label {rp[0]['label']!r} vs {gp[0]['label']!r}")
        rs = {p["label"]: float(p["score"]) for p in rp}
        gs = {p["label"]: float(p["score"]) for p in gp}
        for label in rs.keys() | gs.keys():
            if label in rs and label in gs:
                diff.score(f"{where} {label}", rs[label], gs[label], tol)
            else:
                mine, other = (rs, gs) if label in rs else (gs, rs)
                floor = min(other.values(), default=0.0)
                if mine[label] > floor + tol.score:
                    diff.problems.append(f"{where}: {label} ({mine[label]}) only in one top-{len(mine)}")
    elif task == "anomaly":
        if len(rp) != len(gp):
            diff.problems.append(f"{where}: {len(rp)} vs {len(gp)} predictions")
            return
        for r, g in zip(rp, gp, strict=True):
            diff.score(f"{where} score", float(r["score"]), float(g["score"]), tol)
            diff.score(f"{where} threshold", float(r["threshold"]), float(g["threshold"]), tol)
            near = abs(float(r["score"]) - float(r["threshold"])) / max(1.0, abs(float(r["threshold"]))) <= tol.score
            if (r["label"], r["anomalous"]) != (g["label"], g["anomalous"]) and not near:
                diff.problems.append(f"{where}: verdict {r['label']!r} vs {g['label']!r}")
    elif task == "detection":
        free = list(range(len(gp)))
        for r in sorted(rp, key=lambda p: -float(p["score"])):
            best = max((j for j in free if gp[j]["label"] == r["label"]),
                       key=lambda j: iou(r["box"], gp[j]["box"]), default=None)
            if best is None or iou(r["box"], gp[best]["box"]) < 0.5:
                unpaired(diff, where, "x86_64", r, tol, score_threshold)
                continue
            free.remove(best)
            diff.score(f"{where} {r['label']}", float(r["score"]), float(gp[best]["score"]), tol)
            diff.box(f"{where} {r['label']}", r["box"], gp[best]["box"], tol)
        for j in free:
            unpaired(diff, where, "aarch64", gp[j], tol, score_threshold)
    elif rp != gp:
        diff.problems.append(f"{where}: predictions {rp} vs {gp}")


def unpaired(diff: Diff, where: str, side: str, p: dict[str, Any], tol: Tolerance, threshold: float | None) -> None:
    """A detection that only one side reported: allowed when it scores within the tolerance of the threshold."""
    if threshold is None or float(p["score"]) > threshold + tol.score:
        diff.problems.append(f"{where}: {p['label']} {p['score']} {p['box']} only on {side}")


def precision(bundle: Path) -> str:
    """'int8' when the bundle's graph has quantised operators (QDQ or QLinear), else 'fp32'."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    graph = (bundle / manifest["model_file"]).read_bytes()
    return "int8" if b"DequantizeLinear" in graph or b"QLinear" in graph else "fp32"


def score_threshold(bundle: Path) -> float | None:
    thresholds = json.loads((bundle / "manifest.json").read_text()).get("thresholds") or {}
    value = thresholds.get("score")
    return float(value) if value is not None else None
