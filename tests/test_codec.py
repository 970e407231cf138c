"""Topics, payloads and command validation: pure functions, checked against the JSON Schemas."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import jsonschema
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.protocol import codec, signing
from edge_agent.protocol.commands import MAX_COMMAND_BYTES, CommandError, CommandPolicy, check_policy, parse_command
from edge_agent.updates.format import key_id


def schema(kind: str) -> dict[str, Any]:
    text = resources.files("edge_agent.protocol").joinpath("schemas").joinpath(f"{kind}.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def valid(kind: str, payload: dict[str, Any]) -> None:
    jsonschema.validate(json.loads(codec.dumps(payload)), schema(kind), cls=jsonschema.Draft202012Validator)


def test_every_schema_is_a_valid_draft_2020_12_schema() -> None:
    for kind in ("result", "ack", "status", "heartbeat", "event", "command", "coordinator", "alert"):
        jsonschema.Draft202012Validator.check_schema(schema(kind))


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (codec.results_topic("barn-1", "crop"), codec.Topic("barn-1", "results", "crop")),
        (codec.ack_topic("barn-1"), codec.Topic("barn-1", "ack")),
        (codec.status_topic("d.2"), codec.Topic("d.2", "status")),
        (codec.heartbeat_topic("d_3"), codec.Topic("d_3", "heartbeat")),
        (codec.events_topic("d"), codec.Topic("d", "events")),
        (codec.command_topic("d", "ping"), codec.Topic("d", "cmd", "ping")),
    ],
)
def test_topics_round_trip(topic: str, expected: codec.Topic) -> None:
    assert topic.startswith("edge/v1/")
    assert codec.parse_topic(topic) == expected


@pytest.mark.parametrize(
    "topic",
    ["edge/v2/d/status", "edge/v1/d/unknown", "edge/v1/d/results", "edge/v1/+/status", "x", "edge/v1/d/cmd/a/b", ""],
)
def test_foreign_topics_are_refused(topic: str) -> None:
    with pytest.raises(codec.CodecError):
        codec.parse_topic(topic)


@pytest.mark.parametrize("name", ["", "a/b", "+", "#", "x" * 65, "dev ice", "é"])
def test_names_that_would_break_topics_are_refused(name: str) -> None:
    with pytest.raises(codec.CodecError):
        codec.results_topic(name, "p")


def test_coordinator_filters_with_and_without_shared_subscription() -> None:
    assert codec.coordinator_filters()[0] == "edge/v1/+/results/+"
    assert codec.coordinator_filters("g1")[0] == "$share/g1/edge/v1/+/results/+"


def result(**over: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "device": "d1", "epoch": "ab12", "base": 1, "result_id": "0" * 32, "seq": 1, "input_id": "in-1",
        "pipeline": "crop", "model": "leaf", "model_version": "1.0", "created_at": 1.5e9, "sent_at": 1.5e9 + 1,
        "body": {"predictions": [{"label": "Corn___healthy", "score": 0.9, "index": 3}], "timings_ms": {"total": 3.0}},
    }
    fields.update(over)
    return codec.result_payload(**fields)


def test_builders_produce_schema_valid_payloads() -> None:
    valid("result", result())
    valid("ack", codec.ack_payload(device="d1", epoch="ab12", seq=10, ts=1.0))
    valid("status", codec.status_payload(device="d1", state="offline", ts=1.0))
    valid("event", codec.event_payload(device="d1", ts=1.0, event="outbox_corrupt", severity="alarm", data={}))
    valid(
        "heartbeat",
        codec.heartbeat_payload(
            device="d1", ts=1.0, state="degraded", uptime_s=3.0,
            outbox={"backlog": 3, "bytes": 10, "oldest_age_s": 0.5, "dropped": 0}, publisher={"published": 3},
            health={"models": [{"name": "leaf", "version": "1.0"}]},
        ),
    )


def test_result_round_trip_and_field_checks() -> None:
    data = codec.dumps(result())
    assert codec.parse_result(data)["result_id"] == "0" * 32
    for bad in (result(seq="1"), result(seq=True), result(body=[]), result(seq=0), {"kind": "ack"}):
        with pytest.raises(codec.CodecError):
            codec.parse_result(codec.dumps(bad))


@pytest.mark.parametrize(
    "data", [b"", b"not json", b"\xff\xfe\x00", b'{"a": NaN}', b"[1, 2]", b'"text"', b"{" * 10, b"x" * (2 << 20)]
)
def test_loads_refuses_garbage(data: bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.loads(data)


def test_ack_parsing() -> None:
    ack = codec.dumps(codec.ack_payload(device="d", epoch="e", seq=3, ts=1.0))
    assert codec.parse_ack(ack) == codec.Ack("d", "e", 3)
    for bad in ({"kind": "ack", "device": "d", "epoch": "e", "seq": -1}, {"kind": "ack", "device": "d", "seq": 1}):
        with pytest.raises(codec.CodecError):
            codec.parse_ack(codec.dumps(bad))


# ---------------------------------------------------------------- commands (bad MQTT command rows)
@pytest.mark.parametrize(
    ("name", "payload", "code"),
    [
        ("ping", b"", "command_empty"),
        ("ping", b"{not json", "command_not_json"),
        ("ping", b'{"id": "\xff\xfe"}', "command_not_json"),
        ("ping", b'{"id": "a", "args": {"x": NaN}}', "command_not_json"),
        ("ping", b"[1]", "command_not_json"),
        ("ping", b'{"id": "a", "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}', "command_too_large"),
        ("ping", b'{"args": {}}', "command_invalid"),
        ("ping", b'{"id": 5}', "command_invalid"),
        ("ping", b'{"id": "a b"}', "command_invalid"),
        ("reboot_everything", b'{"id": "a"}', "command_unknown"),
        ("ping", b'{"id": "a", "args": {"x": 1}}', "command_invalid"),
        ("ping", b'{"id": "a", "args": []}', "command_invalid"),
        ("ping", b'{"id": "a", "v": 2}', "command_invalid"),
        ("set_heartbeat_interval", b'{"id": "a", "args": {}}', "command_invalid"),
        ("set_heartbeat_interval", b'{"id": "a", "args": {"seconds": "10"}}', "command_invalid"),
        ("set_heartbeat_interval", b'{"id": "a", "args": {"seconds": true}}', "command_invalid"),
        ("set_heartbeat_interval", b'{"id": "a", "args": {"seconds": 1e400}}', "command_not_json"),
        ("set_heartbeat_interval", b'{"id": "a", "args": {"seconds": 0.5}}', "command_invalid"),
        ("set_thresholds", b'{"id": "a", "args": {"pipeline": "crop", "score": -0.1}}', "command_invalid"),
        ("set_thresholds", b'{"id": "a", "args": {"pipeline": "crop", "score": 0.5, "iou": 7}}', "command_invalid"),
        ("set_thresholds", b'{"id": "a", "args": {"pipeline": "crop"}}', "command_invalid"),
        ("set_thresholds", b'{"id": "a", "args": {"pipeline": "../x", "score": 0.5}}', "command_invalid"),
    ],
)
def test_bad_commands_are_refused_with_a_stable_code(name: str, payload: bytes, code: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_command(name, payload)
    assert info.value.code == code


def test_good_commands_parse_and_match_the_schema() -> None:
    cmd = parse_command("set_thresholds", b'{"v": 1, "id": "c-1", "args": {"pipeline": "crop", "score": 0.4}}')
    assert (cmd.id, cmd.name, cmd.args) == ("c-1", "set_thresholds", {"pipeline": "crop", "score": 0.4})
    jsonschema.validate({"v": 1, "id": "c-1", "args": {}}, schema("command"))
    assert parse_command("ping", b'{"id": "p"}').args == {}
    padded = b'{"id": "p", "args": {}}'.ljust(MAX_COMMAND_BYTES, b" ")
    assert parse_command("ping", padded).id == "p"  # exactly at the limit is fine


# ---------------------------------------------------------------- signatures (signing.py)
def test_a_signature_covers_the_wire_form_and_every_field() -> None:
    key = Ed25519PrivateKey.generate()
    trusted = {key_id(key.public_key()): key.public_key()}
    body = {"predictions": [{"label": "x", "score": 0.1 + 0.2}], "odd": float("nan"), "text": "héllo \u2603"}
    signed = signing.sign(result(body=body), key)
    valid("result", signed)
    received = codec.parse_result(codec.dumps(signed))  # NaN went out as null: still the signed bytes
    assert signing.verify(received, trusted) == key_id(key.public_key())
    for field, value in (("seq", 2), ("body", {}), ("device", "d2"), ("extra", 1)):
        with pytest.raises(signing.AuthError) as info:
            signing.verify({**received, field: value}, trusted)
        assert info.value.reason == "bad_signature"
    unsigned = {k: v for k, v in received.items() if k != "sig"}
    for payload, reason in (
        (unsigned, "unsigned"),
        (signing.sign(unsigned, Ed25519PrivateKey.generate()), "untrusted_key"),
        ({**received, "sig": {"algorithm": "ed25519", "key_id": "x", "signature": "%%"}}, "bad_signature"),
        ({**received, "sig": "abc"}, "bad_signature"),
    ):
        with pytest.raises(signing.AuthError) as info:
            signing.verify(payload, trusted)
        assert info.value.reason == reason


@pytest.mark.parametrize(
    ("ts", "exp", "reason"),
    [(800.0, 899.0, "expired"), (800.0, 900.0, None), (None, 2000.0, "from_future"), (1500.0, None, "expired"),
     (1300.0, 1500.0, None), (900.0, 1000.0, None), (1000.0, 5000.0, "too_long"), (1301.0, 1400.0, "from_future"),
     (True, 2000.0, "from_future")],
)
def test_lifetime_checks_allow_the_clock_skew_and_no_more(ts: Any, exp: Any, reason: str | None) -> None:
    payload = {"ts": ts, "exp": exp}
    if reason is None:
        signing.check_lifetime(payload, now=1100.0, skew_s=200.0, max_ttl_s=3600.0)
        return
    with pytest.raises(signing.AuthError) as info:
        signing.check_lifetime(payload, now=1100.0, skew_s=200.0, max_ttl_s=3600.0)
    assert info.value.reason == reason


def test_signed_acks_and_commands_match_their_schemas() -> None:
    key = Ed25519PrivateKey.generate()
    valid("ack", signing.sign(codec.ack_payload(device="d1", epoch="e", seq=3, ts=1.0, exp=301.0), key))
    command = {"v": 1, "id": "c-1", "device": "d1", "name": "ping", "args": {}, "ts": 1.0, "exp": 61.0}
    valid("command", signing.sign(command, key))
    assert parse_command("ping", codec.dumps(signing.sign(command, key))).raw["device"] == "d1"
    with pytest.raises(CommandError) as info:
        parse_command("heartbeat", codec.dumps(command))  # signed for ping, sent on .../cmd/heartbeat
    assert info.value.code == "command_wrong_target"


def test_the_policy_refuses_what_the_allow_list_and_bounds_exclude() -> None:
    policy = CommandPolicy(allow=frozenset({"set_thresholds"}), bounds={"set_thresholds": {"score": (0.1, 0.9)}})
    ok = parse_command("set_thresholds", b'{"id": "a", "args": {"pipeline": "p", "score": 0.9, "iou": 1.0}}')
    check_policy(ok, policy)  # iou has no bound here; score 0.9 is inclusive
    for name, payload, code in (
        ("set_thresholds", b'{"id": "b", "args": {"pipeline": "p", "score": 0.95}}', "command_out_of_bounds"),
        ("set_thresholds", b'{"id": "c", "args": {"pipeline": "p", "score": 0.05}}', "command_out_of_bounds"),
        ("ping", b'{"id": "d"}', "command_not_allowed"),
    ):
        with pytest.raises(CommandError) as info:
            check_policy(parse_command(name, payload), policy)
        assert (info.value.code, info.value.command_id) == (code, json.loads(payload)["id"])


# ---------------------------------------------------------------- what the coordinator accepts from a device
def hb(**over: Any) -> dict[str, Any]:
    payload = codec.heartbeat_payload(
        device="d1", ts=1.0, state="connected", uptime_s=1.0,
        outbox={"backlog": 0, "bytes": 0, "oldest_age_s": 0.0, "dropped": 0}, publisher={}, health={},
    )
    payload.update(over)
    return payload


RESULTS = codec.results_topic("d1", "crop")


@pytest.mark.parametrize(
    ("topic", "data", "reason"),
    [
        (RESULTS, codec.dumps(result(seq=2**63)), "int_out_of_range"),
        (RESULTS, codec.dumps(result(seq=2**64 - 1)), "int_out_of_range"),
        (RESULTS, codec.dumps(result(base=2**63, seq=5)), "int_out_of_range"),
        (RESULTS, codec.dumps(result(seq=0)), "int_out_of_range"),
        (RESULTS, b'{"v":1,"kind":"result","seq":18446744073709551616}', "field_invalid"),  # a float to orjson
        (RESULTS, codec.dumps(result(seq=3, base=5)), "seq_invalid"),
        (RESULTS, codec.dumps(result(seq=True)), "field_invalid"),
        (RESULTS, codec.dumps(result(input_id="a\x00b")), "field_invalid"),  # PostgreSQL TEXT refuses NUL
        (RESULTS, codec.dumps(result(input_id="x" * 257)), "field_invalid"),
        (RESULTS, codec.dumps(result(epoch="")), "field_invalid"),
        (RESULTS, codec.dumps(result(result_id="G" * 32)), "field_invalid"),
        (RESULTS, codec.dumps(result(created_at=-1.0)), "field_invalid"),
        (RESULTS, codec.dumps(result(body=[])), "field_invalid"),
        (RESULTS, codec.dumps(result(device="d2")), "device_mismatch"),
        (RESULTS, codec.dumps(result(pipeline="other")), "field_invalid"),
        (RESULTS, codec.dumps(result(body={"x": "@"})).replace(b'"@"', b"[" * 70 + b"]" * 70), "too_deep"),
        (RESULTS, b"[" * 2000 + b"]" * 2000, "too_deep"),
        (RESULTS, b'{"v":1,"kind":"result","x":"\\ud800"}', "not_json"),
        (RESULTS, b"\xff", "not_json"),
        (RESULTS, b"x" * (1 << 20 + 1), "too_large"),
        (RESULTS, codec.dumps({**result(), "v": 2}), "kind_invalid"),
        (RESULTS, codec.dumps({**result(), "kind": "heartbeat"}), "kind_invalid"),
        ("edge/v1/d1/results/a b", codec.dumps(result()), "topic_invalid"),
        ("edge/v1/coordinator/results/crop", codec.dumps(result(device="coordinator")), "topic_invalid"),
        (codec.heartbeat_topic("d1"), b'{"v":1,"kind":"heartbeat","health":' + b"[" * 300 + b"]" * 300 + b"}",
         "too_deep"),
        (codec.heartbeat_topic("d1"), codec.dumps(hb(outbox=[1])), "field_invalid"),  # the dashboard reads it
        (codec.heartbeat_topic("d1"), codec.dumps(hb(state="hacked")), "field_invalid"),
        (codec.heartbeat_topic("d1"), codec.dumps(hb(ts="now")), "field_invalid"),
        (codec.status_topic("d1"), codec.dumps(codec.status_payload(device="d1", state="online", ts=1.0))[:-1]
         + b',"pad":"' + b"x" * 5000 + b'"}', "too_large"),
        (codec.status_topic("d1"), b'{"v":1,"kind":"status","device":"d1","state":"gone","ts":1}', "field_invalid"),
        (codec.events_topic("d1"), codec.dumps(codec.event_payload(
            device="d1", ts=1.0, event="Bad Name", severity="info", data={})), "field_invalid"),
        (codec.ack_topic("d1"), codec.dumps(codec.ack_payload(device="d1", epoch="e", seq=1, ts=1.0)),
         "topic_invalid"),
    ],
)
def test_hostile_device_messages_are_refused_with_a_stable_reason(topic: str, data: bytes, reason: str) -> None:
    with pytest.raises(codec.CodecError) as info:
        codec.parse_device_message(topic, data)
    assert info.value.reason == reason, info.value.message
    assert reason in codec.REASONS


def test_good_device_messages_parse_to_typed_messages() -> None:
    def parse(topic: str, data: bytes) -> codec.DeviceMessage:
        checked = codec.parse_device_message(topic, data)
        assert checked is not None
        message, value = checked
        assert value == json.loads(data)  # the decoded JSON too: what a signature covers, the whole heartbeat
        return message

    parsed = parse(RESULTS, codec.dumps(result(seq=2**63 - 1, base=2**63 - 1)))
    assert isinstance(parsed, codec.ResultMessage) and parsed.seq == 2**63 - 1
    assert isinstance(parse(codec.heartbeat_topic("d1"), codec.dumps(hb())), codec.HeartbeatMessage)
    status = codec.dumps(codec.status_payload(device="d1", state="offline", ts=2.0))
    assert parse(codec.status_topic("d1"), status) == codec.StatusMessage(
        v=1, kind="status", device="d1", state="offline", ts=2.0)
    assert codec.parse_device_message(codec.status_topic("d1"), b"") is None  # a cleared retained status
    event = codec.event_payload(device="d1", ts=1.0, event="outbox_corrupt", severity="alarm", data={"a": 1})
    assert isinstance(parse(codec.events_topic("d1"), codec.dumps(event)), codec.EventMessage)
    # unknown fields are ignored (v1 is additive), a signature among them
    assert isinstance(parse(RESULTS, codec.dumps({**result(), "new_field": [1], "sig": {}})), codec.ResultMessage)


def test_the_coordinator_status_round_trips_and_coordinator_is_no_device_name() -> None:
    online = codec.coordinator_status_payload(state="online", coordinator="c1", session="ab12", ts=1.0)
    offline = codec.coordinator_status_payload(state="offline", coordinator="c1", session=None, ts=1.0)
    valid("coordinator", online)
    valid("coordinator", offline)
    assert codec.parse_coordinator_status(codec.dumps(online)) == codec.CoordinatorStatus("online", "ab12")
    assert codec.parse_coordinator_status(codec.dumps(offline)) == codec.CoordinatorStatus("offline", None)
    for bad in ({**online, "session": ""}, {**online, "kind": "status"}, {**online, "state": "maybe"}):
        with pytest.raises(codec.CodecError):
            codec.parse_coordinator_status(codec.dumps(bad))
    assert codec.coordinator_status_topic() == "edge/v1/coordinator/status"
    with pytest.raises(codec.CodecError):
        codec.results_topic("coordinator", "p")
    with pytest.raises(codec.CodecError):
        codec.parse_topic(codec.coordinator_status_topic())
