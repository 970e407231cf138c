"""The edge-agent command line, run as a user would: a subprocess of the installed entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
