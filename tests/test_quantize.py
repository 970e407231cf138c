"""edge_agent.toolchain.quantize: static QDQ INT8 + the accuracy-and-speed gate, and `edge-agent quantize`."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from edge_agent.bundles.bundle import load_bundle
from edge_agent.cli import app
from edge_agent.errors import QuantizationGateError
from edge_agent.toolchain import quantize
from edge_agent.toolchain.quantize import GateConfig, decide, quantize_and_gate
from edge_agent.toolchain.quantize import gate as quantize_gate
from tests.support.color_models import write_bundle, write_images


def test_compare_latency_times_both_models(setup: tuple[Path, Path]) -> None:
    import numpy as np

    from edge_agent.vision.model import Model

    models, _ = setup
    m = Model.load(load_bundle(models / "colors"))
    a, b = quantize.compare_latency(m, m, np.zeros((1, 3, 16, 16), np.uint8), runs=5)
    assert a > 0 and b > 0


def test_decide_rules() -> None:
    cfg = GateConfig(max_accuracy_drop=0.01, max_auroc_drop=0.02)
    assert decide("accuracy", 0.98, 0.975, 10.0, 6.0, cfg)[0] is True
    ok, reason, drop, budget = decide("accuracy", 0.98, 0.96, 10.0, 6.0, cfg)
    assert not ok and "loses" in reason and drop == pytest.approx(0.02) and budget == 0.01
    ok, reason, _, _ = decide("accuracy", 0.98, 0.99, 10.0, 10.5, cfg)
    assert not ok and "not faster" in reason
    assert decide("image_auroc", 0.93, 0.915, 10.0, 6.0, cfg)[0] is True  # AUROC budget applies


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Path, Path]:
    write_bundle(tmp_path / "models" / "colors")
    data = write_images(tmp_path / "data", per_class=3)
    return tmp_path / "models", data


def test_gate_pass_writes_a_valid_int8_bundle(setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    models, data = setup
    # tiny models are never faster in INT8; pretend the timing went INT8's way to reach the write path
    monkeypatch.setattr(quantize_gate, "compare_latency", lambda a, b, sample, runs: (2.0, 1.0))
    out = models / "colors_int8"
    config = GateConfig(latency_runs=2)
    report = quantize_and_gate(load_bundle(models / "colors"), data, data, out, "colors_int8", config)
    assert report.passed and report.metric == "accuracy" and report.int8 == report.fp32 == 1.0
    bundle = load_bundle(out)  # checksum verified
    assert bundle.manifest.name == "colors_int8"
    assert bundle.manifest.metadata["quantization"]["gate"]["passed"] is True
    ops = {n.op_type for n in onnx.load(str(bundle.onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [i for i in onnx.load(str(bundle.onnx_path)).graph.initializer if i.name.startswith("conv_w")]
    assert any(w.data_type == onnx.TensorProto.INT8 for w in weights)  # signed weights


def test_gate_refuses_accuracy_loss_and_writes_nothing(
    setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    models, data = setup
    monkeypatch.setattr(quantize_gate, "compare_latency", lambda a, b, sample, runs: (2.0, 1.0))
    out = models / "colors_int8"
    with pytest.raises(QuantizationGateError) as info:
        quantize_and_gate(load_bundle(models / "colors"), data, data, out, "colors_int8",
                          GateConfig(max_accuracy_drop=-0.5, latency_runs=2))
    assert "loses" in info.value.message
    assert info.value.report["passed"] is False
    assert not out.exists()


def test_cli_refuses_when_int8_is_not_faster(setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    models, data = setup
    monkeypatch.setattr(quantize_gate, "compare_latency", lambda a, b, sample, runs: (1.0, 1.2))
    result = CliRunner().invoke(
        app,
        ["quantize", "--model", "colors", "--calib", str(data), "--eval", str(data), "--out", "colors_int8",
         "--models-dir", str(models), "--runs", "20", "--json"],
    )
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert doc["passed"] is False and "not faster" in doc["reason"]
    assert doc["fp32_latency_ms"] == 1.0 and doc["int8_latency_ms"] == 1.2
    assert not (models / "colors_int8").exists()
