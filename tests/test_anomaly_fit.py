"""toolchain.anomaly_fit / `edge-agent inspect fit`: a multi-scale PatchCore bundle from ~10 photos of good parts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image
from typer.testing import CliRunner

from edge_agent.bundles.bundle import load_bundle
from edge_agent.cli import app
from edge_agent.errors import InputNotFoundError, ManifestError
from edge_agent.toolchain.anomaly_fit import (
    MAP,
    FitConfig,
    backbone_core,
    default_backbone,
    extract_patches,
    feature_graph,
    fit_bundle,
    fold_ids,
    fold_uint8_input,
    greedy_coreset,
    nearest_distances,
    run_tail,
    threshold_at,
    to_pixels,
)
from edge_agent.toolchain.evaluate import evaluate
from edge_agent.types import AnomalyScore
from edge_agent.vision.model import Model
from edge_agent.vision.runtime import OrtRuntime

BACKBONE = default_backbone()  # the shipped tile_anomaly bundle doubles as the feature extractor


def _part(seed: int, defect: bool = False) -> np.ndarray:
    """A grey 'part': smooth vertical gradient + fine noise; a defect is a dark scratch across it."""
    rng = np.random.default_rng(seed)
    base = np.linspace(110, 150, 96)[:, None] * np.ones((1, 96))
    img = np.clip(base + rng.normal(0, 4, (96, 96)), 0, 255)
    if defect:
        img[40:56, 10:86] = 20
    return np.repeat(img[:, :, None], 3, axis=2).astype(np.uint8)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Path]:
    root = tmp_path_factory.mktemp("fit")
    good = root / "good"
    good.mkdir()
    for i in range(10):
        Image.fromarray(_part(i)).save(good / f"good_{i:02d}.png")
    line = root / "line"
    (line / "test" / "good").mkdir(parents=True)
    (line / "test" / "scratch").mkdir(parents=True)
    (line / "ground_truth" / "scratch").mkdir(parents=True)
    mask = np.zeros((96, 96), np.uint8)
    mask[40:56, 10:86] = 255
    for i in range(3):
        Image.fromarray(_part(100 + i)).save(line / "test" / "good" / f"{i}.png")
        Image.fromarray(_part(200 + i, defect=True)).save(line / "test" / "scratch" / f"{i}.png")
        Image.fromarray(mask).save(line / "ground_truth" / "scratch" / f"{i}_mask.png")
    config = FitConfig(coreset_fraction=0.5, min_bank=16, folds=5, max_false_reject=0.0)
    report = fit_bundle(good, root / "bundle", "line_a", config, backbone=BACKBONE)
    return root / "bundle", report, line


def test_fit_writes_a_valid_bundle_with_threshold(fitted: tuple[Path, dict[str, Any], Path]) -> None:
    bundle_dir, report, _ = fitted
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    assert m.task == "anomaly" and m.name == "line_a"
    assert report["n_fit"] == 10 and report["folds"] == 5  # every photo in the bank, 5-fold threshold
    assert m.thresholds.anomaly == pytest.approx(report["threshold"], rel=1e-5)
    assert report["cv_false_reject"] == 0.0  # the target it was fitted for, on out-of-bank scores
    fit = m.metadata["fit"]
    assert fit["scales"] == [128, 160, 192] and set(fit["bank_size"]) == {"128", "160", "192"}
    # coreset half of each scale's patches: 10 photos x (4x4, 5x5, 6x6)
    assert fit["bank_size"] == {"128": 80, "160": 125, "192": 180}
    assert m.input.width == m.input.height == 192


def test_fitted_model_flags_the_defect_and_maps_it(fitted: tuple[Path, dict[str, Any], Path]) -> None:
    bundle_dir, _, line = fitted
    model = Model.load(load_bundle(bundle_dir))
    report = evaluate(model, line)
    assert report["image_auroc"] == 1.0
    assert report["recall"] == 1.0 and report["false_reject"] == 0.0
    assert report["recall_at_false_reject"] == {"1%": 1.0, "5%": 1.0, "10%": 1.0}
    assert report["per_type"]["scratch"]["n"] == 3
    assert report["pixel_auroc"] > 0.8  # the ground_truth masks are read and the map points at the scratch
    result = model.predict_bytes((line / "test" / "scratch" / "0.png").read_bytes())
    score = result.predictions[0]
    assert isinstance(score, AnomalyScore) and score.is_anomalous
    assert score.heatmap is not None and score.heatmap.shape == (MAP, MAP)
    assert score.score == pytest.approx(float(score.heatmap.max()), rel=1e-5)  # the score is the map's maximum
    rows = score.heatmap.max(axis=1)
    assert 0.3 * MAP <= int(np.argmax(rows)) <= 0.7 * MAP  # the scratch sits in the middle rows
    (region, *_) = score.regions  # boxes in original-image pixels (96 x 96 here)
    x1, y1, x2, y2 = region.box
    assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96
    assert y1 < 56 and y2 > 40 and x1 < 86 and x2 > 10  # overlaps the scratch
    assert region.score == pytest.approx(score.score, rel=1e-5)
    good = model.predict_bytes((line / "test" / "good" / "0.png").read_bytes()).predictions[0]
    assert isinstance(good, AnomalyScore) and not good.is_anomalous and good.regions == ()


def test_graph_scores_match_the_numpy_path_used_for_the_threshold(
    fitted: tuple[Path, dict[str, Any], Path],
) -> None:
    """The threshold is set from numpy distances + the ONNX tail; the shipped graph must score the same way."""
    bundle_dir, _, line = fitted
    bundle = load_bundle(bundle_dir)
    graph = onnx.load(str(bundle.onnx_path))
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    scales = bundle.manifest.metadata["fit"]["scales"]
    stats = [(v["mean"], v["sd"]) for v in (bundle.manifest.metadata["fit"]["scale_stats"][str(s)] for s in scales)]
    photo = line / "test" / "scratch" / "1.png"
    from edge_agent.toolchain.anomaly_fit import _session

    patches = extract_patches(_session(feature_graph(bundle.onnx_path), 1), [photo], scales, batch=1)
    dists = {}
    for s in scales:
        bank = (inits[f"s{s}/pc_bank_t2"] / -2.0).T
        g = s // 32
        dists[s] = nearest_distances(patches[s], np.ascontiguousarray(bank, np.float32)).reshape(1, g, g)
    maps, scores = run_tail(dists, stats)
    result = Model.load(bundle).predict_bytes(photo.read_bytes()).predictions[0]
    assert isinstance(result, AnomalyScore) and result.heatmap is not None
    assert float(scores[0]) == pytest.approx(result.score, rel=2e-3, abs=2e-3)
    assert np.allclose(maps[0], result.heatmap, atol=5e-3)


def test_cli_fit_json(tmp_path: Path, fitted: tuple[Path, dict[str, Any], Path]) -> None:
    bundle_dir, _, _ = fitted
    good = tmp_path / "good"
    good.mkdir()
    for i in range(6):
        Image.fromarray(_part(50 + i)).save(good / f"{i}.png")
    result = CliRunner().invoke(
        app, ["inspect", "fit", str(good), "--out", "line_b", "--models-dir", str(tmp_path / "models"),
              "--backbone", str(bundle_dir / "line_a.onnx"),  # a fitted bundle works as backbone too
              "--max-false-reject", "0.2", "--folds", "3", "--json"],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert doc["name"] == "line_b" and doc["n_fit"] == 6 and doc["folds"] == 3
    assert doc["max_false_reject"] == 0.2 and doc["cv_false_reject"] <= 0.2
    manifest = load_bundle(tmp_path / "models" / "line_b").manifest
    assert manifest.task == "anomaly" and manifest.metadata["fit"]["max_false_reject"] == 0.2


def test_cli_fit_refuses_a_bad_rate(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", "fit", str(tmp_path), "--out", "x", "--max-false-reject", "1.5"])
    assert result.exit_code != 0 and "max-false-reject" in result.output


def test_fit_needs_photos(tmp_path: Path) -> None:
    (tmp_path / "few").mkdir()
    with pytest.raises(InputNotFoundError):
        fit_bundle(tmp_path / "few", tmp_path / "out", "x", backbone=BACKBONE)


def test_backbone_must_be_efficientnet_lite(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["input"], ["y"])], "g",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(g), str(path))
    with pytest.raises(ManifestError, match="not an EfficientNet-Lite0 export"):
        feature_graph(path)


def test_older_single_scale_bundles_still_serve_as_backbone(
    tmp_path: Path, fitted: tuple[Path, dict[str, Any], Path]
) -> None:
    """A bundle of the first format (uint8 pixels -> (x-127)/128 -> one backbone) gives the same features."""
    from onnx import TensorProto, helper

    bundle_dir, _, line = fitted
    nodes, inits = backbone_core(onnx.load(str(bundle_dir / "line_a.onnx")))
    outputs = [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in (nodes[-1].output[0],)]
    old = helper.make_model(helper.make_graph(nodes, "old", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, ["N", 3, 224, 224])], outputs, inits), opset_imports=[helper.make_opsetid("", 13)])
    fold_uint8_input(old, 224)
    path = tmp_path / "old.onnx"
    onnx.save(old, str(path))
    from edge_agent.toolchain.anomaly_fit import _session

    photo = [line / "test" / "good" / "0.png"]
    a = extract_patches(_session(feature_graph(path), 1), photo, (160,), 1)
    b = extract_patches(_session(feature_graph(bundle_dir / "line_a.onnx"), 1), photo, (160,), 1)
    assert np.array_equal(a[160], b[160])


def test_to_pixels_is_the_bundle_input(fitted: tuple[Path, dict[str, Any], Path]) -> None:
    _, _, line = fitted
    px = to_pixels(line / "test" / "good" / "0.png")
    assert px.shape == (3, 192, 192) and px.dtype == np.uint8


def test_greedy_coreset_covers_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0] * 8, [10.0] * 8, [-10.0] * 8], np.float32)
    x = np.concatenate([c + rng.normal(0, 0.1, (50, 8)) for c in centres]).astype(np.float32)
    chosen = greedy_coreset(x, 3, projection_dim=8, seed=1)
    assert sorted({i // 50 for i in chosen}) == [0, 1, 2]  # one point from each cluster
    assert greedy_coreset(x[:2], 5, 8, 0) == [0, 1]


def test_folds_are_interleaved_and_deterministic() -> None:
    assert fold_ids(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert fold_ids(3, 10).tolist() == [0, 1, 2]  # never more folds than photos


@pytest.mark.parametrize(("rate", "expected", "rejected"), [(0.0, 20.0, 0), (0.05, 19.0, 1), (0.1, 18.0, 2),
                                                             (0.12, 18.0, 2)])
def test_threshold_rejects_at_most_the_target_share(rate: float, expected: float, rejected: int) -> None:
    scores = np.arange(1.0, 21.0)  # 20 good photos scoring 1..20
    th = threshold_at(scores, rate)
    assert th == expected and int((scores > th).sum()) == rejected


def test_fit_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="max_false_reject"):
        FitConfig(max_false_reject=1.0)
    with pytest.raises(ValueError, match="folds"):
        FitConfig(folds=1)
    with pytest.raises(ValueError, match="scales"):
        FitConfig(scales=(100,))


def test_refit_rebuilds_banks_and_threshold_from_the_graphs_own_features(
    tmp_path: Path, fitted: tuple[Path, dict[str, Any], Path]
) -> None:
    """What the INT8 gate does after quantizing: banks from the quantized graph's features, threshold re-derived."""
    import shutil

    from edge_agent.toolchain.anomaly_fit import fitted_here, refit_banks

    bundle_dir, report, line = fitted
    bundle = load_bundle(bundle_dir)
    assert fitted_here(bundle.manifest.metadata)
    copy = tmp_path / "copy.onnx"
    shutil.copyfile(bundle.onnx_path, copy)
    same = refit_banks(copy, bundle_dir.parent / "good", bundle.manifest.metadata)
    assert same["threshold"] == pytest.approx(report["threshold"], rel=1e-5)  # same graph, same photos: same fit
    assert same["fit"]["scale_stats"] == bundle.manifest.metadata["fit"]["scale_stats"]
    six = tmp_path / "six"
    six.mkdir()
    for i in range(6):
        Image.fromarray(_part(300 + i)).save(six / f"{i}.png")
    other = refit_banks(copy, six, bundle.manifest.metadata)
    assert other["fit"]["n_fit"] == 6 and other["fit"]["folds"] == 5
    assert other["threshold"] != pytest.approx(report["threshold"], rel=1e-5)
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(copy)).graph.initializer}
    assert weights["s128/pc_bank_t2"].shape == (512, 48)  # half of 6 photos x 16 patches
    refitted = Model(bundle.manifest.model_copy(update={"thresholds": bundle.manifest.thresholds.model_copy(
        update={"anomaly": other["threshold"]})}), OrtRuntime(copy))
    scratch = (line / "test" / "scratch" / "0.png").read_bytes()
    assert refitted.predict_bytes(scratch).predictions[0].label == "anomalous"
    with pytest.raises(ManifestError, match="not a bundle made by inspect fit"):
        refit_banks(copy, six, {})
