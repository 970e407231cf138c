"""Staged model rollout (issue 18): ``model_update`` with ``url``/``sha256``/``size``, the agent's fetch from the
coordinator's file server (bounded, resumed with Range, verified), and ``edge-coordinator rollout`` against three
real agents (in-process services, real ONNX model, real keys) on a real Mosquitto.

Given a good update, when it is rolled out with one canary, then the canary installs it and passes probation before
the rest of the fleet is sent the command, and all end on the new version. Given an update that fails on the
canary (smoke test, or errors in probation and a rollback), then the rollout halts at the canary, reports the code,
and the rest of the fleet is never sent the command nor fetches the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import jsonschema
import pytest
from typer.testing import CliRunner

from edge_agent.agent.service import Service, onnx_model_factory
from edge_agent.bundles.bundle import Bundle
from edge_agent.config import ModelConfig, load_config
from edge_agent.coordinator import files
from edge_agent.coordinator.cli import app
from edge_agent.coordinator.files import FileServer, Published
from edge_agent.coordinator.operator import operator_settings
from edge_agent.coordinator.rollout import DeviceProgress, Rollout, RolloutSettings, read_statement
from edge_agent.errors import (
    OverloadedError,
    UpdateChecksumError,
    UpdateFetchError,
    UpdateSmokeTestError,
    UpdateTooLargeError,
)
from edge_agent.flow.pipeline import InputItem, PipelineOutput, Predictor
from edge_agent.protocol import codec
from edge_agent.protocol.commands import CommandError, parse_command
from edge_agent.transport.base import InboundMessage, MqttSettings
from edge_agent.transport.mqtt import PahoTransport
from edge_agent.updates.archive import sign_bundle
from edge_agent.updates.fetch import FetchSpec, fetch, resolve_url
from tests.support.broker import Broker, free_port
from tests.support.updates import NAME, copy_bundle, keys, png
from tests.test_model_update_service import BreaksOnBytes

from .support.wait import wait_for

T = 30.0
SHA = "ab" * 32


# --- the command's arguments (pure) -------------------------------------------------------------------------------


def args_schema() -> dict[str, Any]:
    text = resources.files("edge_agent.protocol").joinpath("schemas").joinpath("model_update.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(loaded)
    return loaded


def schema_ok(args: dict[str, Any]) -> bool:
    return jsonschema.Draft202012Validator(args_schema()).is_valid(args)


def _parse(args: dict[str, Any]) -> dict[str, Any]:
    return parse_command("model_update", orjson_dumps({"id": "u-1", "args": args})).args


def orjson_dumps(value: dict[str, Any]) -> bytes:
    import orjson

    return orjson.dumps(value)


@pytest.mark.parametrize("url", ["http://10.0.0.5:8765/updates/m-1.1.0.update", "https://coord.lan/updates/x",
                                 "updates/m-1.1.0.update", "m-1.1.0.update"])
def test_model_update_takes_a_url_with_its_digest_and_size(url: str) -> None:
    args = _parse({"file": "m-1.1.0.update", "url": url, "sha256": SHA, "size": 1234})
    assert args == {"file": "m-1.1.0.update", "url": url, "sha256": SHA, "size": 1234}
    assert schema_ok(args)  # the published JSON Schema (docs/mqtt.md) agrees
    assert _parse({"file": "m.update"}) == {"file": "m.update"}  # the drop-folder form is unchanged


@pytest.mark.parametrize("args", [
    {"url": "http://c/u"},  # no file name
    {"file": "m.update", "url": "http://c/u"},  # url without digest and size
    {"file": "m.update", "url": "http://c/u", "sha256": SHA},
    {"file": "m.update", "sha256": SHA, "size": 3},
    {"file": "m.update", "url": "ftp://c/u", "sha256": SHA, "size": 3},
    {"file": "m.update", "url": "file:///etc/passwd", "sha256": SHA, "size": 3},
    {"file": "m.update", "url": "http://user:pw@c/u", "sha256": SHA, "size": 3},
    {"file": "m.update", "url": "../../etc/passwd", "sha256": SHA, "size": 3},
    {"file": "m.update", "url": "http://c/a/../b", "sha256": SHA, "size": 3},
    {"file": "m.update", "url": "http://c/u", "sha256": SHA.upper(), "size": 3},
    {"file": "m.update", "url": "http://c/u", "sha256": SHA[:-1], "size": 3},
    {"file": "m.update", "url": "http://c/u", "sha256": SHA, "size": 0},
    {"file": "m.update", "url": "http://c/u", "sha256": SHA, "size": True},
    {"file": "m.update", "url": "http://c/u", "sha256": SHA, "size": 2.5},
])
def test_model_update_refuses_odd_fetch_arguments(args: dict[str, Any]) -> None:
    with pytest.raises(CommandError) as refused:
        _parse(args)
    assert refused.value.code == "command_invalid"
    # the schema agrees, except for a '..' segment inside an absolute URL, which a pattern cannot express
    url = str(args.get("url"))
    assert schema_ok(args) == (url.startswith("http://") and "/../" in url)


# --- fetch from the file server ---------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[FileServer]:
    s = FileServer("127.0.0.1", 0)
    s.start()
    yield s
    s.stop()


def test_fetch_resumes_with_range_verifies_and_bounds(tmp_path: Path, server: FileServer) -> None:
    data = os.urandom(600_000)
    (tmp_path / "m.update").write_bytes(data)
    pub = server.publish(tmp_path / "m.update")
    assert pub.sha256 == hashlib.sha256(data).hexdigest() and pub.size == len(data)
    drop = tmp_path / "drop"
    spec = FetchSpec("m.update", server.url("m.update"), pub.sha256, pub.size)
    part = drop / ".fetch" / f"m.update.{pub.sha256[:16]}.part"  # a download broken after 200 kB
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:200_000])

    path = fetch(spec, drop, base_url=None, max_bytes=1 << 20)

    assert path == drop / "m.update" and path.read_bytes() == data
    assert server.requests == [("m.update", "bytes=200000-", 206)]  # only the missing part travelled
    assert not part.exists()

    # a wrong digest: nothing lands in the drop folder, the part is deleted
    with pytest.raises(UpdateChecksumError):
        fetch(FetchSpec("n.update", spec.url, SHA, pub.size), drop, base_url=None, max_bytes=1 << 20)
    assert not (drop / "n.update").exists() and list((drop / ".fetch").iterdir()) == []
    # bounded: larger than allowed before any request; a server sending more than announced
    before = len(server.requests)
    with pytest.raises(UpdateTooLargeError):
        fetch(spec, drop, base_url=None, max_bytes=pub.size - 1)
    assert len(server.requests) == before
    with pytest.raises(UpdateTooLargeError):
        fetch(FetchSpec("o.update", spec.url, pub.sha256, 1000), drop, base_url=None, max_bytes=1 << 20)
    assert not (drop / "o.update").exists()
    # unknown file: a clear code after its retries
    with pytest.raises(UpdateFetchError) as missing:
        fetch(FetchSpec("p.update", server.url("nope.update"), SHA, 10), drop, base_url=None, max_bytes=1 << 20,
              attempts=2, backoff_s=0.01)
    assert missing.value.code == "update_fetch_failed" and "404" in missing.value.message
    # a relative name resolves against the configured base, and only then
    base = f"http://127.0.0.1:{server.port}"
    assert resolve_url("updates/m.update", base) == server.url("m.update")
    with pytest.raises(UpdateFetchError):
        resolve_url("updates/m.update", None)
    assert resolve_url(server.url("m.update"), base) == server.url("m.update")
    with pytest.raises(UpdateFetchError):  # with a base configured, nothing from elsewhere
        resolve_url("http://198.51.100.7/updates/m.update", base)
    assert fetch(FetchSpec("q.update", "updates/m.update", pub.sha256, pub.size), drop, base_url=base + "/",
                 max_bytes=1 << 20).read_bytes() == data


def test_a_download_broken_midway_resumes_where_it_stopped(
    tmp_path: Path, server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(1_500_000)
    (tmp_path / "m.update").write_bytes(data)
    pub = server.publish(tmp_path / "m.update")
    real_copy = files._copy
    broken: list[int] = []

    def copy_then_break(src: BinaryIO, dst: BinaryIO, n: int) -> None:
        if not broken:  # the first transfer: the link dies after 300 kB (the server closes the connection)
            broken.append(300_000)
            real_copy(src, dst, 300_000)
            raise OSError("link lost")
        real_copy(src, dst, n)

    monkeypatch.setattr(files, "_copy", copy_then_break)
    drop = tmp_path / "drop"
    spec = FetchSpec("m.update", server.url("m.update"), pub.sha256, pub.size)

    path = fetch(spec, drop, base_url=None, max_bytes=1 << 21, backoff_s=0.01)

    assert path.read_bytes() == data
    assert server.requests == [("m.update", "", 200), ("m.update", "bytes=300000-", 206)]


# --- the rollout against three agents ---------------------------------------------------------------------------

DEVICES = ("dev-1", "dev-2", "dev-3")


def agent_config(root: Path, device: str, port: int, models_dir: Path, trusted: Path, operator: Path,
                 base_url: str | None) -> Path:
    text = f"""\
device_id: {device}
state_dir: {root / device}
models_dir: {models_dir}
shutdown_timeout_s: 5
models:
  - name: steel
    bundle: {NAME}
pipelines:
  - name: line
    kind: plain
    model: steel
    workers: 1
    queue_size: 16
mqtt:
  host: 127.0.0.1
  port: {port}
  heartbeat_s: 5
  reconnect_max_s: 1
commands:
  trusted_keys: [{operator}]
metrics:
  enabled: false
updates:
  enabled: true
  trusted_keys: [{trusted}]
  watch: false
  probation_inputs: 3
  max_error_rate: 0.34
"""
    if base_url is not None:
        text += f"  fetch_base_url: {base_url}\n"
    path = root / f"{device}.yaml"
    path.write_text(text)
    return path


class Feeder:
    """Inputs keep arriving on every agent (a camera), so probation can pass or fail."""

    def __init__(self, services: list[Service]) -> None:
        self.services = services
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            futures: list[Future[PipelineOutput]] = []
            for s in self.services:
                n += 1
                with suppress(OverloadedError):
                    futures.append(s.submit(InputItem(input_id=f"{s.cfg.device_id}-{n}", pipeline="line",
                                                      source="test", data=png(n % 7))))
            for f in futures:
                f.result(timeout=T)
            self.stop.wait(0.02)  # the camera's frame interval, not a synchronisation

    def close(self) -> None:
        self.stop.set()
        self.thread.join(T)


@contextmanager
def fleet(tmp_path: Path, factory: Callable[[Bundle, ModelConfig], Predictor],
          base_url: str | None = None, offline: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Agents on DEVICES; those in ``offline`` are stopped (their retained status says so) before inputs flow."""
    models_dir = tmp_path / "models"
    copy_bundle(models_dir / NAME, "1.0.0")
    sign_key, trusted = keys(tmp_path / "keys")
    op_key, op_public = keys(tmp_path / "op-keys", "operator")
    update = tmp_path / "steel-1.1.0.update"
    sign_bundle(copy_bundle(tmp_path / "next" / NAME, "1.1.0"), sign_key, update)
    broker = Broker(tmp_path / "broker")
    broker.start()
    services: list[Service] = []
    server = FileServer("127.0.0.1", 0)
    server.start()
    feeder: Feeder | None = None
    try:
        for device in DEVICES:
            cfg = load_config(agent_config(tmp_path, device, broker.port, models_dir, trusted, op_public, base_url))
            services.append(Service(cfg, model_factory=factory))
            services[-1].start()
        assert wait_for(lambda: all(s.publisher is not None and s.publisher.transport.connected for s in services),
                        T), "the agents did not connect"
        for s in [s for s in services if s.cfg.device_id in offline]:
            s.stop()
            services.remove(s)
        feeder = Feeder(services)
        yield {"services": {s.cfg.device_id: s for s in services}, "server": server, "update": update,
               "op_key": op_key, "broker": broker}
    finally:
        if feeder is not None:
            feeder.close()
        for s in services:
            s.stop()
        server.stop()
        broker.close()


def rollout(env: dict[str, Any], stages: list[list[str]]) -> dict[str, Any]:
    server: FileServer = env["server"]
    published = server.publish(env["update"])
    statement = read_statement(env["update"])
    settings = MqttSettings(host="127.0.0.1", port=env["broker"].port, client_id="operator")
    job = Rollout(PahoTransport(operator_settings(settings)), published, server.url(published.name),
                  statement.name, statement.version, env["op_key"],
                  RolloutSettings(answer_timeout_s=T, install_timeout_s=T, probation_timeout_s=T))
    return job.run(stages)


def version(service: Service) -> str:
    return str(service.health()["models"][0]["version"])


def test_a_good_update_rolls_out_to_the_canary_then_the_fleet(tmp_path: Path) -> None:
    """Through the CLI, as an operator runs it (its own file server); the agents resolve the file's relative url
    against their updates.fetch_base_url."""
    port = free_port()
    with fleet(tmp_path, onnx_model_factory, base_url=f"http://127.0.0.1:{port}/") as env:
        config = tmp_path / "coordinator.yaml"
        config.write_text(f"mqtt:\n  host: 127.0.0.1\n  port: {env['broker'].port}\n  client_id: op\n")
        result = CliRunner().invoke(app, [
            "rollout", str(env["update"]), "--canary", "dev-1", "--device", "dev-2,dev-3", "--config", str(config),
            "--key", str(tmp_path / "op-keys" / "operator.key"), "--port", str(port), "--relative",
            "--answer-timeout", str(T), "--install-timeout", str(T), "--probation-timeout", str(T)])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["file"]["url"] == f"updates/{env['update'].name}"

        assert report["ok"] and report["halted"] is None and report["never_sent"] == []
        by_device = {d["device"]: d for d in report["devices"]}
        assert all(d["state"] == "passed" for d in by_device.values())
        # the fleet was sent the command only after the canary passed probation
        assert by_device["dev-1"]["passed_s"] <= min(by_device["dev-2"]["sent_s"], by_device["dev-3"]["sent_s"])
        assert {version(s) for s in env["services"].values()} == {"1.1.0"}
        for s in env["services"].values():  # fetched, verified, installed, filed under done/
            assert (s.cfg.updates.drop_dir / "done" / env["update"].name).is_file()
        print(f"\nrollout of 3 agents (1 canary + 2): {report['seconds']:.2f} s; stages {report['stages']}")


def factory_failing(mode: str) -> Callable[[Bundle, ModelConfig], Predictor]:
    def factory(bundle: Bundle, mcfg: ModelConfig) -> Predictor:
        if bundle.manifest.version != "1.1.0":
            return onnx_model_factory(bundle, mcfg)
        if mode == "smoke":
            raise UpdateSmokeTestError("the model does not load on this board")
        return BreaksOnBytes(onnx_model_factory(bundle, mcfg))  # passes its smoke test, fails real inputs

    return factory


@pytest.mark.parametrize(("mode", "code"), [("smoke", "update_smoke_test_failed"), ("probation", "rolled_back")])
def test_a_failing_canary_halts_the_rollout_and_the_fleet_never_receives_it(
    tmp_path: Path, mode: str, code: str
) -> None:
    with fleet(tmp_path, factory_failing(mode)) as env:
        report = rollout(env, [["dev-1"], ["dev-2", "dev-3"]])

        assert not report["ok"]
        assert report["halted"]["stage"] == 0 and report["halted"]["device"] == "dev-1"
        assert report["halted"]["code"] == code
        assert report["never_sent"] == ["dev-2", "dev-3"]
        services = env["services"]
        assert {version(s) for s in services.values()} == {"1.0.0"}  # the canary kept or took back 1.0.0
        assert [r[2] for r in env["server"].requests] == [200]  # only the canary fetched the file
        for device in ("dev-2", "dev-3"):
            assert services[device].health()["updates"]["last"] is None  # nothing ever reached them
            assert services[device].publisher.counters["commands_ok"] == 0


class NoTransport:
    """The rollout's transport when a test feeds it messages itself."""

    connected = True

    def start(self, listener: object) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        return 1

    def subscribe(self, filters: Sequence[str], qos: int = 1) -> None: ...

    def ack(self, message: InboundMessage) -> None: ...


def test_a_heartbeat_stands_in_for_lost_update_events(tmp_path: Path) -> None:
    """Events are dropped while an agent is offline; its next heartbeat's health.updates tells the outcome."""
    published = Published("steel-1.1.0.update", tmp_path / "u", 10, SHA)
    job = Rollout(NoTransport(), published, "http://c/u", NAME, "1.1.0", None)
    for device in ("a", "b", "c", "d"):
        job.progress[device] = DeviceProgress(device, 0, state="accepted", sent_at=0.0, sent_wall=1000.0)

    def heartbeat(device: str, last: dict[str, Any], version: str, probation: dict[str, Any] | None) -> None:
        health = {"updates": {"last": last, "models": {NAME: {"version": version, "source": "update",
                                                              "probation": probation}}}}
        payload = codec.heartbeat_payload(device=device, ts=1002.0, state="connected", uptime_s=1.0, outbox={},
                                          publisher={}, health=health)
        job.on_message(InboundMessage(codec.heartbeat_topic(device), codec.dumps(payload)))
        job._drain(0.0)

    installed = {"outcome": "installed", "model": NAME, "version": "1.1.0", "file": published.name, "at": 1001.0}
    heartbeat("a", installed, "1.1.0", {"state": "running", "seen": 1, "of": 3})
    assert job.progress["a"].state == "installed"
    heartbeat("a", installed, "1.1.0", None)
    assert job.progress["a"].state == "passed"
    heartbeat("b", {**installed, "at": 999.0}, "1.1.0", None)  # an outcome from before the command: not ours
    assert job.progress["b"].state == "accepted"
    heartbeat("c", {"outcome": "rejected", "model": NAME, "file": published.name, "code": "update_bad_signature",
                    "message": "m", "at": 1001.0}, "1.0.0", None)
    assert (job.progress["c"].state, job.progress["c"].code) == ("failed", "update_bad_signature")
    heartbeat("d", {"outcome": "rolled_back", "model": NAME, "version": "1.0.0", "from_version": "1.1.0",
                    "reason": "3 errors", "at": 1001.0}, "1.0.0", None)
    assert (job.progress["d"].state, job.progress["d"].code) == ("failed", "rolled_back")


def test_a_device_offline_halts_its_stage_before_anyone_in_it_is_sent_the_update(tmp_path: Path) -> None:
    with fleet(tmp_path, onnx_model_factory, offline=("dev-3",)) as env:
        report = rollout(env, [["dev-1"], ["dev-2", "dev-3"]])

        assert not report["ok"]
        assert report["halted"]["stage"] == 1 and report["halted"]["device"] == "dev-3"
        assert report["halted"]["code"] == "device_offline"
        assert report["never_sent"] == ["dev-2", "dev-3"]
        assert version(env["services"]["dev-1"]) == "1.1.0" and version(env["services"]["dev-2"]) == "1.0.0"


def test_the_cli_refuses_bad_arguments_before_sending_anything(tmp_path: Path) -> None:
    not_an_update = tmp_path / "x.update"
    not_an_update.write_bytes(b"hello")
    runner = CliRunner()
    result = runner.invoke(app, ["rollout", str(not_an_update), "--canary", "dev-1"])
    assert result.exit_code == 2 and "update_corrupt" in result.output
    result = runner.invoke(app, ["rollout", str(not_an_update), "--canary", "dev-1", "--bind", "0.0.0.0"])
    assert result.exit_code == 2 and "--public-url" in result.output
    result = runner.invoke(app, ["rollout", str(not_an_update), "--canary", ","])
    assert result.exit_code == 2 and "--canary names no device" in result.output
