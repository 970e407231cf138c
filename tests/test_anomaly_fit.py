"""toolchain.anomaly_fit / `edge-agent inspect fit`: a PatchCore-style bundle from ~10 photos of good parts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edge_agent.bundles.bundle import load_bundle
from edge_agent.cli import app
from edge_agent.errors import InputNotFoundError
from edge_agent.toolchain.anomaly_fit import FitConfig, default_backbone, fit_bundle, greedy_coreset, split_holdout
from edge_agent.toolchain.evaluate import evaluate
from edge_agent.types import AnomalyScore
from edge_agent.vision.model import Model

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
    test = root / "line" / "test"
    (test / "good").mkdir(parents=True)
    (test / "scratch").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(_part(100 + i)).save(test / "good" / f"{i}.png")
        Image.fromarray(_part(200 + i, defect=True)).save(test / "scratch" / f"{i}.png")
    report = fit_bundle(good, root / "bundle", "line_a", FitConfig(coreset_fraction=0.5), backbone=BACKBONE)
    return root / "bundle", report, root / "line"


def test_fit_writes_a_valid_bundle_with_threshold(fitted: tuple[Path, dict[str, Any], Path]) -> None:
    bundle_dir, report, _ = fitted
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    assert m.task == "anomaly" and m.name == "line_a"
    assert report["n_fit"] == 8 and report["n_threshold"] == 2
    assert m.thresholds.anomaly == pytest.approx(report["threshold"], rel=1e-5)
    assert 0 < int(report["bank_size"]) <= 8 * 49


def test_fitted_model_flags_the_defect_and_maps_it(fitted: tuple[Path, dict[str, Any], Path]) -> None:
    bundle_dir, _, line = fitted
    model = Model.load(load_bundle(bundle_dir))
    report = evaluate(model, line)
    assert report["image_auroc"] == 1.0
    result = model.predict_bytes((line / "test" / "scratch" / "0.png").read_bytes())
    score = result.predictions[0]
    assert isinstance(score, AnomalyScore) and score.is_anomalous
    assert score.heatmap is not None and score.heatmap.shape == (7, 7)
    rows = score.heatmap.max(axis=1)
    assert 2 <= int(np.argmax(rows)) <= 4  # the scratch sits in the middle rows


def test_cli_fit_json(tmp_path: Path, fitted: tuple[Path, dict[str, Any], Path]) -> None:
    bundle_dir, _, _ = fitted
    good = tmp_path / "good"
    good.mkdir()
    for i in range(6):
        Image.fromarray(_part(50 + i)).save(good / f"{i}.png")
    result = CliRunner().invoke(
        app, ["inspect", "fit", str(good), "--out", "line_b", "--models-dir", str(tmp_path / "models"),
              "--backbone", str(bundle_dir / "line_a.onnx"), "--json"],  # a fitted bundle works as backbone too
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert doc["name"] == "line_b" and doc["n_fit"] + doc["n_threshold"] == 6
    assert load_bundle(tmp_path / "models" / "line_b").manifest.task == "anomaly"


def test_fit_needs_photos(tmp_path: Path) -> None:
    (tmp_path / "few").mkdir()
    with pytest.raises(InputNotFoundError):
        fit_bundle(tmp_path / "few", tmp_path / "out", "x", backbone=BACKBONE)


def test_greedy_coreset_covers_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0] * 8, [10.0] * 8, [-10.0] * 8], np.float32)
    x = np.concatenate([c + rng.normal(0, 0.1, (50, 8)) for c in centres]).astype(np.float32)
    chosen = greedy_coreset(x, 3, projection_dim=8, seed=1)
    assert sorted({i // 50 for i in chosen}) == [0, 1, 2]  # one point from each cluster
    assert greedy_coreset(x[:2], 5, 8, 0) == [0, 1]


def test_split_holdout_is_deterministic() -> None:
    paths = [Path(f"{i}.png") for i in range(10)]
    fit, held = split_holdout(paths, 0.2)
    assert held == [Path("4.png"), Path("9.png")] and len(fit) == 8
    assert split_holdout(paths, 0.0) == (paths, [])
