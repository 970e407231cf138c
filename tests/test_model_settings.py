"""Model settings at run time: the `set_thresholds` MQTT command reaches the models of a pipeline,
and the per-model pixel cap comes from the config.

Given a running agent with a detection pipeline, when the command changes its score threshold,
then the next results obey it; a change that does not fit the model or the range is refused as a
whole with a stable code, and the thresholds in force stay as they were.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.agent.service import Service
from edge_agent.bundles.bundle import find_bundle
from edge_agent.config import load_config
from edge_agent.protocol.commands import Command, CommandError
from edge_agent.vision.model import Model

from .conftest import COCO_DEMO, MODELS

COWS = COCO_DEMO / "images" / "000000573455.jpg"


def test_model_thresholds_change_atomically_and_validate() -> None:
    model = Model.load(find_bundle("yolox_nano", MODELS))
    before = model.predict_bytes(COWS.read_bytes())
    assert min(d.score for d in before.detections) < 0.6
    applied = model.set_thresholds(score=0.6)
    assert applied["score"] == 0.6
    after = model.predict_bytes(COWS.read_bytes())
    assert 0 < len(after.detections) < len(before.detections)
    assert min(d.score for d in after.detections) >= 0.6
    with pytest.raises(ValueError, match="anomaly does not apply"):
        model.set_thresholds(score=0.1, anomaly=3.0)
    with pytest.raises(ValueError):
        model.set_thresholds(iou=1.5)
    assert model.manifest.thresholds.score == 0.6, "a refused change leaves the thresholds in force"


def test_service_applies_set_thresholds_to_every_worker(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    cfg_path = tmp_path / "agent.yaml"
    cfg_path.write_text(f"""\
device_id: dev-t
state_dir: state
models_dir: {MODELS}
shutdown_timeout_s: 5
models:
  - name: det
    bundle: yolox_nano
    threads: 1
pipelines:
  - name: herd
    kind: plain
    model: det
    workers: 2
sources:
  - type: folder
    name: inbox
    pipeline: herd
    path: inbox
mqtt:
  enabled: false
metrics:
  enabled: false
""")
    service = Service(load_config(cfg_path))
    service.start()
    try:
        done = service.handle_command(Command(id="t1", name="set_thresholds", args={"pipeline": "herd", "score": 0.7}))
        assert done["pipeline"] == "herd" and done["thresholds"]["score"] == 0.7
        workers = service.pipelines["herd"]._models
        assert len(workers) == 2
        assert all(isinstance(m, Model) and m.manifest.thresholds.score == 0.7 for m in workers)
        with pytest.raises(CommandError) as info:
            service.handle_command(Command(id="t2", name="set_thresholds", args={"pipeline": "nope", "score": 0.2}))
        assert info.value.code == "command_invalid"
        with pytest.raises(CommandError) as info:
            service.handle_command(Command(id="t3", name="set_thresholds", args={"pipeline": "herd", "anomaly": 2.0}))
        assert info.value.code == "command_invalid" and "does not apply" in info.value.message
        with pytest.raises(CommandError) as info:
            service.handle_command(Command(id="t4", name="reboot", args={}))
        assert info.value.code == "command_unsupported"
    finally:
        assert service.stop(5)


def test_model_pixel_cap_comes_from_config(tmp_path: Path) -> None:
    from edge_agent.errors import ImageTooLargeError

    cfg_path = tmp_path / "agent.yaml"
    cfg_path.write_text(f"""\
models_dir: {MODELS}
state_dir: state
models:
  - name: det
    bundle: yolox_nano
    max_pixels: 100000
pipelines:
  - name: herd
    kind: plain
    model: det
mqtt:
  enabled: false
metrics:
  enabled: false
""")
    service = Service(load_config(cfg_path))
    service.start()
    try:
        model = service.pipelines["herd"]._models[0]
        with pytest.raises(ImageTooLargeError):  # 640x383 = 245,120 pixels > 100,000
            model.predict_bytes(COWS.read_bytes())
    finally:
        assert service.stop(5)


def test_config_score_threshold_replaces_the_bundles_and_is_refused_for_a_classifier() -> None:
    """``models[].score_threshold``: the model the agent builds filters at it (e.g. to feed the livestock tracker's
    second stage); for a model without a score threshold the agent refuses to start with the key named."""
    from edge_agent.agent.service import onnx_model_factory
    from edge_agent.config import ModelConfig
    from edge_agent.errors import ConfigError

    bundle = find_bundle("yolox_nano", MODELS)
    model = onnx_model_factory(bundle, ModelConfig(name="det", bundle="yolox_nano", warmup=False, score_threshold=0.6))
    assert isinstance(model, Model) and model.manifest.thresholds.score == 0.6
    scores = [d.score for d in model.predict_bytes(COWS.read_bytes()).detections]
    assert scores and min(scores) >= 0.6
    leaf = find_bundle("crop_disease", MODELS)
    with pytest.raises(ConfigError, match=r"models.leaf.score_threshold: score does not apply"):
        onnx_model_factory(leaf, ModelConfig(name="leaf", bundle="crop_disease", warmup=False, score_threshold=0.5))
