"""`edge-agent inspect fit --defects`: a defect head fitted on photos of known defects, fused with the anomaly score.

Small synthetic parts (as tests/test_anomaly_fit.py): what must hold is the wiring (graph == numpy, the threshold's
out-of-fold rule, regions from the anomaly map, refits that need the defect photos), not accuracy; the magnetic-tile
figures are measured by scripts/measure_tile_defect_head.py and stated in models/tile_anomaly/MODEL_CARD.md.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from PIL import Image
from typer.testing import CliRunner

from edge_agent.bundles.bundle import load_bundle
from edge_agent.cli import app
from edge_agent.errors import InputNotFoundError, ManifestError
from edge_agent.sectors.inspection import InspectionRules, inspection_verdict
from edge_agent.toolchain.anomaly_fit import (
    FitConfig,
    default_backbone,
    defect_images,
    fit_bundle,
    pooled_features,
    refit_banks,
    to_pixels,
)
from edge_agent.types import AnomalyScore
from edge_agent.vision.model import Model
from edge_agent.vision.postprocess import region_level

BACKBONE = default_backbone()


def _part(seed: int, defect: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.clip(np.linspace(110, 150, 96)[:, None] * np.ones((1, 96)) + rng.normal(0, 4, (96, 96)), 0, 255)
    if defect:  # a dark scratch at a random height
        y = int(rng.integers(12, 70))
        img[y : y + 10, 10:86] = 25
    return np.repeat(img[:, :, None], 3, axis=2).astype(np.uint8)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("defect_head")
    (root / "good").mkdir()
    (root / "defects" / "scratch").mkdir(parents=True)
    (root / "defects" / "good").mkdir()  # skipped: a folder named good is not a defect
    for i in range(12):
        Image.fromarray(_part(i)).save(root / "good" / f"{i:02d}.png")
        Image.fromarray(_part(500 + i, defect=True)).save(root / "defects" / "scratch" / f"{i:02d}.png")
    Image.fromarray(_part(99)).save(root / "defects" / "good" / "x.png")
    config = FitConfig(coreset_fraction=0.5, min_bank=16, folds=4, defect_folds=3, max_false_reject=0.0)
    report = fit_bundle(root / "good", root / "bundle", "line_d", config, backbone=BACKBONE,
                        defect_dir=root / "defects")
    return root / "bundle", report, root


def test_defect_photos_are_found_and_counted(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(InputNotFoundError, match="at least 10 photos of defective parts"):
        defect_images(tmp_path / "a")
    with pytest.raises(InputNotFoundError, match="not a folder"):
        defect_images(tmp_path / "missing")


def test_fit_with_defects_writes_the_head_and_both_thresholds(fitted: tuple[Path, dict[str, Any], Path]) -> None:
    bundle_dir, report, _ = fitted
    bundle = load_bundle(bundle_dir)
    head = bundle.manifest.metadata["fit"]["defect_head"]
    assert head["n_defects"] == 12 and head["folds"] == 3  # the photo under defects/good was skipped
    assert report["n_defects"] == 12 and 0.0 <= report["cv_defect_recall"] <= 1.0
    th = bundle.manifest.thresholds
    assert th.anomaly == pytest.approx(report["threshold"], abs=1e-6) and th.region is not None
    outputs = [o.name for o in onnx.load(str(bundle.onnx_path)).graph.output]
    assert outputs == ["score", "anomaly_map", "anomaly_score", "defect_evidence"]
    assert any(n.startswith("dh_") for n in bundle.manifest.metadata["quantize"]["nodes_to_exclude"])


def test_graph_fuses_the_two_evidences_as_the_numpy_head(fitted: tuple[Path, dict[str, Any], Path]) -> None:
    """score = (anomaly - centre) / spread + weight * (logit - centre) / spread, logit from the pooled patches."""
    bundle_dir, _, root = fitted
    bundle = load_bundle(bundle_dir)
    head = bundle.manifest.metadata["fit"]["defect_head"]
    model = onnx.load(str(bundle.onnx_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    photo = root / "defects" / "scratch" / "03.png"
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    score, _, anomaly, evidence = session.run(None, {"pixels": to_pixels(photo)[None]})
    assert float(score[0]) == pytest.approx(
        (float(anomaly[0]) - head["anomaly_center"]) / head["anomaly_scale"] + float(evidence[0]), abs=2e-3)
    # the head reads per scale the mean then the max of the 3x3-averaged patches: recompute it from them
    from edge_agent.toolchain.anomaly_fit import _session, extract_patches, feature_graph

    scales = bundle.manifest.metadata["fit"]["scales"]
    patches = extract_patches(_session(feature_graph(BACKBONE), 1), [photo], scales, batch=1)
    logit = float(pooled_features(patches)[0].astype(np.float64) @ inits["dh_w"][:, 0] + inits["dh_b"][0])
    assert logit == pytest.approx(float(evidence[0]), rel=1e-3, abs=1e-3)


def test_fused_model_rejects_scratches_passes_good_parts_and_maps_them(
    fitted: tuple[Path, dict[str, Any], Path],
) -> None:
    bundle_dir, _, _ = fitted
    model = Model.load(load_bundle(bundle_dir))
    bad = model.predict_bytes(_png(_part(900, defect=True)))
    score = bad.predictions[0]
    assert isinstance(score, AnomalyScore) and score.is_anomalous
    assert score.regions  # boxes from the anomaly map, at the region level
    good = model.predict_bytes(_png(_part(901))).predictions[0]
    assert isinstance(good, AnomalyScore) and not good.is_anomalous and good.regions == ()
    # the event's heat map is drawn against the map's own level, not the fused score's threshold
    region = load_bundle(bundle_dir).manifest.thresholds.region
    verdict = inspection_verdict(bad, InspectionRules(heatmap="failed"))
    assert verdict["verdict"] == "fail" and verdict["heatmap"]["threshold"] == pytest.approx(region, abs=1e-5)
    assert verdict["score"] == pytest.approx(score.score, abs=1e-5) and region != pytest.approx(score.threshold)


def _png(pixels: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_region_level() -> None:
    heat = np.zeros((4, 4), np.float32)
    heat[1, 1] = 2.0
    assert region_level(heat, 5.0, None) == 5.0  # plain bundles: the threshold
    assert region_level(heat, 5.0, 1.0) == 1.0  # the map crosses the region level
    assert region_level(heat, 5.0, 3.0) == pytest.approx(1.0)  # it does not: halfway from the median to the peak


def test_refits_need_the_defect_photos(tmp_path: Path, fitted: tuple[Path, dict[str, Any], Path]) -> None:
    bundle_dir, report, root = fitted
    bundle = load_bundle(bundle_dir)
    copy = tmp_path / "copy.onnx"
    shutil.copyfile(bundle.onnx_path, copy)
    with pytest.raises(ManifestError, match="defect head"):
        refit_banks(copy, root / "good", bundle.manifest.metadata)
    same = refit_banks(copy, root / "good", bundle.manifest.metadata, defect_dir=root / "defects")
    assert same["threshold"] == pytest.approx(report["threshold"], rel=1e-4, abs=1e-4)  # same graph, same photos
    assert same["region"] == pytest.approx(bundle.manifest.thresholds.region, rel=1e-4, abs=1e-4)


def test_extending_the_banks_keeps_the_head_and_scores_as_the_graph(
    tmp_path: Path, fitted: tuple[Path, dict[str, Any], Path]
) -> None:
    """`inspect fit --add DIR --base B` on a bundle with a defect head: the report's scores are the fused ones."""
    from edge_agent.toolchain.anomaly_fit import bundle_scores
    from edge_agent.toolchain.anomaly_refit import add_good_parts

    bundle_dir, _, root = fitted
    added = tmp_path / "added"
    added.mkdir()
    for i in range(3):
        Image.fromarray(_part(700 + i)).save(added / f"{i}.png")
    out = add_good_parts(bundle_dir, added, tmp_path / "ext", threads=1, defects_dir=root / "defects" / "scratch")
    paths = sorted(added.iterdir())
    before = bundle_scores(load_bundle(bundle_dir).onnx_path, paths, 1)
    after = bundle_scores(load_bundle(tmp_path / "ext").onnx_path, paths, 1)
    assert out["added_before"]["median_score"] == pytest.approx(float(np.median(before)), abs=2e-3)
    assert out["added_in_bank"]["median_score"] == pytest.approx(float(np.median(after)), abs=2e-3)
    assert (after <= before + 1e-4).all()  # a bank that only grows can only lower the scores
    region = load_bundle(bundle_dir).manifest.thresholds.region
    assert region is not None and load_bundle(tmp_path / "ext").manifest.thresholds.region == region


def test_cli_fit_with_defects(tmp_path: Path, fitted: tuple[Path, dict[str, Any], Path]) -> None:
    _, _, root = fitted
    result = CliRunner().invoke(app, ["inspect", "fit", str(root / "good"), "--defects", str(root / "defects"),
                                      "--out", "cli_d", "--out-dir", str(tmp_path / "b"), "--folds", "3",
                                      "--coreset", "0.5", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "defect head from 12 defect photos" in result.output
    assert load_bundle(tmp_path / "b").manifest.thresholds.region is not None
