"""Config: strict validation, one-line errors naming file and key, secrets never printed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_agent.config import (
    AgentConfig,
    CameraSourceConfig,
    FolderSourceConfig,
    default_config,
    load_config,
    parse_config,
)
from edge_agent.errors import ConfigError

GOOD = """\
device_id: barn-1
state_dir: state
models:
  - name: det
    bundle: yolox_nano
pipelines:
  - name: cows
    kind: livestock
    model: det
    livestock:
      zones:
        - name: gate
          box: [0.0, 0.0, 0.5, 0.5]
          max_count: 3
sources:
  - type: folder
    name: inbox
    pipeline: cows
    path: inbox
    max_file_bytes: 16MiB
  - type: camera
    name: cam
    pipeline: cows
    url: rtsp://cam.local/stream
    username: viewer
    password_env: CAM_PW
mqtt:
  host: broker.local
  port: 8883
  username: barn-1
  password_file: mqtt.pw
"""


def write(tmp_path: Path, text: str, name: str = "agent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_config_loads_with_paths_resolved_and_secrets_hidden(tmp_path: Path) -> None:
    (tmp_path / "mqtt.pw").write_text("s3cret-mqtt\n")
    cfg = load_config(write(tmp_path, GOOD), environ={"CAM_PW": "s3cret-cam"})
    assert cfg.device_id == "barn-1"
    assert cfg.state_dir == tmp_path / "state"
    folder, camera = cfg.sources
    assert isinstance(folder, FolderSourceConfig) and isinstance(camera, CameraSourceConfig)
    assert folder.path == tmp_path / "inbox"
    assert folder.done_dir == tmp_path / "inbox" / "done"
    assert folder.max_file_bytes == 16 * 1024 * 1024
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == "s3cret-mqtt"
    assert camera.password is not None and camera.password.get_secret_value() == "s3cret-cam"
    text = repr(cfg) + str(cfg) + cfg.model_dump_json()
    assert "s3cret" not in text


def test_every_field_has_a_description() -> None:
    missing: list[str] = []
    seen: set[type] = set()

    def walk(model: type) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            for arg in (*getattr(field.annotation, "__args__", ()), field.annotation):
                inner = getattr(arg, "__args__", ())
                for t in (arg, *inner):
                    if isinstance(t, type) and hasattr(t, "model_fields"):
                        walk(t)

    walk(AgentConfig)
    assert len(seen) > 8
    assert missing == []


@pytest.mark.parametrize(
    ("case", "text", "expected"),
    [
        ("yaml syntax error", "models: [\n  - name: a\n", "line"),
        ("unknown key", GOOD + "colour: blue\n", "colour: unknown key"),
        ("unknown nested key", GOOD.replace("  port: 8883", "  port: 8883\n  prot: 1"), "mqtt.prot: unknown key"),
        ("wrong type", GOOD.replace("  port: 8883", "  port: [1]"), "mqtt.port:"),
        ("port 70000", GOOD.replace("  port: 8883", "  port: 70000"), "mqtt.port: Input should be less than"),
        ("python object tag", "device_id: !!python/object/apply:os.system ['true']\n", "unsupported YAML tag"),
        ("top level list", "- a\n- b\n", "(root): top level must be a mapping"),
        ("dangling pipeline", GOOD.replace("cows\n    path", "nope\n    path"), "sources.0.pipeline"),
        ("dangling model", GOOD.replace("model: det", "model: other"), "pipelines.0.model: unknown model"),
        ("bad zone", GOOD.replace("[0.0, 0.0, 0.5, 0.5]", "[0.5, 0.0, 0.1, 0.5]"), "zones.0.box"),
        ("bad device id", GOOD.replace("barn-1\nstate", "barn/1\nstate"), "device_id:"),
        ("reserved device id", GOOD.replace("barn-1\nstate", "coordinator\nstate"), "device_id: 'coordinator' is"),
        ("inline password", GOOD.replace("password_file: mqtt.pw", "password: hunter2"), "mqtt.password: inline"),
        ("bad size", GOOD.replace("16MiB", "lots"), "sources.0.max_file_bytes"),
        ("unknown source type", GOOD.replace("type: camera", "type: usb"), "sources.1"),
        ("options of another kind", GOOD.replace("livestock:\n      zones", "inspection:\n      zones"), "pipelines.0"),
        ("unknown command allowed", GOOD + "commands: {allow: [ping, reboot]}\n",
         "commands.allow: unknown commands ['reboot']"),
        ("bounds upside down", GOOD + "commands: {set_thresholds: {score_min: 0.9, score_max: 0.1}}\n",
         "commands.set_thresholds.score_max: score_max must not be below"),
        ("interval upside down", GOOD + "commands: {heartbeat_interval: {min: 600, max: 60}}\n",
         "commands.heartbeat_interval.max:"),
        ("missing ack key", GOOD.replace("  port: 8883", "  port: 8883\n  ack_keys: [keys/c.pub]"),
         "mqtt.ack_keys.0: file not found"),
        ("missing result key", GOOD.replace("  port: 8883", "  port: 8883\n  result_key: keys/d.key"),
         "mqtt.result_key: file not found"),
        ("missing operator key", GOOD + "commands: {trusted_keys: [keys/op.pub]}\n",
         "commands.trusted_keys.0: file not found"),
    ],
)
def test_bad_config_fails_with_one_line_naming_file_and_key(
    tmp_path: Path, case: str, text: str, expected: str
) -> None:
    (tmp_path / "mqtt.pw").write_text("pw")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"CAM_PW": "x"})
    message = str(info.value)
    assert "\n" not in message, case
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    assert "hunter2" not in message
    assert info.value.code == "config_invalid"


def test_python_tag_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = f"device_id: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(ConfigError):
        parse_config(text, "x.yaml")
    assert not marker.exists()


def test_state_dir_that_cannot_be_created_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("")
    (tmp_path / "mqtt.pw").write_text("pw")
    path = write(tmp_path, GOOD.replace("state_dir: state", f"state_dir: {blocker}/sub"))
    with pytest.raises(ConfigError, match=r"agent.yaml: state_dir: .*not a directory"):
        load_config(path, environ={"CAM_PW": "x"})


def test_missing_certificate_fails(tmp_path: Path) -> None:
    (tmp_path / "mqtt.pw").write_text("pw")
    text = GOOD + "  tls:\n    enabled: true\n    ca_file: certs/ca.pem\n"
    with pytest.raises(ConfigError, match=r"agent.yaml: mqtt.tls.ca_file: file not found"):
        load_config(write(tmp_path, text), environ={"CAM_PW": "x"})


def test_missing_secret_sources_fail(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt.password_file: cannot read"):
        load_config(write(tmp_path, GOOD), environ={"CAM_PW": "x"})
    (tmp_path / "mqtt.pw").write_text("pw")
    with pytest.raises(ConfigError, match=r"sources.1.password_env: environment variable 'CAM_PW' is not set"):
        load_config(write(tmp_path, GOOD), environ={})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = default_config(cwd=tmp_path, environ={})
    with pytest.raises(ValueError, match="frozen"):
        cfg.device_id = "x"  # type: ignore[misc]


def test_embedded_default_uses_cwd_var(tmp_path: Path) -> None:
    cfg = default_config(cwd=tmp_path, environ={})
    assert cfg.state_dir == tmp_path / "var" / "edge-agent"
    (folder,) = cfg.sources
    assert isinstance(folder, FolderSourceConfig)
    assert folder.path == tmp_path / "var" / "edge-agent" / "inbox"
    assert cfg.mqtt.host == "localhost" and cfg.mqtt.port == 1883


@pytest.mark.parametrize(
    "name", ["examples/crop.yaml", "examples/inspection.yaml", "examples/livestock.yaml", "docker/agent.yaml",
             "docker/agent-jetson.yaml"]
)
def test_example_configs_parse(name: str) -> None:
    path = Path(__file__).resolve().parent.parent / "deploy" / name
    cfg = parse_config(path.read_text(), str(path))
    assert cfg.pipelines


def test_cli_prints_the_documented_schema() -> None:
    import json

    from typer.testing import CliRunner

    from edge_agent.cli import app

    res = CliRunner().invoke(app, ["run", "--schema"])
    assert res.exit_code == 0
    doc = json.loads(res.output)
    assert doc["additionalProperties"] is False
    assert doc["properties"]["mqtt"]["description"]
    assert "password" not in doc["$defs"]["MqttConfig"]["properties"]  # resolved from a file/env, never written
    assert "password_file" in doc["$defs"]["MqttConfig"]["properties"]


def test_state_dir_on_a_read_only_mount_fails(tmp_path: Path) -> None:
    """A real unwritable state directory (even for root): a read-only tmpfs in a private mount namespace."""
    import shutil
    import subprocess
    import sys

    ro = tmp_path / "ro"
    ro.mkdir()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "state_dir: ro/state\nmodels: [{name: m, bundle: x}]\npipelines: [{name: p, kind: plain, model: m}]\n"
    )
    unshare = shutil.which("unshare")
    assert unshare is not None
    script = f"from edge_agent.config import load_config; load_config({str(cfg)!r})"
    shell = f"mount -t tmpfs -o ro,size=1m tmpfs {ro} && exec {sys.executable} -c {script!r}"
    flags = ["-m"] if os.geteuid() == 0 else ["-r", "-m"]
    out = subprocess.run([unshare, *flags, "sh", "-c", shell], capture_output=True, timeout=60, check=False)
    assert out.returncode != 0
    last = out.stderr.decode().strip().splitlines()[-1]
    assert last.endswith(f"ConfigError: {cfg}: state_dir: {ro} is not writable"), last


def test_command_keys_and_bounds_resolve_into_a_policy(tmp_path: Path) -> None:
    (tmp_path / "mqtt.pw").write_text("pw")
    (tmp_path / "keys").mkdir()
    for name in ("c.pub", "op.pub", "d.key"):
        (tmp_path / "keys" / name).write_text("pem")
    text = GOOD.replace("  port: 8883", "  port: 8883\n  ack_keys: [keys/c.pub]\n  result_key: keys/d.key") + (
        "commands:\n  trusted_keys: [keys/op.pub]\n  allow: [ping, set_thresholds]\n"
        "  set_thresholds: {score_min: 0.2, score_max: 0.8}\n"
    )
    cfg = load_config(write(tmp_path, text), environ={"CAM_PW": "x"})
    assert cfg.mqtt.ack_keys == (tmp_path / "keys" / "c.pub",) and cfg.mqtt.result_key == tmp_path / "keys" / "d.key"
    assert cfg.commands.trusted_keys == (tmp_path / "keys" / "op.pub",)
    policy = cfg.commands.policy()
    assert policy.allow == {"ping", "set_thresholds"}
    assert policy.bounds["set_thresholds"]["score"] == (0.2, 0.8)
    assert policy.bounds["set_heartbeat_interval"]["seconds"] == (5.0, 3600.0)  # the defaults
