"""Photo-quality checks (``edge_agent.vision.quality``) measured on real leaf photos and synthetic bad ones.

    .venv/bin/python -m benchmarks.photo_quality [--data ../shared/datasets/crops] [--out benchmarks/results]

For PlantVillage (lab photos, 256 px) and iBean (field photos, 500 px) ``train/`` folders:

1. **Calibration, honest split**: every measure is taken on every real photo. Thresholds are *suggested* from the
   even-numbered photos of each set (sorted by path): for each check the bound that refuses at most 0.25% of either
   set, rounded outwards; their refusal rate is then reported on the odd-numbered photos, which they never saw,
   and on all of them, for the suggested and for the shipped thresholds (``QualityThresholds()``).
2. **Catch rates**: every second real photo is degraded (Gaussian blur of 1.5/2/3 px at the 224 px working size,
   gamma 2.5/3.5 and 0.3x exposure for darkness, 2.5x/3.5x gain for over-exposure, the photo shrunk to 1/3 and 1/4
   of its side and pasted at a random place onto a grey, brown soil, sky, wall or dark background) and checked with
   the shipped thresholds: how many are refused, and how many with the expected code.
3. **Cost**, side by side in one run on 120 photos (alternating, one thread): the checks on the photo as the crop
   pipeline decodes it (``Model.decode(min_side=224)``), against the shipped ``crop_disease`` model's own
   ``predict`` on the same image: milliseconds and the ratio. (``measure`` is also timed on every photo during step
   1, on the full-size decode, under whatever else the machine runs.)

Writes ``results/photo_quality.{json,md}``. A benchmark, not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, astuple, fields
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
from PIL import Image as PILImage

from edge_agent.types import U8Image
from edge_agent.vision.quality import CODES, WORK_SIDE, PhotoMeasures, QualityThresholds, check, measure

SETS = ("plantvillage", "ibean")
BACKGROUNDS = ("grey", "soil", "sky", "wall", "dark")
EXPECTED = {
    "blur": "blurry", "dark": "too_dark", "exposure": "too_dark", "over": "too_bright", "small": "leaf_too_small"
}
REFUSE_PER_CHECK = 0.0025  # each check may refuse at most 0.25% of either set: four checks stay near 1% together


def _blur(img: U8Image, px: float) -> U8Image:
    sigma = px * min(img.shape[:2]) / WORK_SIDE
    return np.asarray(cv2.GaussianBlur(img, (0, 0), sigma), np.uint8)


def _gamma(img: U8Image, g: float) -> U8Image:
    lut = np.round(255 * (np.arange(256) / 255.0) ** g).astype(np.uint8)
    return np.asarray(lut[img], np.uint8)


def _gain(img: U8Image, k: float) -> U8Image:
    out: U8Image = np.clip(img.astype(np.float32) * k, 0, 255).astype(np.uint8)
    return out


def _background(kind: str, h: int, w: int, rng: np.random.Generator) -> U8Image:
    noise = rng.normal(0, 1, (h, w, 1)).astype(np.float32)
    if kind == "grey":
        bg = np.full((h, w, 3), 128, np.float32) + 6 * noise
    elif kind == "soil":  # brown, textured
        tex = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 3)
        tex = (tex / (tex.std() + 1e-6))[..., None]
        bg = np.array([110, 80, 55], np.float32) * (1 + 0.25 * tex) + rng.normal(0, 8, (h, w, 3))
    elif kind == "sky":
        bg = np.full((h, w, 3), (170, 195, 230), np.float32) + 4 * noise
    elif kind == "wall":
        bg = np.full((h, w, 3), (215, 205, 185), np.float32) + 5 * noise
    else:  # dark ground
        bg = np.full((h, w, 3), (50, 45, 40), np.float32) + rng.normal(0, 6, (h, w, 3))
    out: U8Image = np.clip(bg, 0, 255).astype(np.uint8)
    return out


def _shrink(img: U8Image, f: float, kind: str, rng: np.random.Generator) -> U8Image:
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, int(w * f)), max(1, int(h * f))), interpolation=cv2.INTER_AREA)
    out = _background(kind, h, w, rng)
    y = int(rng.integers(0, h - small.shape[0] + 1))
    x = int(rng.integers(0, w - small.shape[1] + 1))
    out[y : y + small.shape[0], x : x + small.shape[1]] = small
    return out


def degradations(rng: np.random.Generator) -> dict[str, Callable[[U8Image], U8Image]]:
    out: dict[str, Callable[[U8Image], U8Image]] = {
        "blur 1.5 px": lambda i: _blur(i, 1.5),
        "blur 2 px": lambda i: _blur(i, 2.0),
        "blur 3 px": lambda i: _blur(i, 3.0),
        "dark gamma 2.5": lambda i: _gamma(i, 2.5),
        "dark gamma 3.5": lambda i: _gamma(i, 3.5),
        "exposure 0.3x": lambda i: _gain(i, 0.3),
        "over 2.5x": lambda i: _gain(i, 2.5),
        "over 3.5x": lambda i: _gain(i, 3.5),
    }
    for f, name in ((1 / 3, "1/3"), (1 / 4, "1/4")):
        for bg in BACKGROUNDS:
            out[f"small {name} on {bg}"] = functools.partial(_shrink, f=f, kind=bg, rng=rng)
    return out


def _expected(name: str) -> str:
    return EXPECTED[name.split(maxsplit=1)[0]]


def suggest(calibration: dict[str, list[PhotoMeasures]]) -> QualityThresholds:
    """Bounds refusing at most REFUSE_PER_CHECK of every set's calibration photos (rounded outwards)."""

    def col(name: str) -> list[np.ndarray]:
        return [np.array([getattr(m, name) for m in ms]) for ms in calibration.values()]

    # exposure is refused when the frame *and* the leaf are too dark (too bright): what decides is the brighter
    # (darker) of the two
    lit = [np.array([max(m.brightness, m.leaf_brightness) for m in ms]) for ms in calibration.values()]
    glare = [np.array([min(m.brightness, m.leaf_brightness if m.leaf_brightness >= 0 else 255.0) for m in ms])
             for ms in calibration.values()]
    q = 100 * REFUSE_PER_CHECK
    lo = {n: min(float(np.percentile(c, q)) for c in col(n)) for n in ("sharpness", "leaf_fraction")}
    hi = {n: max(float(np.percentile(c, 100 - q)) for c in col(n)) for n in ("clipped",)}
    lo["brightness"] = min(float(np.percentile(c, q)) for c in lit)
    hi["brightness"] = max(float(np.percentile(c, 100 - q)) for c in glare)
    return QualityThresholds(
        min_brightness=float(np.floor(lo["brightness"])),
        max_brightness=float(np.ceil(hi["brightness"])),
        max_clipped=float(np.ceil(hi["clipped"] * 100) / 100),
        min_sharpness=float(np.floor(lo["sharpness"] * 100) / 100),
        min_leaf_fraction=float(np.floor(lo["leaf_fraction"] * 100) / 100),
    )


def refusals(ms: list[PhotoMeasures], t: QualityThresholds) -> dict[str, object]:
    reports = [check(m, t) for m in ms]
    per = {code: sum(code in r.failed for r in reports) for code in CODES}
    refused = sum(not r.ok for r in reports)
    return {"photos": len(ms), "refused": refused, "rate": round(refused / max(1, len(ms)), 4), "per_check": per}


def catch_rates(degraded: dict[str, dict[str, list[PhotoMeasures]]], t: QualityThresholds) -> dict[str, object]:
    out: dict[str, object] = {}
    for ds, variants in degraded.items():
        rows = {}
        for name, ms in variants.items():
            reports = [check(m, t) for m in ms]
            rows[name] = {
                "photos": len(ms),
                "refused": round(sum(not r.ok for r in reports) / max(1, len(ms)), 4),
                "expected_code": round(sum(r.code == _expected(name) for r in reports) / max(1, len(ms)), 4),
            }
        out[ds] = rows
    return out


def cost(data: Path, models: Path, n: int = 120) -> dict[str, object]:
    """Median ms of the checks vs. the crop model's predict, interleaved on the same decoded photos."""
    from edge_agent.bundles.bundle import find_bundle
    from edge_agent.vision.model import Model
    from edge_agent.vision.runtime import RuntimeOptions

    model = Model.load(find_bundle("crop_disease", models), RuntimeOptions(intra_op_threads=1, allow_spinning=False))
    model.warmup()
    files = [f for ds in SETS for f in sorted((data / ds / "train").rglob("*.jpg"))]
    files = files[:: max(1, len(files) // n)][:n]
    q_ms: list[float] = []
    p_ms: list[float] = []
    for path in files:
        image = model.decode(path.read_bytes(), min_side=WORK_SIDE)
        t0 = time.perf_counter()
        check(measure(image.pixels, image.color))
        t1 = time.perf_counter()
        model.predict(image)
        t2 = time.perf_counter()
        q_ms.append((t1 - t0) * 1000)
        p_ms.append((t2 - t1) * 1000)
    q, pr = float(np.median(q_ms)), float(np.median(p_ms))
    return {"photos": len(files), "checks_ms": round(q, 3), "predict_ms": round(pr, 3),
            "checks_over_predict": round(q / pr, 4), "model": f"{model.name} {model.version}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/datasets/crops")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--every", type=int, default=2, help="degrade every Nth real photo")
    ap.add_argument("--dump", type=Path, default=None, help="also save every measure to this .json")
    ap.add_argument("--models", type=Path, default=Path(__file__).resolve().parents[1] / "models")
    ap.add_argument("--from-dump", type=Path, default=None, help="report from a --dump instead of measuring again")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    shipped = QualityThresholds()
    variants = degradations(rng)
    real: dict[str, list[PhotoMeasures]] = {}
    degraded: dict[str, dict[str, list[PhotoMeasures]]] = {}
    ms: list[float] = []
    if args.from_dump is not None:
        rows = json.loads(args.from_dump.read_text())
        for ds in SETS:
            real[ds] = [PhotoMeasures(*r) for r in rows[f"{ds}/real"]]
            degraded[ds] = {k: [PhotoMeasures(*r) for r in rows[f"{ds}/{k}"]] for k in variants}
        ms = [float(x) for x in rows.get("ms", [])]
    for ds in SETS if args.from_dump is None else ():
        files = sorted((args.data / ds / "train").rglob("*.jpg"))
        real[ds] = []
        degraded[ds] = {k: [] for k in variants}
        for n, path in enumerate(files):
            with PILImage.open(path) as im:
                rgb: U8Image = np.asarray(im.convert("RGB"), np.uint8)
            t0 = time.perf_counter()
            m = measure(rgb, "RGB")
            ms.append((time.perf_counter() - t0) * 1000)
            real[ds].append(m)
            if n % args.every:
                continue
            for name, fn in variants.items():
                degraded[ds][name].append(measure(fn(rgb), "RGB"))
        print(f"{ds}: {len(files)} photos measured", flush=True)
    if args.dump is not None and args.from_dump is None:  # every measure: {"<set>/real" | "<set>/<degradation>": [...]}
        dump: dict[str, object] = {f"{ds}/real": [astuple(m) for m in ms_] for ds, ms_ in real.items()}
        dump["ms"] = ms
        for ds, d in degraded.items():
            dump.update({f"{ds}/{k}": [astuple(m) for m in v] for k, v in d.items()})
        args.dump.write_text(json.dumps(dump))
    even = {ds: m[0::2] for ds, m in real.items()}
    odd = {ds: m[1::2] for ds, m in real.items()}
    suggested = suggest(even)
    report: dict[str, object] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {ds: f"{args.data.name}/{ds}/train ({len(real[ds])} photos)" for ds in SETS},
        "shipped": asdict(shipped),
        "suggested_from_even_half": asdict(suggested),
        "refusals": {
            ds: {
                "suggested_on_odd_half": refusals(odd[ds], suggested),
                "shipped_on_odd_half": refusals(odd[ds], shipped),
                "shipped_on_all": refusals(real[ds], shipped),
            }
            for ds in SETS
        },
        "catch_rates_shipped": catch_rates(degraded, shipped),
        "catch_rates_suggested": catch_rates(degraded, suggested),
        "ms_per_photo": {"median": round(float(np.median(ms)), 3), "p95": round(float(np.percentile(ms, 95)), 3)}
        if ms else {"median": None, "p95": None},
        "cost_vs_model": cost(args.data, args.models),
        "real_percentiles": {
            ds: {
                f.name: {p: round(float(np.percentile([getattr(m, f.name) for m in real[ds]], p)), 4)
                         for p in (0, 0.5, 1, 2, 50, 98, 99, 99.5, 100)}
                for f in fields(PhotoMeasures)
            }
            for ds in SETS
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "photo_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "photo_quality.md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict[str, object]) -> str:
    shipped = r["shipped"]
    suggested = r["suggested_from_even_half"]
    assert isinstance(shipped, dict) and isinstance(suggested, dict)
    lines = [f"# Photo-quality checks ({r['when']})", "", "Data: " + ", ".join(str(v) for v in r["data"].values()),  # type: ignore[attr-defined]
             "", "| threshold | shipped | suggested (even half) |", "|---|---|---|"]
    lines += [f"| {k} | {shipped[k]} | {suggested[k]} |" for k in shipped]
    lines += ["", "## Real photos refused", "",
              "| set | thresholds / photos | refused | too_dark | too_bright | blurry | leaf_too_small |",
              "|---|---|---|---|---|---|---|"]
    for ds, rows in r["refusals"].items():  # type: ignore[attr-defined]
        for name, row in rows.items():
            per = row["per_check"]
            lines.append(f"| {ds} | {name} | {row['refused']}/{row['photos']} ({100 * row['rate']:.2f}%) | "
                         f"{per['too_dark']} | {per['too_bright']} | {per['blurry']} | {per['leaf_too_small']} |")
    lines += ["", "## Degraded photos caught", "",
              "| degradation | set | photos | refused (shipped) | with the expected code (shipped) "
              "| refused (suggested) |",
              "|---|---|---|---|---|---|"]
    suggested_rates = r["catch_rates_suggested"]
    for ds, rows in r["catch_rates_shipped"].items():  # type: ignore[attr-defined]
        for name, row in rows.items():
            other = suggested_rates[ds][name]  # type: ignore[index]
            lines.append(f"| {name} | {ds} | {row['photos']} | {100 * row['refused']:.1f}% | "
                         f"{100 * row['expected_code']:.1f}% | {100 * other['refused']:.1f}% |")
    ms = r["ms_per_photo"]
    assert isinstance(ms, dict)
    c = r["cost_vs_model"]
    assert isinstance(c, dict)
    sweep = (f"; `measure` on every full-size photo during the sweep: median {ms['median']} ms, p95 {ms['p95']} ms"
             if ms["median"] is not None else "")
    lines += ["", f"Cost, side by side on {c['photos']} photos as the crop pipeline decodes them: checks "
              f"{c['checks_ms']} ms, {c['model']} predict {c['predict_ms']} ms (ratio {c['checks_over_predict']})"
              f"{sweep} (one thread, machine shared).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
