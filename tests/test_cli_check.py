"""``edge-agent run --check`` catches everything ``run`` would refuse (issue 13, finding 6), with the real CLI.

Given a good config and, one at a time, each kind of mistake ``run`` refuses at start; when
``python -m edge_agent.cli run --config X --check`` runs, and ``run`` itself; then the good config is
``ok`` and every bad one gives exit 2 and one line naming the file and the key, with the same error code
``run`` gives (so a config that passes ``--check`` does not fail at start).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_agent.cli import app
from edge_agent.sectors.advice import CROP_LABELS
from tests.support.agent_process import ROOT, tiny_crop_models

TOKEN = "check-test-token-0123456789abcdef"
GOOD = """\
device_id: check-1
state_dir: state
models_dir: models
shutdown_timeout_s: 5
models:
  - name: crop
    bundle: tiny_crop
pipelines:
  - {name: crop, kind: crop, model: crop}
sources:
  - {type: folder, name: inbox, pipeline: crop, path: inbox}
mqtt:
  enabled: false
metrics:
  enabled: true
  port: 19108
http:
  enabled: true
  port: 18099
  tokens_file: tokens
"""


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False,
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    tiny_crop_models(tmp_path, list(CROP_LABELS))
    (tmp_path / "tokens").write_text(TOKEN + "\n")
    return tmp_path


def edit(old: str, new: str) -> Callable[[Path], str]:
    def change(_: Path) -> str:
        assert old in GOOD
        return GOOD.replace(old, new)

    return change


def short_token(root: Path) -> str:
    (root / "tokens").write_text("tooshort\n")
    return GOOD


def wrong_checksum(root: Path) -> str:
    manifest = root / "models" / "tiny_crop" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["sha256"] = "0" * 64
    manifest.write_text(json.dumps(doc))
    return GOOD


def input_not_in_model(root: Path) -> str:  # only building the model shows it
    manifest = root / "models" / "tiny_crop" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["input"]["name"] = "pixels"
    manifest.write_text(json.dumps(doc))
    return GOOD


def folder_under_a_file(root: Path) -> str:
    (root / "afile").write_text("x")
    return GOOD.replace("path: inbox}", "path: afile/inbox}")


def bad_update_key(root: Path) -> str:
    (root / "not-a-key.pem").write_text("hello\n")
    return GOOD + "updates:\n  enabled: true\n  trusted_keys: [not-a-key.pem]\n"


def bad_ack_key(root: Path) -> str:
    (root / "coordinator.pub").write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    return GOOD.replace("mqtt:\n  enabled: false\n", "mqtt:\n  ack_keys: [coordinator.pub]\n")


def bad_ca_file(root: Path) -> str:
    (root / "ca.pem").write_text("not a certificate\n")
    return GOOD.replace("mqtt:\n  enabled: false\n", "mqtt:\n  tls: {enabled: true, ca_file: ca.pem}\n")


LINE = """pipelines:
  - {name: crop, kind: crop, model: crop}
  - {name: parts, kind: inspection, model: crop}
line:
  recipes: [{id: part-a, pipeline: parts, outputs: [OUTPUT]}]
  outputs: [{type: webhook, name: hook, url: "http://127.0.0.1:9/parts", token_env: EDGE_AGENT_TEST_UNSET_TOKEN}]
"""


def line_recipe(output: str) -> Callable[[Path], str]:
    def change(_: Path) -> str:
        return GOOD.replace("pipelines:\n  - {name: crop, kind: crop, model: crop}\n", LINE.replace("OUTPUT", output))

    return change


def outside_by_absolute_path(root: Path) -> str:
    outside = root / "elsewhere"
    tiny_crop_models(outside, list(CROP_LABELS))
    return GOOD.replace("bundle: tiny_crop", f"bundle: {outside / 'models' / 'tiny_crop'}")


# (case, make the config, error code, key the line must name)
BAD: list[tuple[str, Callable[[Path], str], str, str]] = [
    ("missing bundle", edit("bundle: tiny_crop", "bundle: no_such_model"), "model_not_found", "models.0.bundle"),
    ("bind off loopback without tokens", edit("  tokens_file: tokens\n", "  bind: 0.0.0.0\n"), "config_invalid",
     "http.tokens_file"),
    ("short token", short_token, "config_invalid", "http.tokens_file"),
    ("bundle path escapes models_dir", edit("bundle: tiny_crop", "bundle: ../../../../etc"), "config_invalid",
     "models.0.bundle"),
    ("bundle absolute path outside models_dir", outside_by_absolute_path, "config_invalid", "models.0.bundle"),
    ("duplicate top-level key", lambda _: GOOD + "mqtt:\n  enabled: true\n", "config_invalid", "mqtt"),
    ("duplicate nested key", edit("    bundle: tiny_crop\n", "    bundle: tiny_crop\n    bundle: other\n"),
     "config_invalid", "models.0.bundle"),
    ("http and metrics on one port", edit("port: 19108", "port: 18099"), "config_invalid", "metrics.port"),
    ("bind is a host name", edit("  port: 18099\n", "  port: 18099\n  bind: farm.local\n"), "config_invalid",
     "http.bind"),
    ("watched folder cannot be created", folder_under_a_file, "config_invalid", "sources.0.path"),
    ("bundle checksum wrong", wrong_checksum, "checksum_mismatch", "models.0.bundle"),
    ("manifest names an input the model lacks", input_not_in_model, "manifest_invalid", "models.0"),
    ("trusted update key unreadable", bad_update_key, "config_invalid", "updates.trusted_keys.0"),
    ("broker CA file unreadable", bad_ca_file, "config_invalid", "mqtt.tls.ca_file"),
    ("coordinator ack key unreadable", bad_ack_key, "config_invalid", "mqtt.ack_keys.0"),
    ("recipe names an unknown output", line_recipe("plc"), "config_invalid", "line.recipes.0.outputs.0"),
    ("webhook token variable unset", line_recipe("hook"), "config_invalid", "line.outputs.0.token_env"),
    ("untrusted proxy entry", edit("  tokens_file: tokens\n", "  tokens_file: tokens\n  trusted_proxies: [proxy]\n"),
     "config_invalid", "http.trusted_proxies"),
]


def test_good_config_checks_ok(workdir: Path) -> None:
    config = workdir / "agent.yaml"
    config.write_text(GOOD)
    result = cli(config, "--check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{config}: ok"
    assert not (workdir / "state").exists()  # nothing written, nothing started


@pytest.mark.parametrize(("case", "make", "code", "key"), BAD, ids=[c[0] for c in BAD])
def test_check_refuses_what_run_refuses_naming_file_and_key(
    workdir: Path, case: str, make: Callable[[Path], str], code: str, key: str
) -> None:
    config = workdir / "agent.yaml"
    config.write_text(make(workdir))
    check = cli(config, "--check")
    lines = [line for line in check.stderr.splitlines() if line.strip()]
    assert check.returncode == 2 and len(lines) == 1, (case, check.stdout, check.stderr)
    assert lines[0].startswith(f"error [{code}] {config}: {key}"), lines[0]
    run = CliRunner().invoke(app, ["run", "--config", str(config)])  # run refuses it too, with the same code
    assert run.exit_code == 2 and f"error [{code}]" in run.output, (case, run.output[-2000:])


def test_yaml_merge_keys_and_anchors_are_not_duplicates_but_repeated_keys_anywhere_are() -> None:
    from edge_agent.config import load_yaml
    from edge_agent.errors import ConfigError

    doc = load_yaml("base: &b {a: 1, b: 2}\nmore:\n  <<: *b\n  c: 3\nagain: *b\n", "x.yaml")
    assert doc["more"] == {"a": 1, "b": 2, "c": 3} and doc["again"] == {"a": 1, "b": 2}
    with pytest.raises(ConfigError, match=r"^x.yaml: sources.1.path: duplicate key \(lines 3 and 4\)$"):
        load_yaml("sources:\n  - {path: a}\n  - path: b\n    path: c\n", "x.yaml")
