"""Signed model updates below the running agent: the pure format rules, verified staging, the crash-safe store,
Pipeline.replace_models, probation, the config section and the ``edge-agent models`` commands."""

from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from edge_agent.agent.service import Service
from edge_agent.cli import app
from edge_agent.config import load_config, parse_config
from edge_agent.errors import (
    ConfigError,
    EdgeAgentError,
    UpdateBadSignatureError,
    UpdateCorruptError,
    UpdateNotNewerError,
    UpdateUnknownModelError,
    UpdateUnsafePathError,
    UpdateUnsignedError,
    UpdateUntrustedKeyError,
)
from edge_agent.flow.pipeline import InputItem, Pipeline, PipelineOutput
from edge_agent.types import Classification, Image, Result, Timings
from edge_agent.updates.archive import bundle_from, sign_bundle, stage_update
from edge_agent.updates.format import (
    FileEntry,
    Statement,
    canonical_json,
    check_applicable,
    check_member_name,
    is_newer,
    key_id,
    parse_statement,
    parse_version,
    sign_statement,
    verify_statement,
)
from edge_agent.updates.keys import load_trusted_keys
from edge_agent.updates.manager import OnProbation, Probation, in_force
from edge_agent.updates.store import ModelStore
from tests.support.updates import NAME, bundle_members, copy_bundle, craft, keys, statement_for

T = 20.0
SHA = "a" * 64


# --- versions, names, statements (pure) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "installed", "newer"),
    [
        ("1.0.1", "1.0.0", True),
        ("1.10.0", "1.9.0", True),  # numeric, not string, order
        ("2", "1.99.99", True),
        ("1.0.0", "1.0.0", False),
        ("1.0", "1.0.0", False),  # missing parts are 0
        ("0.9.9", "1.0.0", False),
        ("1.0.0.1", "1.0.0", True),
    ],
)
def test_versions_are_ordered_numerically(candidate: str, installed: str, newer: bool) -> None:
    assert is_newer(candidate, installed) is newer


@pytest.mark.parametrize("bad", ["", "v1", "1.0-beta", "01.2", "1..2", "1.2.3.4.5", "1.0 ", "１.0", "1e3"])
def test_unorderable_versions_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="version"):
        parse_version(bad)


@pytest.mark.parametrize(
    "name",
    ["../x", "bundle/../../etc/passwd", "/etc/passwd", "bundle//x", "bundle/./x", "bundle\\x.onnx", "update.json",
     "other/x", "golden/a/b.png", "bundle/", "bundle/x\x00y", "bundle/.hidden", "bundle/a b"],
)
def test_member_names_outside_the_bundle_are_unsafe(name: str) -> None:
    with pytest.raises(UpdateUnsafePathError):
        check_member_name(name)


def test_member_names_inside_the_bundle_are_kept() -> None:
    assert check_member_name("bundle/model.onnx") == "bundle/model.onnx"
    assert check_member_name("bundle/sub/LICENSE.txt") == "bundle/sub/LICENSE.txt"
    assert check_member_name("golden/part-1.png") == "golden/part-1.png"


def _statement(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": "edge-agent-update/1", "name": NAME, "version": "1.1.0", "golden": None,
        "files": {"bundle/manifest.json": {"sha256": SHA, "size": 10}},
    }
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"format": "edge-agent-update/2"}, UpdateCorruptError),
        ({"version": "1.1.0-rc1"}, UpdateCorruptError),
        ({"name": "../x"}, UpdateCorruptError),
        ({"files": {}}, UpdateCorruptError),
        ({"files": {"bundle/model.onnx": {"sha256": SHA, "size": 1}}}, UpdateCorruptError),  # no manifest
        ({"files": {"bundle/manifest.json": {"sha256": "xyz", "size": 1}}}, UpdateCorruptError),
        ({"files": {"bundle/manifest.json": {"sha256": SHA, "size": -1}}}, UpdateCorruptError),
        ({"files": {"bundle/manifest.json": {"sha256": SHA, "size": 1}, "bundle/../x": {"sha256": SHA, "size": 1}}},
         UpdateUnsafePathError),
        ({"golden": {"file": "golden/x.png", "label": "a"}}, UpdateCorruptError),  # not listed
        ({"extra": 1}, UpdateCorruptError),
    ],
)
def test_malformed_statements_are_refused(changes: dict[str, Any], error: type[EdgeAgentError]) -> None:
    with pytest.raises(error):
        parse_statement(canonical_json(_statement(**changes)))


def test_signature_is_over_the_exact_canonical_bytes(tmp_path: Path) -> None:
    key, public = keys(tmp_path)
    trusted = load_trusted_keys([public])
    st = Statement(NAME, "1.1.0", {"bundle/manifest.json": FileEntry(SHA, 10)})
    body, sig = sign_statement(st, key)
    assert body == canonical_json(st.to_dict()) and b" " not in body
    assert verify_statement(body, sig, trusted) == st
    assert list(trusted) == [key_id(key.public_key())]
    with pytest.raises(UpdateBadSignatureError):  # same document, other bytes: not what was signed
        verify_statement(orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2), sig, trusted)
    with pytest.raises(UpdateBadSignatureError):
        verify_statement(body.replace(b"1.1.0", b"9.1.0"), sig, trusted)
    with pytest.raises(UpdateBadSignatureError):
        verify_statement(body, b'{"algorithm":"ed25519","key_id":"x","signature":"%%%"}', trusted)
    with pytest.raises(UpdateUnsignedError):
        verify_statement(body, None, trusted)
    other, _ = keys(tmp_path / "other")
    with pytest.raises(UpdateUntrustedKeyError):
        verify_statement(*sign_statement(st, other), trusted)


def test_applicability_needs_a_configured_model_and_a_strictly_newer_version() -> None:
    st = Statement(NAME, "1.1.0", {"bundle/manifest.json": FileEntry(SHA, 10)})
    check_applicable(st, {NAME}, {NAME: "1.0.9"})
    with pytest.raises(UpdateUnknownModelError, match="not configured"):
        check_applicable(st, {"crop_disease"}, {})
    with pytest.raises(UpdateNotNewerError, match="not newer"):
        check_applicable(st, {NAME}, {NAME: "1.1.0"})
    with pytest.raises(UpdateNotNewerError, match="cannot order"):
        check_applicable(st, {NAME}, {NAME: "1.1-beta"})


# --- staging and the store (real files) ---------------------------------------------------------------------------


def test_staging_unpacks_a_verified_bundle_and_refusals_leave_nothing(tmp_path: Path) -> None:
    key, public = keys(tmp_path / "keys")
    trusted = load_trusted_keys([public])
    update = tmp_path / "u.update"
    sign_bundle(copy_bundle(tmp_path / "b", "1.1.0"), key, update)
    store = ModelStore(tmp_path / "state" / "models")
    staged = stage_update(update, store.staging_root, trusted)
    assert bundle_from(staged.bundle_dir).manifest.version == "1.1.0"
    assert staged.statement.name == NAME
    members = bundle_members(copy_bundle(tmp_path / "c", "1.2.0"))
    onnx = f"bundle/{NAME}.onnx"
    bad = craft(tmp_path / "bad.update", members, key, payload_override={onnx: members[onnx][:-1] + b"\0"})
    with pytest.raises(EdgeAgentError) as refused:
        stage_update(bad, store.staging_root, trusted)
    assert refused.value.code == "update_checksum_mismatch" and getattr(refused.value, "model", None) == NAME
    assert [p.name for p in store.staging_root.iterdir()] == [staged.root.name]  # the refused one is gone


def _installed_store(tmp_path: Path) -> tuple[ModelStore, Any, Path]:
    key, public = keys(tmp_path / "keys")
    configured = bundle_from(copy_bundle(tmp_path / "models" / NAME, "1.0.0"))
    update = tmp_path / "u.update"
    sign_bundle(copy_bundle(tmp_path / "src", "1.1.0"), key, update)
    store = ModelStore(tmp_path / "state" / "models")
    staged = stage_update(update, store.staging_root, load_trusted_keys([public]))
    return store, configured, store.promote(staged)


def test_crash_between_staging_and_switch_leaves_the_old_model(tmp_path: Path) -> None:
    store, configured, version_dir = _installed_store(tmp_path)
    assert version_dir.is_dir()  # unpacked and promoted ... and then the power goes
    (store.model_dir(NAME) / "current.json.tmp").write_bytes(b'{"current": "1.1')  # half-written pointer
    after = ModelStore(store.root)  # the next start
    after.clean()
    bundle, source = in_force(after, configured)
    assert (bundle.manifest.version, source) == ("1.0.0", "config")
    assert not version_dir.exists() and not after.staging_root.exists()


def test_switch_is_durable_and_rollback_records_why(tmp_path: Path) -> None:
    store, configured, _ = _installed_store(tmp_path)
    store.switch(NAME, "1.1.0", None)
    reopened = ModelStore(store.root)
    reopened.clean()  # keeps what the pointer names
    bundle, source = in_force(reopened, configured)
    assert (bundle.manifest.version, source) == ("1.1.0", "update")
    pointer = reopened.rollback(NAME, "too many errors")
    assert pointer.current is None and pointer.rolled_back is not None
    assert pointer.rolled_back["version"] == "1.1.0" and pointer.rolled_back["reason"] == "too many errors"
    assert in_force(ModelStore(store.root), configured)[0].manifest.version == "1.0.0"
    assert not (store.model_dir(NAME) / "versions" / "1.1.0").exists()  # pruned: nothing names it


def test_damaged_installed_version_falls_back_to_the_configured_bundle(tmp_path: Path) -> None:
    store, configured, version_dir = _installed_store(tmp_path)
    store.switch(NAME, "1.1.0", None)
    onnx = version_dir / f"{NAME}.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10])  # bit rot on the SD card
    bundle, source = in_force(store, configured)
    assert (bundle.manifest.version, source) == ("1.0.0", "config")


# --- Pipeline.replace_models and probation ------------------------------------------------------------------------


class Gated:
    """A model whose predict_bytes waits on ``gate`` (when set) and labels results with its version."""

    def __init__(self, version: str, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.version, self.gate, self.fail = version, gate, fail
        self.started = threading.Event()
        self.calls = 0

    def predict(self, image: Image) -> Result:
        raise AssertionError("not used")

    def predict_bytes(self, data: bytes) -> Result:
        self.calls += 1
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(T)
        if self.fail:
            raise RuntimeError("broken")
        return Result("m", self.version, "classification", (Classification("ok", 1.0, 0),), (8, 8),
                      Timings(0, 0, 0, 0))


class Outbox:
    def __init__(self) -> None:
        self.rows: dict[str, str] = {}

    def add_result(self, input_id: str, *, pipeline: str, model: str, model_version: str, body: dict[str, Any]) -> Any:
        self.rows[input_id] = model_version
        return input_id

    def reject_input(self, input_id: str, code: str, message: str) -> None:
        raise AssertionError(f"{input_id} rejected: {code}")


def _item(i: int) -> InputItem:
    return InputItem(input_id=f"i{i}", pipeline="p", source="t", data=b"x")


def test_replace_models_swaps_between_inputs_and_loses_none() -> None:
    gate = threading.Event()
    old = Gated("1.0", gate)
    outbox = Outbox()
    pipeline = Pipeline("p", [old], outbox, queue_size=32)
    pipeline.start()
    try:
        futures: list[Future[PipelineOutput]] = [pipeline.submit(_item(0))]
        assert old.started.wait(T)  # input 0 is being processed by the old model
        futures += [pipeline.submit(_item(i)) for i in range(1, 11)]  # queued during the swap
        new = Gated("2.0")
        returned = pipeline.replace_models([new])
        assert returned == [old]
        gate.set()
        versions = [f.result(timeout=T).result.model_version for f in futures]
        assert versions == ["1.0"] + ["2.0"] * 10
        assert len(outbox.rows) == 11 and pipeline.failed == 0
        with pytest.raises(ValueError, match="1 workers"):
            pipeline.replace_models([new, new])
    finally:
        pipeline.stop(T)


def test_probation_reruns_failures_on_the_previous_model_and_fails_past_its_budget() -> None:
    failed: list[str] = []
    passed: list[bool] = []
    probation = Probation(5, 0.2, on_fail=failed.append, on_pass=lambda: passed.append(True))
    assert probation.budget == 1
    old, new = Gated("1.0"), Gated("2.0", fail=True)
    wrapped = OnProbation(new, old, probation)
    assert wrapped.predict_bytes(b"x").model_version == "1.0"  # error 1: within budget, served by 1.0
    assert not failed
    assert wrapped.predict_bytes(b"x").model_version == "1.0"  # error 2: over budget
    assert probation.state == "failed" and len(failed) == 1 and "2 errors in its first 2 inputs" in failed[0]
    assert wrapped.predict_bytes(b"x").model_version == "1.0" and new.calls == 2  # failed: straight to 1.0
    good = Probation(3, 0.0, on_fail=failed.append, on_pass=lambda: passed.append(True))
    ok = OnProbation(Gated("3.0"), old, good)
    assert [ok.predict_bytes(b"x").model_version for _ in range(4)] == ["3.0"] * 4
    assert good.state == "passed" and passed == [True] and good.seen == 3


# --- config -------------------------------------------------------------------------------------------------------


BASE = "models:\n  - {name: m, bundle: steel_defects}\npipelines:\n  - {name: p, kind: plain, model: m}\n"


def test_updates_are_off_by_default_and_need_a_trusted_key_when_on(tmp_path: Path) -> None:
    cfg = parse_config(BASE)
    assert cfg.updates.enabled is False and cfg.updates.trusted_keys == ()
    with pytest.raises(ConfigError, match=r"updates\.trusted_keys: updates\.enabled needs at least one trusted key"):
        parse_config(BASE + "updates: {enabled: true}\n", "a.yaml")
    path = tmp_path / "a.yaml"
    path.write_text(BASE + "state_dir: st\nupdates: {enabled: true, trusted_keys: [keys/missing.pub]}\n")
    with pytest.raises(ConfigError, match=r"updates.trusted_keys.0: file not found"):
        load_config(path)
    path.write_text(BASE + "state_dir: st\nupdates: {enabled: false, max_error_rate: 1.5}\n")
    with pytest.raises(ConfigError, match=r"updates\.max_error_rate"):
        load_config(path)
    path.write_text(BASE + "state_dir: st\n")
    assert load_config(path).updates.drop_dir == tmp_path / "st" / "updates"


# --- the command line ---------------------------------------------------------------------------------------------


def _agent_config(tmp_path: Path, public: Path) -> Path:
    copy_bundle(tmp_path / "models" / NAME, "1.0.0")
    path = tmp_path / "agent.yaml"
    path.write_text(f"""\
state_dir: state
models_dir: models
models:
  - {{name: steel, bundle: {NAME}}}
pipelines:
  - {{name: line, kind: plain, model: steel}}
mqtt: {{enabled: false}}
metrics: {{enabled: false}}
updates: {{enabled: true, trusted_keys: [{public}]}}
""")
    return path


def test_cli_keygen_sign_verify_install_then_the_agent_runs_it(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["models", "keygen", str(tmp_path / "keys"), "--json"])
    assert res.exit_code == 0, res.output
    made = orjson.loads(res.stdout)
    private, public = Path(made["private_key"]), Path(made["public_key"])
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    again = runner.invoke(app, ["models", "keygen", str(tmp_path / "keys")])
    assert again.exit_code == 2 and "config_invalid" in again.stderr  # never overwrites a key

    bundle = copy_bundle(tmp_path / "release", "1.1.0")
    update = tmp_path / "usb" / "steel-1.1.0.update"
    res = runner.invoke(app, ["models", "sign", str(bundle), "--key", str(private), "--out", str(update), "--json"])
    assert res.exit_code == 0, res.output
    assert orjson.loads(res.stdout)["version"] == "1.1.0"
    res = runner.invoke(app, ["models", "verify", str(update), "--trusted-key", str(public), "--json"])
    assert res.exit_code == 0 and orjson.loads(res.stdout)["ok"] is True
    other = tmp_path / "other"
    runner.invoke(app, ["models", "keygen", str(other)])
    res = runner.invoke(app, ["models", "verify", str(update), "--trusted-key", str(other / "edge-update.pub")])
    assert res.exit_code == 1 and "update_untrusted_key" in res.stderr

    config = _agent_config(tmp_path, public)
    res = runner.invoke(app, ["models", "install", str(update), "--config", str(config), "--json"])
    assert res.exit_code == 0, res.output
    assert orjson.loads(res.stdout) == {"outcome": "installed", "model": NAME, "version": "1.1.0",
                                        "previous": "1.0.0", "state_dir": str(tmp_path / "state")}
    res = runner.invoke(app, ["models", "install", str(update), "--config", str(config)])
    assert res.exit_code == 1 and "update_not_newer" in res.stderr

    service = Service(load_config(config))
    service.start()
    try:
        assert service.health()["models"] == [{"name": NAME, "version": "1.1.0", "installed_from": "update"}]
        again = runner.invoke(app, ["models", "install", str(update), "--config", str(config)])
        assert again.exit_code == 1 and "is running" in again.stderr  # one writer per state dir
    finally:
        service.stop()
    res = runner.invoke(app, ["models", "rollback", NAME, "--config", str(config), "--json"])
    assert res.exit_code == 0 and orjson.loads(res.stdout)["version"] == "1.0.0"
    res = runner.invoke(app, ["models", "rollback", NAME, "--config", str(config)])
    assert res.exit_code == 1 and "update_rollback_unavailable" in res.stderr


def test_cli_sign_refuses_a_bundle_whose_onnx_does_not_match_its_manifest(tmp_path: Path) -> None:
    runner = CliRunner()
    runner.invoke(app, ["models", "keygen", str(tmp_path / "keys")])
    bundle = copy_bundle(tmp_path / "b", "1.1.0")
    (bundle / f"{NAME}.onnx").write_bytes(b"not the model")
    res = runner.invoke(app, ["models", "sign", str(bundle), "--key", str(tmp_path / "keys" / "edge-update.key"),
                              "--out", str(tmp_path / "u.update")])
    assert res.exit_code == 2 and "checksum_mismatch" in res.stderr
    assert not (tmp_path / "u.update").exists()


def test_statement_helper_lists_every_member(tmp_path: Path) -> None:
    members = bundle_members(copy_bundle(tmp_path / "b", "1.1.0"))
    assert set(statement_for(members).files) == {"bundle/manifest.json", f"bundle/{NAME}.onnx"}
