"""toolchain.detect_fit / `edge-agent detect fit`: a detector fitted to one camera from its own labelled frames.

The frames are synthetic (made here, no licence needed): brown "animals" (ellipses with a pale back stripe) walking
down a grey chute seen from above, a few per frame, in time order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edge_agent.bundles.bundle import find_bundle, load_bundle
from edge_agent.cli import app
from edge_agent.errors import DatasetError, InputNotFoundError
from edge_agent.toolchain.detect_fit import (
    find_yolox_head,
    parse_label_file,
    read_frames,
    temporal_split,
    write_graph,
)
from edge_agent.toolchain.evaluate import detection_report, list_detection
from edge_agent.types import Detection
from edge_agent.vision.model import Model

from .conftest import COCO_DEMO, MODELS

W, H = 160, 256


def _frame(t: int, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[float, float, float, float]]]:
    """One chute frame at time ``t``: animals move down 12 px a frame; returns RGB pixels and x1 y1 x2 y2 boxes."""
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.empty((H, W, 3), np.float32)
    img[...] = (120, 118, 112)
    img += rng.normal(0, 6, (H, W, 1))
    img[:, :30] = (150, 140, 120)  # walkway planks on both sides
    img[:, -30:] = (150, 140, 120)
    boxes = []
    for k in range(3):
        cy = (t * 12 + k * 95) % (H + 60) - 30
        cx = W / 2 + (k - 1) * 8
        a, b = 22, 40  # half width, half length
        inside = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
        if not inside.any():
            continue
        img[inside] = (140 + 10 * k, 85, 45)
        img[inside & (np.abs(xx - cx) < 5)] = (215, 200, 180)
        ys, xs = np.nonzero(inside)
        boxes.append((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
    return np.clip(img, 0, 255).astype(np.uint8), boxes


def write_frames(root: Path, n: int, seed: int = 0) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("cow\n")
    rng = np.random.default_rng(seed)
    for t in range(n):
        px, boxes = _frame(t, rng)
        Image.fromarray(px).save(root / "images" / f"frame_{t}.jpg", quality=92)
        lines = [f"0 {(x1 + x2) / 2 / W:.6f} {(y1 + y2) / 2 / H:.6f} {(x2 - x1) / W:.6f} {(y2 - y1) / H:.6f}"
                 for x1, y1, x2, y2 in boxes]
        (root / "labels" / f"frame_{t}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    return root


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Path]:
    """One small fit through the CLI (128 px, 12 epochs over 12 frames; seconds on a CPU)."""
    root = tmp_path_factory.mktemp("detect")
    frames = write_frames(root / "chute", 16)
    models = root / "models"
    result = CliRunner().invoke(app, [
        "detect", "fit", str(frames), "--out", "chute_cam", "--models-dir", str(MODELS),
        "--out-dir", str(models / "chute_cam"), "--size", "128", "--epochs", "12", "--holdout", "0.25",
        "--gap", "0.0625", "--json",
    ])
    assert result.exit_code == 0, result.output
    return models / "chute_cam", json.loads(result.stdout.strip().splitlines()[-1]), frames


def test_fit_writes_a_bundle_with_held_out_figures(fitted: tuple[Path, dict[str, Any], Path]) -> None:
    bundle_dir, report, _ = fitted
    m = load_bundle(bundle_dir).manifest
    assert m.task == "detection" and m.decoder.type == "detections" and m.labels == ("cow",)
    assert (m.input.width, m.input.height, m.input.dtype) == (128, 128, "uint8")
    # 16 frames in time order: the last 4 held out, the 1 before them dropped, 11 trained on
    assert (report["n_train"], report["n_gap"], report["n_held_out"]) == (11, 1, 4)
    assert report["held_out_first"] == "frame_12.jpg"
    held = report["held_out"]
    assert m.thresholds.score == report["score_threshold"] == held["threshold"]
    assert {"ap50", "recall", "precision", "found", "false_positives"} <= set(held)
    assert m.metadata["fit"]["held_out"]["ap50"] == held["ap50"]
    card = (bundle_dir / "MODEL_CARD.md").read_text()
    assert "fill in" in card and f"{held['ap50']:.3f}" in card
    assert (bundle_dir / "LICENSE").is_file()


def test_fitted_bundle_finds_the_animals_the_base_misses(fitted: tuple[Path, dict[str, Any], Path],
                                                        tmp_path: Path) -> None:
    bundle_dir, _, _ = fitted
    fresh = write_frames(tmp_path / "later", 6, seed=7)  # frames the fit never saw
    items = list_detection(fresh)
    fitted_model = Model.load(load_bundle(bundle_dir))
    base = Model.load(find_bundle("yolox_nano", MODELS))
    got = detection_report(fitted_model, items, {0: "cow"})
    before = detection_report(base, items, {0: "cow"})  # the COCO detector's own "cow"
    assert got["ap50"] >= 0.6 and got["ap50"] > before["ap50"] + 0.3, (got["ap50"], before["ap50"])
    result = fitted_model.predict_bytes((fresh / "images" / "frame_2.jpg").read_bytes())
    assert result.predictions and all(isinstance(p, Detection) and p.label == "cow" for p in result.predictions)


def test_cli_bad_label_names_file_and_line(tmp_path: Path) -> None:
    frames = write_frames(tmp_path / "f", 4)
    (frames / "labels" / "frame_2.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.95 0.5 0.2 0.2\n")
    result = CliRunner().invoke(app, ["detect", "fit", str(frames), "--out", "x", "--models-dir", str(MODELS),
                                      "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "[dataset_invalid]" in result.stderr and "frame_2.txt:2" in result.stderr
    assert "out of range" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("text", "classes", "expected"), [
    ("0 0.5 0.5 0.2\n", 1, "f.txt:1: expected 'class cx cy w h', got 4 fields"),
    ("0 0.5 0.5 0.2 0.2\n\n2 0.5 0.5 0.2 0.2\n", 2, "f.txt:3: unknown class id 2"),
    ("0 0.5 0.5 0.2 zero\n", 1, "f.txt:1: not a number"),
    ("0.5 0.5 0.5 0.2 0.2\n", 1, "f.txt:1: class id '0.5' is not a non-negative integer"),
    ("0 0.5 0.5 0 0.2\n", 1, "f.txt:1: box width and height must be > 0"),
    ("0 50 60 20 20\n", 1, "f.txt:1: box out of range"),
    ("0 0.05 0.5 0.2 0.2\n", 1, "f.txt:1: box out of range"),
    ("0 nan 0.5 0.2 0.2\n", 1, "f.txt:1: not a finite number"),
])
def test_label_errors_name_file_and_line(tmp_path: Path, text: str, classes: int, expected: str) -> None:
    f = tmp_path / "f.txt"
    f.write_text(text)
    with pytest.raises(DatasetError, match=expected.replace("(", r"\(").replace(")", r"\)")) as info:
        parse_label_file(f, classes)
    assert str(f) in info.value.message


def test_labels_are_parsed_and_clipped_at_the_edge(tmp_path: Path) -> None:
    f = tmp_path / "f.txt"
    f.write_text("0 0.5 0.5 0.2 0.4\n\n1 0.1 0.9 0.202 0.2\n")  # the second pokes 0.001 out: rounding, clipped
    boxes = parse_label_file(f, 2)
    assert boxes[0] == (0, 0.5, 0.5, 0.2, 0.4)
    cid, cx, _, w, _ = boxes[1]
    assert cid == 1 and cx - w / 2 == 0.0 and w == pytest.approx(0.201)


def test_read_frames_needs_every_label_file_and_sorts_in_time(tmp_path: Path) -> None:
    frames_dir = write_frames(tmp_path / "f", 12)
    frames, names = read_frames(frames_dir)
    assert names == ["cow"]
    assert [f.image.name for f in frames[8:11]] == ["frame_8.jpg", "frame_9.jpg", "frame_10.jpg"]
    assert read_frames(frames_dir, ["calf"])[1] == ["calf"]
    (frames_dir / "labels" / "frame_10.txt").unlink()
    with pytest.raises(DatasetError, match=r"frame_10.txt: missing label file for frame_10.jpg"):
        read_frames(frames_dir)
    with pytest.raises(InputNotFoundError, match="no images/ folder"):
        read_frames(tmp_path)


def test_temporal_split_holds_out_the_last_block_behind_a_gap() -> None:
    train, held = temporal_split(20, 0.2, 2)
    assert held == [16, 17, 18, 19] and train == list(range(14))
    assert temporal_split(5, 0.0, 3) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(DatasetError, match="too few"):
        temporal_split(4, 0.5, 1)


def test_write_graph_with_the_base_weights_gives_the_base_detections(tmp_path: Path) -> None:
    """The export path alone (no training): head found, weights written back, post-processing put back."""
    import onnx
    from onnx import numpy_helper

    from edge_agent.toolchain.detect_fit import base_graph

    base = find_bundle("yolox_nano", MODELS)
    model, head = base_graph(base)
    assert head.strides == (8, 16, 32) and len(head.cls_weights) == 3
    assert find_yolox_head(model) == head
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in head.cls_weights[0]}
    write_graph(model, head, weights, len(base.manifest.labels), 416, tmp_path / "copy.onnx")
    onnx.checker.check_model(onnx.load(str(tmp_path / "copy.onnx")))
    from edge_agent.vision.runtime import OrtRuntime

    copy = Model(base.manifest, OrtRuntime(tmp_path / "copy.onnx"))
    original = Model.load(base)
    photo = next((COCO_DEMO / "images").glob("*.jpg"))
    a, b = original.predict_bytes(photo.read_bytes()), copy.predict_bytes(photo.read_bytes())
    assert [p.label for p in a.predictions] == [p.label for p in b.predictions] and a.predictions
    for p, q in zip(a.predictions, b.predictions, strict=True):
        assert isinstance(p, Detection) and isinstance(q, Detection)
        assert p.score == pytest.approx(q.score, abs=1e-5)
        assert np.allclose(p.box, q.box, atol=1e-3)


def test_graph_net_computes_what_onnxruntime_computes() -> None:
    import onnx
    import onnxruntime as ort
    import torch

    from edge_agent.toolchain.detect_fit import base_graph
    from edge_agent.toolchain.detect_train import GraphNet

    model, head = base_graph(find_bundle("yolox_nano", MODELS))
    net = GraphNet(model, head.outputs())
    for name in head.outputs():
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).integers(0, 256, (1, 3, 416, 416), dtype=np.uint8)
    want = session.run(head.outputs(), {model.graph.input[0].name: x})
    with torch.no_grad():
        got = net(torch.from_numpy(x).float())
    for w, g in zip(want, got, strict=True):
        assert w.shape == tuple(g.shape)
        assert np.abs(w - g.numpy()).max() < 1e-3


def test_eval_reports_ap50_and_recall_at_the_shipped_threshold(fitted: tuple[Path, dict[str, Any], Path],
                                                                tmp_path: Path) -> None:
    bundle_dir, _, _ = fitted
    fresh = write_frames(tmp_path / "later", 5, seed=3)
    result = CliRunner().invoke(app, ["eval", "--model", "chute_cam", "--models-dir", str(bundle_dir.parent),
                                      str(fresh), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    shipped = load_bundle(bundle_dir).manifest.thresholds.score
    assert doc["score_threshold"] == shipped
    assert doc["n"] == 5 and doc["n_truth"] == sum(
        len((fresh / "labels" / f"frame_{t}.txt").read_text().splitlines()) for t in range(5))
    assert 0.0 <= doc["recall"] <= 1.0 and doc["found"] == round(doc["recall"] * doc["n_truth"])
    assert doc["ap50"] > 0.5


def test_the_shipped_cattle_bundle_states_its_held_out_figures() -> None:
    """models/cattle_overhead (`make models`): one label, fitted on every frame, so its figures are the temporal
    cross-validation of the same recipe (held-out blocks never trained on, a gap on both sides), and the card
    states them.

    (The frames themselves have no licence and stay in ../shared: models/training/cattle_cv.py re-measures them.)"""
    bundle = find_bundle("cattle_overhead", MODELS)
    m = bundle.manifest
    assert m.labels == ("cow",) and m.decoder.type == "detections" and m.input.dtype == "uint8"
    fit = m.metadata["fit"]
    assert fit["n_train"] == fit["n_frames"] == 222 and fit["n_held_out"] == 0
    cv = m.metadata["cross_validation"]
    assert cv == json.loads((bundle.directory / "cross_validation.json").read_text())
    recipe = m.metadata["recipe"]
    assert all(recipe[k] == v for k, v in cv["recipe"].items()), "the folds ran another recipe"
    folds = cv["folds"]
    assert [f["fold"] for f in folds] == [0, 1, 2, 3, 4] and cv["gap"] >= 1
    held = [set(range(*b)) for b in zip((0, 44, 88, 132, 178), (44, 88, 132, 178, 222), strict=True)]
    assert set().union(*held) == set(range(222)) and sum(len(h) for h in held) == 222
    assert m.thresholds.score == fit["score_threshold"] == cv["score_threshold"]
    card = (bundle.directory / "MODEL_CARD.md").read_text()
    mean = cv["mean"]
    for figure in (f"**{mean['ap50_all']:.3f}**", f"**{mean['ap50_chute']:.3f}**", f"{mean['recall_all']:.3f}",
                   f"{m.thresholds.score}", "no licence", *(f"{f['all']['ap50']:.3f}" for f in folds)):
        assert figure in card, figure
    model = Model.load(bundle)
    result = model.predict_bytes(next((COCO_DEMO / "images").glob("*.jpg")).read_bytes())
    assert all(isinstance(p, Detection) and p.label == "cow" for p in result.predictions)


@pytest.mark.parametrize("seed", range(4))
def test_zoom_out_grids_and_aspect_jitter_keep_every_box_on_its_animal(seed: int) -> None:
    """The augmentations tried for other cameras (many small animals, other aspect ratios): every box still covers
    its animal after shrinking into a grid cell, stretching, flips and quarter turns."""
    from edge_agent.toolchain.detect_train import PAD, Augment, sample

    img = np.full((100, 60, 3), 90, np.uint8)
    img[30:70, 20:40] = (0, 0, 255)  # one red "animal" (BGR), box x 20-40, y 30-70
    frames = [(img, np.array([[20, 30, 40, 70, 0]], np.float32))] * 3
    aug = Augment(zoom_out=1.0, aspect=0.3, color=0.0, blur=0.0)
    canvas, boxes = sample(frames, 0, 96, aug, True, np.random.default_rng(seed))
    assert canvas.shape == (96, 96, 3) and 4 <= len(boxes) <= 16  # a 2x2 to 4x4 grid, one animal per frame
    assert (boxes[:, :4] >= 0).all() and (boxes[:, :4] <= 96).all()
    for x1, y1, x2, y2, _ in boxes:
        inner = canvas[int(y1) + 1 : int(y2) - 1, int(x1) + 1 : int(x2) - 1].reshape(-1, 3).astype(int)
        assert len(inner) and (inner[:, 2] > 200).mean() > 0.9, "a box off its animal"
    red = (canvas[:, :, 2] > 200) & (canvas[:, :, 0] < 50)
    assert red.sum() > 0 and not (canvas == PAD).all()


def test_soup_ships_the_mean_of_the_seeds_fits(tmp_path: Path) -> None:
    """``soup=2`` trains seeds 0 and 1 from the same start and ships the element-wise mean of their weights; each
    run reports its epochs' weights to ``on_epoch`` (weight-averaging experiments), the last EMA being what it
    returns."""
    from dataclasses import replace

    from edge_agent.toolchain import detect_fit as df
    from edge_agent.toolchain import detect_train

    frames, labels = read_frames(write_frames(tmp_path / "f", 6))
    base = find_bundle("yolox_nano", MODELS)
    model, head = df.base_graph(base)
    config = df.DetectFitConfig(holdout=0.0, size=64, epochs=2, batch=3)
    quiet = lambda _stage, _done, _total: None  # noqa: E731
    one = [df._train(model, head, base, labels, frames, range(6), replace(config, seed=s), quiet) for s in (0, 1)]
    soup = df._train(model, head, base, labels, frames, range(6), replace(config, soup=2), quiet)
    assert set(soup) == set(one[0])
    moved = [k for k in soup if not np.array_equal(one[0][k], one[1][k])]
    assert moved  # the seeds' fits differ
    for k in soup:
        assert np.allclose(soup[k], (one[0][k] + one[1][k]) / 2, atol=1e-6)
    seen: list[tuple[int, dict[str, Any]]] = []
    data = [df.load_frame(f) for f in frames]
    override = df.class_init(model, head, base.manifest.labels, labels)
    tc = detect_train.TrainConfig(size=64, epochs=2, batch=3, threads=1)
    got = detect_train.train(model, head.outputs(), head.strides, override, data, tc,
                             on_epoch=lambda e, _raw, ema: seen.append((e, ema)))
    assert [e for e, _ in seen] == [0, 1]
    assert all(np.array_equal(got[k], seen[-1][1][k]) for k in got)
