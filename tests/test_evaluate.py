"""edge_agent.toolchain.evaluate: pure metrics and folder evaluation, and the `edge-agent eval` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edge_agent.bundles.bundle import load_bundle
from edge_agent.cli import app
from edge_agent.errors import InputNotFoundError
from edge_agent.toolchain.evaluate import (
    average_precision,
    best_f1_threshold,
    classification_metrics,
    evaluate,
    list_anomaly,
    match_detections,
    operating_points,
    public,
    read_yolo_labels,
    recall_precision,
    roc_auc,
    threshold_for_false_reject,
)
from edge_agent.vision.model import Model
from tests.support.color_models import write_bundle, write_images


def test_classification_metrics_counts_and_confusion() -> None:
    m = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert m["accuracy"] == 0.75
    assert m["confusion"] == {"labels": ["a", "b"], "matrix": [[1, 1], [0, 2]]}
    assert m["per_class"]["a"] == {"n": 2, "correct": 1, "recall": 0.5, "precision": 1.0}
    assert m["per_class"]["b"]["precision"] == round(2 / 3, 4)


def test_roc_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    positive = rng.random(40) > 0.5
    pairs = [(p, n) for p in scores[positive] for n in scores[~positive]]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert roc_auc(scores, positive.tolist()) == pytest.approx(expected)
    assert roc_auc([0.1, 0.9], [False, True]) == 1.0
    with pytest.raises(ValueError):
        roc_auc([0.1, 0.2], [True, True])


def test_average_precision() -> None:
    truths = {0: [(0.0, 0.0, 10.0, 10.0)], 1: [(0.0, 0.0, 10.0, 10.0)]}
    perfect = [(0, 0.9, (0.0, 0.0, 10.0, 10.0)), (1, 0.8, (1.0, 1.0, 10.0, 10.0))]
    assert average_precision(perfect, truths) == pytest.approx(1.0)
    # a confident false positive first, then the two hits: precision 1/2 then 2/3 at recall 0.5 and 1;
    # interpolation takes the best precision at any higher recall, so both halves count 2/3
    with_fp = [(0, 0.95, (50.0, 50.0, 60.0, 60.0)), *perfect]
    assert average_precision(with_fp, truths) == pytest.approx(2 / 3)
    # a miss (second truth never found) halves the reachable recall
    assert average_precision(perfect[:1], truths) == pytest.approx(0.5)
    assert average_precision([], truths) == 0.0


def test_recall_precision_at_a_threshold_and_the_best_f1_one() -> None:
    truths = {0: [(0.0, 0.0, 10.0, 10.0), (20.0, 0.0, 30.0, 10.0)], 1: [(0.0, 0.0, 10.0, 10.0)]}
    dets = [
        (0, 0.9, (0.0, 0.0, 10.0, 10.0)),  # hit
        (0, 0.8, (0.0, 0.0, 10.0, 10.0)),  # duplicate of a found truth: a false positive
        (1, 0.6, (1.0, 1.0, 10.0, 10.0)),  # hit
        (0, 0.2, (20.0, 0.0, 30.0, 10.0)),  # hit, low score
    ]
    matches = match_detections(dets, truths)
    assert matches == [(0.9, True), (0.8, False), (0.6, True), (0.2, True)]
    at = recall_precision(matches, 3, 0.5)
    assert (at["found"], at["false_positives"], at["recall"], at["precision"]) == (2, 1, 0.6667, 0.6667)
    assert recall_precision(matches, 3, 0.1)["recall"] == 1.0
    # F1 by cut: 0.9 -> 2/4, 0.8 -> 2/5, 0.6 -> 4/6, 0.2 -> 6/7: the last
    assert best_f1_threshold(matches, 3) == 0.2
    assert best_f1_threshold(matches[:3], 3) == 0.6


def test_read_yolo_labels(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("0 0.5 0.5 0.2 0.4\nbad line\n")
    assert read_yolo_labels(f, 100, 50) == [(0, (40.0, 15.0, 60.0, 35.0))]
    assert read_yolo_labels(tmp_path / "missing.txt", 10, 10) == []


def test_list_anomaly_needs_good_and_defects(tmp_path: Path) -> None:
    (tmp_path / "test" / "good").mkdir(parents=True)
    (tmp_path / "test" / "good" / "a.png").write_bytes(b"x")
    with pytest.raises(InputNotFoundError):
        list_anomaly(tmp_path)
    (tmp_path / "test" / "crack").mkdir()
    (tmp_path / "test" / "crack" / "b.png").write_bytes(b"x")
    assert [a for _, a in list_anomaly(tmp_path)] == [True, False]


def test_evaluate_classification_aliases_and_off_domain(tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "m"))
    data = write_images(tmp_path / "data")
    report = evaluate(Model.load(bundle), data)
    assert report["n"] == 18 and report["n_in_domain"] == 16
    assert report["accuracy"] == 1.0
    assert report["per_class"]["red"]["n"] == 8  # 'rouge' folder counted as red through label_aliases
    assert report["rejected"] == 0.0
    assert report["off_domain_rejected"] == 1.0
    assert report["per_class"]["grey"] == {"n": 2, "off_domain": True, "rejected": 1.0, "unsure": 0.0}
    # no open_set section: rejected = unknown, everything else known
    assert report["bands"] == {"known": 16, "unsure": 0, "unknown": 0} and report["top1_with_rejections"] == 1.0
    assert report["off_domain_bands"] == {"known": 0, "unsure": 0, "unknown": 2}
    json.dumps(public(report))  # JSON-ready


def test_eval_cli_json_and_plot(tmp_path: Path) -> None:
    write_bundle(tmp_path / "models" / "colors")
    data = write_images(tmp_path / "data")
    plot = tmp_path / "confusion.png"
    result = CliRunner().invoke(
        app, ["eval", "--model", "colors", "--models-dir", str(tmp_path / "models"), str(data), "--json",
              "--plot", str(plot)]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert doc["model"] == "colors" and doc["accuracy"] == 1.0 and doc["n"] == 18
    assert set(doc) >= {"accuracy", "per_class", "confusion", "n", "model"}
    assert plot.stat().st_size > 1000


def test_eval_cli_missing_folder_is_one_clear_error(tmp_path: Path) -> None:
    write_bundle(tmp_path / "models" / "colors")
    result = CliRunner().invoke(
        app, ["eval", "--model", "colors", "--models-dir", str(tmp_path / "models"), str(tmp_path / "nope")]
    )
    assert result.exit_code == 2
    assert "input_not_found" in result.output


def test_parse_class_map() -> None:
    import typer

    from edge_agent.cli.models import _parse_class_map

    assert _parse_class_map(["0=cow", "2 = horse"]) == {0: "cow", 2: "horse"}
    with pytest.raises(typer.BadParameter):
        _parse_class_map(["cow"])


def test_operating_points_at_the_shipped_threshold_and_at_false_reject_rates() -> None:
    good = np.arange(100, dtype=float)  # 0..99
    bad = np.array([99.5, 98.5, 97.5, 94.5, 89.5, 50.0, 10.0, 0.5])
    out = operating_points(good, bad, threshold=95.0)
    assert out["false_reject"] == 0.04 and out["recall"] == 3 / 8  # 96..99 rejected; 99.5, 98.5, 97.5 caught
    # 1%: threshold 98 (only 99 rejected) -> 99.5, 98.5; 5%: 94 -> + 97.5, 94.5; 10%: 89 -> + 89.5
    assert out["recall_at_false_reject"] == {"1%": 0.25, "5%": 0.5, "10%": 0.625}
    assert threshold_for_false_reject(good, 0.0) == 99.0
    assert threshold_for_false_reject([3.0, 1.0, 2.0], 0.5) == 2.0  # one of three may be rejected


def test_roc_auc_scales_to_pixel_counts() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random(2_000_000) < 0.05
    scores = np.round(rng.normal(truth * 1.0, 1.0), 1)  # heavy ties, as in heat maps
    from math import erf

    # binormal: positives shifted by one sd -> AUROC = Phi(1 / sqrt(2)) = (1 + erf(1/2)) / 2 = 0.760
    assert roc_auc(scores, truth) == pytest.approx(0.5 * (1 + erf(0.5)), abs=0.005)
