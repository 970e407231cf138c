"""The edge-agent command line, run as a user would: a subprocess of the installed entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_agent import __version__
from edge_agent.cli.main import app
from edge_agent.cli.run import pick_default_bundle
from edge_agent.coordinator.cli import build_store
from edge_agent.coordinator.config import CoordinatorConfig
from edge_agent.errors import MissingDependencyError, ModelNotFoundError

from .conftest import COCO_DEMO

CLI = [sys.executable, "-m", "edge_agent.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, check=False)


def test_models_list_json_names_the_shipped_detectors() -> None:
    proc = run("models", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    names = {r["name"] for r in rows if r["ok"]}
    assert {"yolox_nano", "nanodet_m_320"} <= names


def test_infer_json_gives_one_object_per_image() -> None:
    images = sorted(str(p) for p in (COCO_DEMO / "images").glob("*.jpg"))
    proc = run("infer", *images, "--model", "nanodet_m_320", "--json")
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(docs) == len(images)
    for doc in docs:
        assert doc["model"] == "nanodet_m_320" and doc["task"] == "detection"
        assert set(doc["timings_ms"]) >= {"decode", "preprocess", "inference", "postprocess"}
        for p in doc["predictions"]:
            assert {"label", "score", "box"} <= set(p) and len(p["box"]) == 4
    assert any(p["label"] == "cow" for d in docs for p in d["predictions"])


def test_bad_inputs_give_one_clear_line_and_non_zero_exit(tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    cases = [
        (("infer", str(tmp_path / "missing.jpg"), "--model", "yolox_nano"), "input_not_found"),
        (("infer", str(text), "--model", "yolox_nano"), "image_unsupported_format"),
        (("infer", str(text), "--model", "no_such_model"), "model_not_found"),
    ]
    for args, code in cases:
        proc = run(*args)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and code in lines[0], proc.stderr


def test_providers_json() -> None:
    proc = run("providers", "--json")
    assert proc.returncode == 0
    doc = json.loads(proc.stdout)
    assert doc["selected"][-1] == "CPUExecutionProvider"
    assert "CPUExecutionProvider" in doc["available"]


def test_version_is_the_package_version() -> None:
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"edge-agent {__version__}"


def test_a_missing_or_empty_models_dir_is_one_line_naming_it(tmp_path: Path) -> None:
    empty, absent = tmp_path / "empty", tmp_path / "absent"
    empty.mkdir()
    (empty / "notes").mkdir()  # a folder without a manifest is no bundle
    cases = [
        (["models", "list", "--models-dir", str(empty)], empty, "no model bundles in"),
        (["models", "list", "--models-dir", str(absent)], absent, "does not exist"),
        (["infer", str(COCO_DEMO / "images" / "000000573455.jpg"), "-m", "yolox_nano", "--models-dir", str(empty)],
         empty, "no model bundles in"),
        (["eval", str(tmp_path), "-m", "crop_disease", "--models-dir", str(absent)], absent, "does not exist"),
    ]
    for args, folder, words in cases:
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, res.output
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "model_not_found" in lines[0] and words in lines[0], res.output
        assert str(folder) in lines[0]


def test_the_embedded_default_names_an_empty_models_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=f"no model bundles in {tmp_path}"):
        pick_default_bundle(tmp_path)


@pytest.mark.parametrize(
    ("module", "args", "hint"),
    [
        ("onnx", ["quantize", "-m", "crop_disease", "--calib", ".", "--eval", ".", "--out", "x"], "[tools]"),
        ("onnx", ["inspect", "fit", ".", "--out", "x"], "[tools]"),
        ("matplotlib", ["eval", ".", "-m", "crop_disease", "--plot", "cm.png"], "[plot]"),
    ],
)
def test_a_tool_whose_extra_is_missing_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module: str, args: list[str], hint: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails, as in the runtime-only install
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "dependency_missing" in lines[0], res.output
    assert f"pip install 'edge-agent{hint}'" in lines[0]
    assert not any(tmp_path.iterdir())  # nothing evaluated, fitted or written


def test_the_postgres_store_without_psycopg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.delitem(sys.modules, "edge_agent.coordinator.store_pg", raising=False)
    config = CoordinatorConfig.model_validate({"store": {"type": "postgres", "dsn": "postgresql:///nowhere"}})
    with pytest.raises(MissingDependencyError, match=r"pip install 'edge-agent\[postgres\]'"):
        build_store(config)
