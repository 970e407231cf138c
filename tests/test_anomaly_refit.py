"""`edge-agent inspect fit --add`: a fitted anomaly bundle learns the good parts it rejected (operator feedback).

Synthetic parts (as in test_anomaly_fit): the bundle is fitted on plain parts; a new batch of good parts with a
brushed finish (fine vertical stripes) is rejected by it, as a line would see after a material change. Adding six
of them (as the feedback store files them) must make *other* brushed parts pass, keep the threshold, and still
catch the scratched parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image
from typer.testing import CliRunner

from edge_agent.bundles.bundle import load_bundle
from edge_agent.cli import app
from edge_agent.errors import InputNotFoundError, ManifestError
from edge_agent.toolchain.anomaly_fit import FitConfig, default_backbone, fit_bundle
from edge_agent.toolchain.anomaly_refit import add_good_parts, added_images, extend_bank, next_version
from edge_agent.vision.model import Model
from edge_agent.vision.runtime import OrtRuntime


def _part(seed: int, defect: bool = False, brushed: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(110, 150, 96)[:, None] * np.ones((1, 96))
    if brushed:
        base = base + 18 * np.sin(np.arange(96)[None, :] / 2.0)
    img = np.clip(base + rng.normal(0, 4, (96, 96)), 0, 255)
    if defect:
        img[40:56, 10:86] = 20
    return np.repeat(img[:, :, None], 3, axis=2).astype(np.uint8)


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("refit")
    for d in ("good", "feedback/line1/false_reject", "feedback/line1/missed_defect", "brushed", "defects"):
        (root / d).mkdir(parents=True)
    for i in range(10):
        Image.fromarray(_part(i)).save(root / "good" / f"g{i}.png")
    fr = root / "feedback" / "line1" / "false_reject"
    for i in range(6):  # as the feedback store files them: image + sidecar
        Image.fromarray(_part(400 + i, brushed=True)).save(fr / f"r{i}.png")
        (fr / f"r{i}.json").write_text(json.dumps({"kind": "false_reject", "result_id": f"r{i}"}))
    Image.fromarray(_part(900, defect=True)).save(root / "feedback" / "line1" / "missed_defect" / "m0.png")
    for i in range(4):
        Image.fromarray(_part(500 + i, brushed=True)).save(root / "brushed" / f"b{i}.png")
    for i in range(3):
        Image.fromarray(_part(200 + i, defect=True)).save(root / "defects" / f"d{i}.png")
    config = FitConfig(coreset_fraction=0.5, min_bank=16, folds=5, max_false_reject=0.0)
    fit_bundle(root / "good", root / "models" / "line_a", "line_a", config, backbone=default_backbone())
    return root


def _scores(bundle_dir: Path, *folders: Path) -> list[list[float]]:
    """What the agent says: each folder's photos scored by the bundle's model."""
    bundle = load_bundle(bundle_dir)
    model = Model(bundle.manifest, OrtRuntime(bundle.onnx_path))
    return [[model.predict_bytes(p.read_bytes()).predictions[0].score for p in sorted(f.glob("*.png"))]
            for f in folders]


def test_added_false_rejects_teach_the_bundle_and_defects_are_still_caught(line: Path, tmp_path: Path) -> None:
    base = line / "models" / "line_a"
    threshold = load_bundle(base).manifest.thresholds.anomaly
    assert threshold is not None
    assert min(_scores(base, line / "brushed")[0]) > threshold  # the brushed batch: all rejected before
    report = add_good_parts(base, line / "feedback" / "line1", tmp_path / "line_a2", defects_dir=line / "defects")
    assert report["added"] == 6 and len(report["skipped"]) == 1  # the missed_defect photo is never added
    assert report["added_before"]["passing"] == 0
    assert report["added_out_of_fold"] == {**report["added_out_of_fold"], "passing": 6, "of": 6, "folds": 5}
    assert report["added_in_bank"]["passing"] == 6
    assert report["threshold"] == report["threshold_before"] == threshold  # kept: no original photos here
    assert report["defects"] == {"of": 3, "caught_before": 3, "caught_after": 3}
    assert all(report["bank_size"][s] > report["bank_size_before"][s] for s in report["bank_size"])
    new = load_bundle(tmp_path / "line_a2")
    assert new.manifest.version == "2.0.0.1" and new.manifest.name == "line_a"
    assert new.manifest.thresholds.anomaly == threshold
    assert new.manifest.metadata["fit"]["added"][0]["photos"] == 6
    # what the agent will run: brushed parts it never saw now pass, scratches and plain parts as before
    brushed, defects, good = _scores(tmp_path / "line_a2", line / "brushed", line / "defects", line / "good")
    assert max(brushed) < threshold and min(defects) > threshold and max(good) <= threshold
    # the numpy path that made the report is the graph's: out-of-bank scores match the model's
    bank = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(new.onnx_path)).graph.initializer}
    assert bank["s192/pc_bank_t2"].shape[1] == report["bank_size"]["192"]


def test_cli_add_writes_the_next_version_beside_the_base(line: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", "fit", "--add", str(line / "brushed"), "--base", "line_a",
                              "--models-dir", str(line / "models"),
                              "--defects", str(line / "feedback" / "line1" / "missed_defect")])  # never skipped here
    assert res.exit_code == 0, res.output
    assert "line_a 2.0.0.1 (from 2.0.0), 4 good parts added" in " ".join(res.output.split())
    assert "out of fold (4 folds" in res.output and "unchanged" in res.output
    assert "known defects caught: 1/1 before, 1/1 after" in res.output
    assert load_bundle(line / "models" / "line_a-2.0.0.1").manifest.version == "2.0.0.1"
    assert runner.invoke(app, ["inspect", "fit", "--add", str(line / "brushed")]).exit_code == 2  # no base


def test_cli_refit_with_the_original_photos(line: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, [
        "inspect", "fit", str(line / "good"), "--add", str(line / "feedback" / "line1"), "--out", "line_b",
        "--out-dir", str(tmp_path / "line_b"), "--base", str(line / "models" / "line_a"), "--folds", "4",
        "--coreset", "0.5", "--max-false-reject", "0", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.splitlines()[-1])
    assert report["mode"] == "refit" and report["n_fit"] == 16 and report["added"] == 6
    assert report["added_before"]["passing"] == 0 and report["added_in_bank"]["passing"] == 6
    assert isinstance(report["threshold_before"], float)
    threshold = load_bundle(tmp_path / "line_b").manifest.thresholds.anomaly
    assert threshold is not None and max(_scores(tmp_path / "line_b", line / "brushed")[0]) < threshold


def test_refusals(line: Path, tmp_path: Path) -> None:
    base = line / "models" / "line_a"
    with pytest.raises(InputNotFoundError, match="base bundle itself"):
        add_good_parts(base, line / "brushed", base)
    with pytest.raises(InputNotFoundError, match="no photos of good parts"):
        add_good_parts(base, line / "feedback" / "line1" / "missed_defect", tmp_path / "x")
    other = tmp_path / "plain"
    other.mkdir()
    (other / "manifest.json").write_text(load_bundle(base).manifest.model_copy(
        update={"metadata": {}}).model_dump_json())
    (other / "line_a.onnx").write_bytes(load_bundle(base).onnx_path.read_bytes())
    with pytest.raises(ManifestError, match="not an anomaly bundle made by inspect fit"):
        add_good_parts(other, line / "brushed", tmp_path / "y")


def test_added_images_skip_missed_defects_by_folder_and_by_sidecar(tmp_path: Path) -> None:
    for rel in ("a.png", "missed_defect/b.png", "x/c.jpg", "x/d.jpg", ".hidden.png", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"img")
    (tmp_path / "x" / "d.json").write_text(json.dumps({"kind": "missed_defect"}))
    take, skip = added_images(tmp_path)
    assert [p.name for p in take] == ["a.png", "c.jpg"] and sorted(p.name for p in skip) == ["b.png", "d.jpg"]


def test_extend_bank_takes_the_farthest_new_patches_first() -> None:
    bank = np.zeros((4, 2), np.float32)
    new = np.array([[[0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [-3.0, 0.0]]], np.float32)
    out = extend_bank(bank, new, 2)
    assert out.shape == (6, 2)
    picked = sorted((round(float(x), 1), round(float(y), 1)) for x, y in out[4:])
    assert picked == [(-3.0, 0.0), (5.1, 5.0)]  # 5.0/5.0 is next to 5.1/5.0 once that is in: not worth a row


@pytest.mark.parametrize(("given", "expected"), [("2.0.0", "2.0.0.1"), ("1", "1.0.0.1"), ("2.0.0.4", "2.0.0.5"),
                                                 ("beta", "1.0.0.1")])
def test_next_version(given: str, expected: str) -> None:
    assert next_version(given) == expected
