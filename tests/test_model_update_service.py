"""R12 in the running agent: signed model updates through the drop folder and MQTT commands, with a real ONNX
bundle (a copy of models/steel_defects), real keys and real archives.

Given an agent serving steel_defects 1.0.0 with two workers, when a bad update arrives, then it is refused with its
stable code, filed under rejected/ with a reason, and the model in force answers exactly as before; when a good one
arrives, it is smoke-tested and swapped in while inputs keep flowing (none lost); when the new model fails its smoke
test or errors on its first inputs, the previous one keeps or takes back the work; a restart runs what the pointer
says.
"""

from __future__ import annotations

import tarfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.agent.service import Service, onnx_model_factory
from edge_agent.bundles.bundle import Bundle
from edge_agent.config import ModelConfig, load_config
from edge_agent.errors import OverloadedError, RuntimeBackendError
from edge_agent.flow.pipeline import InputItem, PipelineOutput, Predictor
from edge_agent.protocol.commands import Command, CommandError, parse_command
from edge_agent.types import Image, Result
from edge_agent.updates.archive import sign_bundle
from edge_agent.updates.format import Golden, canonical_json
from tests.support.updates import NAME, bundle_members, copy_bundle, craft, keys, png, statement_for

from .support.wait import wait_for

T = 30.0


@dataclass
class Env:
    root: Path
    models_dir: Path
    key: Ed25519PrivateKey
    other_key: Ed25519PrivateKey
    public: Path


def make_env(root: Path) -> Env:
    models_dir = root / "models"
    copy_bundle(models_dir / NAME, "1.0.0")
    key, public = keys(root / "keys")
    other, _ = keys(root / "other-keys")
    return Env(root, models_dir, key, other, public)


def write_config(env: Env, *, state: str = "state", watch: bool = True, probation: int = 4,
                 max_error_rate: float = 0.25, max_bytes: str = "8MB") -> Path:
    text = f"""\
device_id: dev-1
state_dir: {state}
models_dir: {env.models_dir}
shutdown_timeout_s: 5
models:
  - name: steel
    bundle: {NAME}
pipelines:
  - name: line
    kind: plain
    model: steel
    workers: 2
    queue_size: 64
mqtt:
  enabled: false
metrics:
  enabled: false
updates:
  enabled: true
  trusted_keys: [{env.public}]
  watch: {str(watch).lower()}
  poll_interval_s: 0.05
  probation_inputs: {probation}
  max_error_rate: {max_error_rate}
  max_update_bytes: {max_bytes}
"""
    path = env.root / f"agent-{state}.yaml"
    path.write_text(text)
    return path


def start(config: Path, factory: Callable[[Bundle, ModelConfig], Predictor] = onnx_model_factory) -> Service:
    service = Service(load_config(config), model_factory=factory)
    service.start()
    return service


def submit(service: Service, tag: str, seed: int) -> Future[PipelineOutput]:
    item = InputItem(input_id=f"{tag}-{seed}", pipeline="line", source="test", data=png(seed))
    while True:  # a full queue is back-pressure, not a failure: wait for room
        try:
            return service.submit(item)
        except OverloadedError:
            threading.Event().wait(0.005)


def predictions(outs: list[PipelineOutput]) -> list[Any]:
    return [[p.to_dict() for p in o.result.predictions] for o in outs]


def run_batch(service: Service, tag: str, seeds: range = range(6)) -> list[PipelineOutput]:
    futures = [submit(service, tag, s) for s in seeds]
    return [f.result(timeout=T) for f in futures]


def drop(service: Service, path: Path) -> Path:
    """Put ``path`` into the agent's drop folder the way an operator should: copy, then rename into place."""
    drop_dir = service.cfg.updates.drop_dir
    assert drop_dir is not None
    part = drop_dir / f"{path.name}.part"
    part.write_bytes(path.read_bytes())
    part.rename(drop_dir / path.name)
    return drop_dir / path.name


def reason_of(service: Service, name: str) -> dict[str, Any]:
    drop_dir = service.cfg.updates.drop_dir
    assert drop_dir is not None
    reason = drop_dir / "rejected" / f"{name}.reason.json"
    assert wait_for(reason.is_file, T), f"{name} was not rejected"
    doc: dict[str, Any] = orjson.loads(reason.read_bytes())
    return doc


def version_in_force(service: Service) -> str:
    return str(service.health()["models"][0]["version"])


# --- the bad updates of R12, each with its code -----------------------------------------------------------------------


def _good_members(env: Env, version: str = "1.1.0", **changes: Any) -> dict[str, bytes]:
    d = env.root / "src" / f"{version}-{len(changes)}-{sorted(changes)}"
    return bundle_members(copy_bundle(d, version, **changes))


def _unsigned(env: Env, out: Path) -> Path:
    return craft(out, _good_members(env), None)


def _untrusted(env: Env, out: Path) -> Path:
    return craft(out, _good_members(env), env.other_key)


def _bad_signature(env: Env, out: Path) -> Path:
    members = _good_members(env)
    tampered = canonical_json({**statement_for(members).to_dict(), "version": "9.0.0"})
    return craft(out, members, env.key, statement_bytes=tampered)


def _garbage(env: Env, out: Path) -> Path:
    out.write_bytes(b"MZ\x90\x00 this is not a tar archive at all " * 200)
    return out


def _truncated(env: Env, out: Path) -> Path:
    full = craft(env.root / "full.tar", _good_members(env), env.key)
    out.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return out


def _checksum(env: Env, out: Path) -> Path:
    members = _good_members(env)
    onnx = bytearray(members[f"bundle/{NAME}.onnx"])
    onnx[len(onnx) // 2] ^= 0xFF
    return craft(out, members, env.key, payload_override={f"bundle/{NAME}.onnx": bytes(onnx)})


def _checksum_manifest(env: Env, out: Path) -> Path:
    """A manifest changed after signing, same size: still valid JSON, still a valid manifest."""
    members = _good_members(env)
    tampered = members["bundle/manifest.json"].replace(b"Hot-rolled", b"HOT-ROLLED")
    assert tampered != members["bundle/manifest.json"]
    st = statement_for(members)
    members["bundle/manifest.json"] = tampered
    return craft(out, members, env.key, statement=st)


def _traversal(env: Env, out: Path) -> Path:
    members = {**_good_members(env), "bundle/../../../etc/cron.d/evil": b"* * * * * root sh\n"}
    return craft(out, members, env.key)


def _absolute(env: Env, out: Path) -> Path:
    members = _good_members(env)
    st = statement_for(members)
    info = tarfile.TarInfo("/etc/passwd")
    return craft(out, members, env.key, statement=st, extra=[info])


def _symlink(env: Env, out: Path) -> Path:
    members = _good_members(env)
    link = tarfile.TarInfo(f"bundle/{NAME}.onnx")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    members.pop(f"bundle/{NAME}.onnx")
    return craft(out, members, env.key, statement=statement_for(_good_members(env)), extra=[link])


def _hardlink(env: Env, out: Path) -> Path:
    members = _good_members(env)
    link = tarfile.TarInfo("bundle/LICENSE")
    link.type, link.linkname = tarfile.LNKTYPE, "/etc/shadow"
    return craft(out, members, env.key, statement=statement_for({**members, "bundle/LICENSE": b""}), extra=[link])


def _too_large(env: Env, out: Path) -> Path:
    members = {**_good_members(env), "bundle/padding.bin": b"\0" * (5 * 1000 * 1000)}
    return craft(out, members, env.key)


def _manifest_invalid(env: Env, out: Path) -> Path:
    return craft(out, _good_members(env, task="segmentation"), env.key)


def _manifest_mismatch(env: Env, out: Path) -> Path:
    members = _good_members(env, "1.1.0")
    return craft(out, members, env.key, statement=statement_for(members, version="1.2.0"))


def _same_version(env: Env, out: Path) -> Path:
    members = _good_members(env, "1.0.0")
    return craft(out, members, env.key, statement=statement_for(members, version="1.0.0"))


def _older(env: Env, out: Path) -> Path:
    members = _good_members(env, "0.9.0")
    return craft(out, members, env.key, statement=statement_for(members, version="0.9.0"))


def _unknown_model(env: Env, out: Path) -> Path:
    members = _good_members(env, "1.1.0", name="tile_anomaly")
    return craft(out, members, env.key, statement=statement_for(members, name="tile_anomaly"))


def _smoke_labels(env: Env, out: Path) -> Path:
    """Validates and loads, but its manifest names 7 labels for a 6-class output."""
    labels = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches", "rust"]
    return craft(out, _good_members(env, labels=labels), env.key)


def _smoke_golden(env: Env, out: Path) -> Path:
    """Ships a golden image with a label the model does not give it."""
    members = _good_members(env)
    members["golden/part.png"] = png(1234)
    return craft(out, members, env.key,
                 statement=statement_for(members, golden=Golden("golden/part.png", GOLDEN["wrong_label"])))


GOLDEN = {"wrong_label": "__set_by_the_serving_fixture__"}

CASES: dict[str, tuple[Callable[[Env, Path], Path], str]] = {
    "unsigned": (_unsigned, "update_unsigned"),
    "untrusted_key": (_untrusted, "update_untrusted_key"),
    "bad_signature": (_bad_signature, "update_bad_signature"),
    "garbage": (_garbage, "update_corrupt"),
    "truncated": (_truncated, "update_corrupt"),
    "checksum": (_checksum, "update_checksum_mismatch"),
    "checksum_manifest": (_checksum_manifest, "update_checksum_mismatch"),
    "path_traversal": (_traversal, "update_unsafe_path"),
    "absolute_path": (_absolute, "update_unsafe_path"),
    "symlink": (_symlink, "update_unsafe_path"),
    "hardlink": (_hardlink, "update_unsafe_path"),
    "too_large": (_too_large, "update_too_large"),
    "manifest_invalid": (_manifest_invalid, "update_manifest_invalid"),
    "manifest_statement_mismatch": (_manifest_mismatch, "update_manifest_invalid"),
    "same_version": (_same_version, "update_not_newer"),
    "older_version": (_older, "update_not_newer"),
    "unknown_model": (_unknown_model, "update_unknown_model"),
    "smoke_wrong_output_shape": (_smoke_labels, "update_smoke_test_failed"),
    "smoke_golden_mismatch": (_smoke_golden, "update_smoke_test_failed"),
}


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Env, Service, list[Any]]]:
    env = make_env(tmp_path_factory.mktemp("r12"))
    service = start(write_config(env))
    try:
        baseline = predictions(run_batch(service, "baseline"))
        golden_label = run_batch(service, "golden", range(1234, 1235))[0].result.predictions[0]
        labels = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
        GOLDEN["wrong_label"] = next(lb for lb in labels if lb != getattr(golden_label, "label", None))
        yield env, service, baseline
    finally:
        service.stop()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_update_is_refused_with_its_code_and_the_model_keeps_serving(
    serving: tuple[Env, Service, list[Any]], case: str
) -> None:
    env, service, baseline = serving
    build, code = CASES[case]
    update = build(env, env.root / f"{case}.update")
    # inputs in flight while the bad update is examined all complete, on the model in force
    during = [submit(service, f"during-{case}", s) for s in range(6)]
    drop(service, update)
    reason = reason_of(service, update.name)
    assert reason["code"] == code, reason
    assert reason["message"]
    outs = [f.result(timeout=T) for f in during]
    assert predictions(outs) == baseline
    assert {o.result.model_version for o in outs} == {"1.0.0"}
    assert predictions(run_batch(service, f"after-{case}")) == baseline
    assert version_in_force(service) == "1.0.0"
    status = service.health()["updates"]
    assert status["last"]["outcome"] == "rejected" and status["last"]["code"] == code
    assert status["models"][NAME]["source"] == "config"
    # nothing of the refused update stays on disk
    store = service.cfg.state_dir / "models"
    assert not list((store / ".staging").glob("*")) if (store / ".staging").exists() else True
    assert not (store / NAME / "current.json").exists()
    assert not list((store / NAME / "versions").glob("*")) if (store / NAME / "versions").exists() else True
    rejected = service.registry.get_sample_value(
        "edge_agent_model_updates_total", {"model": NAME, "outcome": "rejected"}
    ) or 0.0
    unknown = service.registry.get_sample_value(
        "edge_agent_model_updates_total", {"model": "unknown", "outcome": "rejected"}
    ) or 0.0
    assert rejected + unknown >= 1


# --- a good update ----------------------------------------------------------------------------------------------------


def signed_update(env: Env, version: str, golden: tuple[bytes, str] | None = None, **changes: Any) -> Path:
    bundle = copy_bundle(env.root / "src" / f"good-{version}", version, **changes)
    out = env.root / f"{NAME}-{version}.update"
    image = None
    if golden is not None:
        image = env.root / "src" / "golden.png"
        image.write_bytes(golden[0])
    sign_bundle(bundle, env.key, out, golden=image, golden_label=golden[1] if golden else None)
    return out


def test_good_update_swaps_in_while_inputs_keep_flowing_and_restart_keeps_it(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    config = write_config(env)
    service = start(config)
    futures: list[Future[PipelineOutput]] = []
    stop = threading.Event()

    def feed() -> None:
        i = 0
        while not stop.is_set():
            futures.append(submit(service, "flow", i))
            i += 1

    feeder = threading.Thread(target=feed)
    try:
        before = run_batch(service, "before")
        feeder.start()
        assert wait_for(lambda: len(futures) >= 10, T)
        top = before[0].result.predictions[0]
        drop(service, signed_update(env, "1.1.0", golden=(png(0), getattr(top, "label", ""))))  # passes its golden
        assert wait_for(lambda: (service.health()["updates"]["last"] or {}).get("outcome") == "installed", T)
        n_at_swap = len(futures)
        assert wait_for(lambda: len(futures) >= n_at_swap + 20, T)
        stop.set()
        feeder.join(T)
        outs = [f.result(timeout=T) for f in futures]  # every accepted input has its result: none lost or failed
        assert len(outs) == len(futures) and all(o.stored is not None for o in outs)
        versions = [o.result.model_version for o in outs]
        assert versions[0] == "1.0.0" and set(versions) == {"1.0.0", "1.1.0"}
        assert set(versions[n_at_swap + 2:]) == {"1.1.0"}  # submitted after the swap (2 workers may still be busy)
        assert version_in_force(service) == "1.1.0"
        after = run_batch(service, "after")
        assert predictions(after) == predictions(before)  # same weights, new version
        assert {o.result.model_version for o in after} == {"1.1.0"}
        assert service.health()["models"][0]["installed_from"] == "update"
        # passed (more inputs than probation_inputs): the updater thread releases the previous models
        assert wait_for(lambda: service.health()["updates"]["models"][NAME]["probation"] is None, T)
        assert not any(hasattr(m, "probation") for m in service.pipelines["line"].models)
        done = service.cfg.updates.drop_dir / "done" / f"{NAME}-1.1.0.update"  # type: ignore[operator]
        assert wait_for(done.is_file, T)
        assert service.registry.get_sample_value(
            "edge_agent_model_updates_total", {"model": NAME, "outcome": "installed"}) == 1.0
        gauge = service.registry.get_sample_value
        assert gauge("edge_agent_model_version", {"model": NAME, "version": "1.1.0"}) == 1
        assert gauge("edge_agent_model_version", {"model": NAME, "version": "1.0.0"}) is None
    finally:
        stop.set()
        if feeder.is_alive():
            feeder.join(T)
        service.stop()
    # restart: the pointer says 1.1.0
    service = start(config)
    try:
        assert version_in_force(service) == "1.1.0"
        assert {o.result.model_version for o in run_batch(service, "restarted")} == {"1.1.0"}
    finally:
        service.stop()


# --- rollback ---------------------------------------------------------------------------------------------------------


class BreaksOnBytes:
    """A real model that passes its smoke test (blank image) and then fails every real input: a broken driver."""

    def __init__(self, model: Predictor) -> None:
        self.model = model
        self.calls = 0

    def predict(self, image: Image) -> Result:
        return self.model.predict(image)

    def predict_bytes(self, data: bytes) -> Result:
        self.calls += 1
        raise RuntimeBackendError("execution provider lost its device")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def test_new_model_erroring_on_its_first_inputs_is_rolled_back_and_no_input_fails(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    config = write_config(env, probation=6, max_error_rate=0.34)  # 2 errors allowed of 6, the 3rd rolls back
    broken: list[BreaksOnBytes] = []

    def factory(bundle: Bundle, mcfg: ModelConfig) -> Predictor:
        model = onnx_model_factory(bundle, mcfg)
        if bundle.manifest.version == "1.2.0":
            broken.append(BreaksOnBytes(model))
            return broken[-1]
        return model

    service = start(config, factory)
    try:
        baseline = predictions(run_batch(service, "base"))
        drop(service, signed_update(env, "1.2.0"))
        assert wait_for(lambda: version_in_force(service) == "1.2.0", T)
        outs = run_batch(service, "probation", range(6))  # every one succeeds: errors are re-run on 1.0.0
        assert predictions(outs) == baseline
        assert {o.result.model_version for o in outs} == {"1.0.0"}
        assert wait_for(lambda: (service.health()["updates"]["last"] or {}).get("outcome") == "rolled_back", T)
        assert sum(b.calls for b in broken) >= 3  # a 4th may have started on the other worker as the 3rd failed
        last = service.health()["updates"]["last"]
        assert last["version"] == "1.0.0" and last["from_version"] == "1.2.0"
        assert "3 errors" in last["reason"] and "execution provider lost its device" in last["reason"]
        assert version_in_force(service) == "1.0.0"
        assert predictions(run_batch(service, "after")) == baseline
        pointer = orjson.loads((service.cfg.state_dir / "models" / NAME / "current.json").read_bytes())
        assert pointer["current"] is None and pointer["rolled_back"]["version"] == "1.2.0"
        assert service.registry.get_sample_value(
            "edge_agent_model_updates_total", {"model": NAME, "outcome": "rolled_back"}) == 1.0
    finally:
        service.stop()
    service = start(config)  # the rollback is durable
    try:
        assert version_in_force(service) == "1.0.0"
    finally:
        service.stop()


def test_commands_install_from_the_drop_folder_and_roll_back(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    service = start(write_config(env, watch=False, probation=2))
    try:
        update = signed_update(env, "2.0.0")
        placed = drop(service, update)
        assert placed.is_file() and version_in_force(service) == "1.0.0"  # not watched: waits for the command
        cmd = parse_command("model_update", orjson.dumps({"id": "u-1", "args": {"file": update.name}}))
        assert service.handle_command(cmd)["accepted"] is True
        assert wait_for(lambda: version_in_force(service) == "2.0.0", T)
        assert wait_for(lambda: not placed.exists(), T)  # filed under done/
        with pytest.raises(CommandError) as missing:
            service.handle_command(Command("u-2", "model_update", {"file": "nope.update"}))
        assert missing.value.code == "update_not_found"
        with pytest.raises(CommandError):
            parse_command("model_update", orjson.dumps({"id": "u-3", "args": {"file": "../etc/passwd"}}))
        run_batch(service, "probation", range(3))  # probation (2 inputs) passes
        assert wait_for(lambda: service.health()["updates"]["models"][NAME]["probation"] is None, T)
        cmd = parse_command("model_rollback", orjson.dumps({"id": "r-1", "args": {"model": NAME}}))
        assert service.handle_command(cmd)["accepted"] is True
        assert wait_for(lambda: version_in_force(service) == "1.0.0", T)
        assert {o.result.model_version for o in run_batch(service, "rolled")} == {"1.0.0"}
        assert service.health()["updates"]["last"]["outcome"] == "rolled_back"
        # nothing left to roll back to: refused, reported, and the model keeps serving
        service.handle_command(Command("r-2", "model_rollback", {"model": NAME}))
        assert wait_for(lambda: service.health()["updates"]["last"]["outcome"] == "rollback_refused", T)
        assert service.health()["updates"]["last"]["code"] == "update_rollback_unavailable"
        assert version_in_force(service) == "1.0.0"
    finally:
        service.stop()


def test_commands_are_refused_when_updates_are_disabled(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    config = write_config(env)
    config.write_text(config.read_text().replace("  enabled: true\n  trusted_keys", "  enabled: false\n  trusted_keys"))
    service = start(config)
    try:
        with pytest.raises(CommandError) as refused:
            service.handle_command(Command("u-1", "model_update", {"file": "x.update"}))
        assert refused.value.code == "command_unsupported"
        assert service.health()["updates"]["watching"] is False
    finally:
        service.stop()


def test_mqtt_model_update_command_and_outcome_events_over_the_fake_broker(tmp_path: Path) -> None:
    from edge_agent.protocol import codec
    from edge_agent.transport.base import MqttSettings, Transport, Will
    from edge_agent.transport.fake import FakeBroker, FakeTransport

    broker = FakeBroker()

    def transports(settings: MqttSettings, will: Will) -> Transport:
        return FakeTransport(broker, will)

    env = make_env(tmp_path)
    config = write_config(env, watch=False)
    config.write_text(config.read_text().replace("mqtt:\n  enabled: false\n", "mqtt:\n  heartbeat_s: 0.2\n"))
    service = Service(load_config(config), transport_factory=transports)
    service.start()

    def events(name: str) -> list[dict[str, Any]]:
        docs = [orjson.loads(p) for t, p in list(broker.published) if t.endswith("/events")]
        return [d for d in docs if d.get("event") == name]

    try:
        assert wait_for(lambda: service.health()["mqtt"] == "connected", T)
        good = drop(service, signed_update(env, "1.1.0"))
        bad = drop(service, craft(env.root / "unsigned.update", _good_members(env, "1.2.0"), None))
        broker.route(codec.command_topic("dev-1", "model_update"),
                     orjson.dumps({"id": "u-1", "args": {"file": bad.name}}), False)
        broker.route(codec.command_topic("dev-1", "model_update"),
                     orjson.dumps({"id": "u-2", "args": {"file": good.name}}), False)
        assert wait_for(lambda: len(events("model_updated")) == 1 and len(events("model_update_rejected")) == 1, T)
        rejected = events("model_update_rejected")[0]["data"]
        assert rejected["code"] == "update_unsigned" and rejected["file"] == "unsigned.update"
        updated = events("model_updated")[0]["data"]
        assert (updated["model"], updated["version"], updated["previous"]) == (NAME, "1.1.0", "1.0.0")
        results = [e["data"] for e in events("command_result")]
        assert {r["id"] for r in results if r["ok"]} == {"u-1", "u-2"}  # accepted; the outcome is the event
        beats = [orjson.loads(p) for t, p in list(broker.published) if t.endswith("/heartbeat")]
        assert wait_for(lambda: any(
            m.get("version") == "1.1.0" and m.get("installed_from") == "update"
            for t, p in list(broker.published) if t.endswith("/heartbeat")
            for m in orjson.loads(p).get("health", {}).get("models", [])), T), beats[-1:]
    finally:
        service.stop()


def test_failed_switch_keeps_the_old_model_serving_and_a_restart_runs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_agent.updates.store import ModelStore

    env = make_env(tmp_path)
    config = write_config(env)
    service = start(config)
    try:
        baseline = predictions(run_batch(service, "base"))
        real_write = ModelStore.write_pointer

        def power_cut(self: ModelStore, name: str, pointer: Any) -> None:
            (self.model_dir(name) / "current.json.tmp").write_bytes(b'{"current": "1.')  # torn write
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(ModelStore, "write_pointer", power_cut)
        update = drop(service, signed_update(env, "1.1.0"))
        reason = reason_of(service, update.name)
        assert reason["code"] == "update_invalid" and "Input/output error" in reason["message"]
        assert version_in_force(service) == "1.0.0"
        assert predictions(run_batch(service, "after")) == baseline
        assert not (service.cfg.state_dir / "models" / NAME / "versions" / "1.1.0").exists()
        monkeypatch.setattr(ModelStore, "write_pointer", real_write)
    finally:
        service.stop()
    service = start(config)
    try:
        assert version_in_force(service) == "1.0.0"
        assert predictions(run_batch(service, "restarted")) == baseline
    finally:
        service.stop()


def test_update_superseding_one_on_probation_then_rollback_during_probation(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    config = write_config(env, probation=1000)  # probation outlasts the test
    service = start(config)

    def installed(version: str) -> Callable[[], bool]:
        return lambda: (service.health()["updates"]["last"] or {}).get("version") == version

    try:
        drop(service, signed_update(env, "1.1.0"))
        assert wait_for(installed("1.1.0"), T)
        assert {o.result.model_version for o in run_batch(service, "a")} == {"1.1.0"}
        drop(service, signed_update(env, "1.2.0"))
        assert wait_for(installed("1.2.0"), T)
        status = service.health()["updates"]["models"][NAME]
        assert status["previous"] == "1.1.0" and status["probation"]["state"] == "running"
        assert {o.result.model_version for o in run_batch(service, "b")} == {"1.2.0"}
        assert len(service.pipelines["line"].models) == 2
        service.handle_command(Command("r-1", "model_rollback", {"model": NAME}))  # from memory: on probation
        assert wait_for(lambda: version_in_force(service) == "1.1.0", T)
        assert {o.result.model_version for o in run_batch(service, "c")} == {"1.1.0"}
        assert not any(hasattr(m, "probation") for m in service.pipelines["line"].models)
    finally:
        service.stop()
    service = start(config)
    try:
        assert version_in_force(service) == "1.1.0"
        assert service.health()["updates"]["models"][NAME]["rolled_back"]["version"] == "1.2.0"
    finally:
        service.stop()
