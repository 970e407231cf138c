"""The shipped cattle_overhead bundle (`make models`: `detect fit` on ../shared cattle_chute/train).

Given the bundle and the frames it was measured on, when the held-out block named in its manifest (the frames from
``held_out_first`` on, in time order) runs through it, then AP50 and recall at the shipped threshold are the ones the
manifest and the model card state (so the figures are reproducible), and the COCO detector it started from finds far
fewer of those cattle under its own "cow" label.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.bundle import find_bundle
from edge_agent.detect_fit import read_frames
from edge_agent.evaluate import detection_report
from edge_agent.model import Model
from edge_agent.runtime import RuntimeOptions

from .conftest import MODELS, SHARED

FRAMES = SHARED / "datasets" / "livestock" / "cattle_chute" / "train"


@pytest.fixture(scope="module")
def held_out() -> list[tuple[Path, Path]]:
    fit = find_bundle("cattle_overhead", MODELS).manifest.metadata["fit"]
    frames, _ = read_frames(FRAMES)
    names = [f.image.name for f in frames]
    start = names.index(fit["held_out_first"])
    items = [(f.image, FRAMES / "labels" / f"{f.image.stem}.txt") for f in frames[start:]]
    assert len(items) == fit["n_held_out"]
    return items


def test_shipped_figures_are_reproducible(held_out: list[tuple[Path, Path]]) -> None:
    bundle = find_bundle("cattle_overhead", MODELS)
    m = bundle.manifest
    assert m.labels == ("cow",) and m.decoder.type == "detections"
    fit = m.metadata["fit"]
    report = detection_report(Model.load(bundle, RuntimeOptions(intra_op_threads=2)), held_out)
    assert report["ap50"] == pytest.approx(fit["held_out"]["ap50"], abs=0.005)
    assert report["recall"] == pytest.approx(fit["held_out"]["recall"], abs=0.011)
    assert report["score_threshold"] == fit["score_threshold"]


def test_it_finds_the_cattle_the_coco_detector_misses(held_out: list[tuple[Path, Path]]) -> None:
    fitted = detection_report(Model.load(find_bundle("cattle_overhead", MODELS)), held_out, {0: "cow"})
    coco = detection_report(Model.load(find_bundle("yolox_nano", MODELS)), held_out, {0: "cow"})
    assert fitted["ap50"] > 0.5 and fitted["recall"] > 0.5
    assert coco["ap50"] < 0.2 and fitted["ap50"] > coco["ap50"] + 0.4
