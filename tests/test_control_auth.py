"""The authenticated control plane against real processes (issue 13, finding 2): a real Mosquitto (the test's own,
and the shipped deploy/mosquitto config), real MQTT clients, the agent's publisher, the coordinator and its CLI.

Finding: one retained forged ack emptied an agent's outbox (20 of 30 results lost after a broker restart);
forged ``set_thresholds score=1.0`` and ``set_heartbeat_interval 86400`` were accepted; forged results were stored;
anonymous clients were allowed and a client reusing another's client id kicked it off.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.config import CommandsConfig
from edge_agent.protocol import codec, signing
from edge_agent.protocol.commands import Command
from edge_agent.protocol.signing import AgentAuth, CoordinatorAuth
from edge_agent.transport.base import InboundMessage, MqttSettings
from edge_agent.transport.mqtt import PahoTransport
from edge_agent.updates.keys import generate_keys, load_private_key, load_trusted_keys
from tests.support.broker import Broker, ShippedBroker
from tests.support.delivery import start_agent, start_coordinator, wait_until
from tests.support.tls import TlsFiles, make_tls


class Client:
    """A plain MQTT client (an attacker, a watcher): records connects, messages and the broker's verdicts."""

    def __init__(self, port: int, client_id: str, *, username: str | None = None, password: str | None = None,
                 ca_file: Path | None = None, subscribe: tuple[str, ...] = ()) -> None:
        settings = MqttSettings(port=port, client_id=client_id, username=username, password=password,
                                tls=ca_file is not None, ca_file=str(ca_file) if ca_file else None,
                                reconnect_min_s=1, reconnect_max_s=2, connect_timeout_s=2)
        self.transport = PahoTransport(settings)
        self.filters = subscribe
        self.connects = 0
        self.disconnects = 0
        self.messages: list[InboundMessage] = []
        self.verdicts: dict[int, bool] = {}
        self.lock = threading.Lock()
        self.transport.start(self)

    def on_connected(self, session_present: bool) -> None:
        if self.filters:
            self.transport.subscribe(list(self.filters), qos=1)
        self.connects += 1

    def on_disconnected(self, reason: str) -> None:
        self.disconnects += 1

    def on_message(self, message: InboundMessage) -> None:
        with self.lock:
            self.messages.append(message)

    def on_published(self, token: int, ok: bool, reason: str) -> None:
        self.verdicts[token] = ok

    def publish(self, topic: str, payload: dict[str, Any] | bytes, *, retain: bool = False) -> bool:
        """Publish QoS 1 and wait for the broker's verdict: True accepted, False refused (MQTT 5 0x87)."""
        wait_until(lambda: self.transport.connected, 10, "client connected")
        data = payload if isinstance(payload, bytes) else codec.dumps(payload)
        token = self.transport.publish(topic, data, qos=1, retain=retain)
        assert token is not None
        wait_until(lambda: token in self.verdicts, 10, "the broker's PUBACK")
        return self.verdicts[token]

    def events(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            payloads = [json.loads(m.payload) for m in self.messages if m.topic.endswith("/events")]
        return [p["data"] for p in payloads if p.get("event") == name]

    def close(self) -> None:
        self.transport.stop(2)


def keypair(folder: Path, name: str) -> tuple[Ed25519PrivateKey, dict[str, Ed25519PublicKey], Path]:
    """A key pair written by the same code as `edge-agent models keygen`, loaded the way agents load theirs."""
    private, public = generate_keys(folder, name)
    return load_private_key(private), load_trusted_keys([public]), private


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker", persistence=True)
    b.start()
    yield b
    b.close()


@pytest.mark.parametrize("with_keys", [False, True], ids=["demo-no-keys", "coordinator-keys"])
def test_a_forged_retained_ack_no_longer_empties_the_outbox_across_a_broker_restart(
    tmp_path: Path, broker: Broker, with_keys: bool
) -> None:
    """The finding, replayed: 30 results confirmed by the broker, no coordinator yet; a retained forged ack for
    the last seq waits on the broker through a restart; the agent comes back, refuses it, and the coordinator,
    once it runs, stores all 30."""
    coordinator_key, trusted, _ = keypair(tmp_path / "keys", "coordinator")
    auth = AgentAuth(ack_keys=trusted) if with_keys else AgentAuth()
    state = tmp_path / "agent"
    agent = start_agent(state, broker.port, auth=auth)
    accepted = agent.feed([f"in{i}" for i in range(30)])
    wait_until(lambda: agent.publisher.counters["broker_acked"] >= 30, 20, "30 results confirmed by the broker")
    epoch = agent.outbox.epoch
    agent.stop()  # the device reboots
    attacker = Client(broker.port, "mallory")
    try:
        forged = codec.ack_payload(device="dev1", epoch=epoch, seq=30, ts=time.time())
        assert attacker.publish(codec.ack_topic("dev1"), forged, retain=True)
    finally:
        attacker.close()
    broker.terminate()  # a clean stop: the retained ack is persisted and survives the restart
    broker.start()
    watcher = Client(broker.port, "watcher", subscribe=(codec.ack_topic("dev1"),))
    agent = start_agent(state, broker.port, auth=auth)
    coordinator = None
    try:
        wait_until(lambda: any(m.retain for m in watcher.messages), 10, "the forged ack retained after the restart")
        wait_until(lambda: agent.publisher.refusals.counts.get("ack_retained", 0) == 1, 10, "the forged ack refused")
        assert agent.outbox.stats().backlog == 30  # before the fix: 0 (all deleted), and 30 lost for good
        coordinator = start_coordinator(tmp_path / "c.db", broker.port,
                                         auth=CoordinatorAuth(ack_key=coordinator_key) if with_keys else None)
        wait_until(lambda: agent.outbox.stats().backlog == 0, 30, "everything delivered and acknowledged")
        assert coordinator.store.count_results("dev1") == len(accepted) == 30
        assert agent.publisher.counters["acks_refused"] == 1
    finally:
        watcher.close()
        agent.stop()
        if coordinator is not None:
            coordinator.stop()


def test_live_forged_acks_and_results_are_refused_when_keys_are_configured(tmp_path: Path, broker: Broker) -> None:
    coordinator_key, coordinator_pub, _ = keypair(tmp_path / "keys", "coordinator")
    device_key, device_pub, _ = keypair(tmp_path / "keys", "dev1")
    stranger = Ed25519PrivateKey.generate()
    auth = AgentAuth(ack_keys=coordinator_pub, result_key=device_key)
    agent = start_agent(tmp_path / "agent", broker.port, auth=auth)
    attacker = Client(broker.port, "mallory")
    coordinator = None
    try:
        agent.feed([f"in{i}" for i in range(20)])
        wait_until(lambda: agent.publisher.counters["broker_acked"] >= 20, 20, "20 results confirmed by the broker")
        epoch, now = agent.outbox.epoch, time.time()

        def ack(seq: int, device: str = "dev1", ts: float = now, exp: float = now + 300) -> dict[str, Any]:
            return codec.ack_payload(device=device, epoch=epoch, seq=seq, ts=ts, exp=exp)

        forged = {
            "ack_unsigned": ack(20),
            "ack_untrusted_key": signing.sign(ack(20), stranger),
            "ack_expired": signing.sign(ack(20, ts=now - 7200, exp=now - 6900), coordinator_key),  # captured earlier
            "ack_wrong_device": signing.sign(ack(20, device="dev2"), coordinator_key),  # replayed from another device
            "ack_beyond_sent": signing.sign(ack(999), coordinator_key),
        }
        for payload in forged.values():
            assert attacker.publish(codec.ack_topic("dev1"), payload)
        wait_until(lambda: agent.publisher.counters["acks_refused"] == 5, 10, "five forged acks refused")
        assert agent.publisher.refusals.counts == dict.fromkeys(forged, 1)
        assert agent.outbox.stats().backlog == 20
        coordinator = start_coordinator(tmp_path / "c.db", broker.port,
                                        auth=CoordinatorAuth(ack_key=coordinator_key, device_keys={"dev1": device_pub}))
        wait_until(lambda: agent.outbox.stats().backlog == 0, 30, "delivered on the coordinator's signed acks")
        # a forged result (and a genuine one altered) for dev1 is dropped, not stored
        fake = codec.result_payload(device="dev1", epoch=epoch, base=1, result_id="f" * 32, seq=21, input_id="x",
                                    pipeline="p", model="tiny", model_version="1", created_at=now, sent_at=now,
                                    body={"predictions": []})
        assert attacker.publish(codec.results_topic("dev1", "p"), fake)
        altered = signing.sign({**fake, "result_id": "e" * 32}, device_key)
        altered["body"] = {"predictions": [{"label": "fire", "score": 1.0}]}
        assert attacker.publish(codec.results_topic("dev1", "p"), altered)
        wait_until(lambda: coordinator is not None and coordinator.counters["forged"] == 2, 10, "forged results")
        assert coordinator.store.count_results("dev1") == 20
    finally:
        attacker.close()
        agent.stop()
        if coordinator is not None:
            coordinator.stop()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from edge_agent.coordinator.cli import main; main()", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_forged_commands_are_refused_and_the_operator_cli_runs_signed_ones(tmp_path: Path, broker: Broker) -> None:
    """The agent holds the operator's public key and the shipped default bounds: the finding's forged
    ``set_thresholds score=1.0`` and ``set_heartbeat_interval 86400`` change nothing, signed or not."""
    operator_key, operator_pub, operator_file = keypair(tmp_path / "keys", "operator")
    applied: list[Command] = []

    def handler(command: Command) -> dict[str, Any]:
        applied.append(command)
        return {"thresholds": command.args}

    agent = start_agent(tmp_path / "agent", broker.port, auth=AgentAuth(command_keys=operator_pub),
                        policy=CommandsConfig().policy(), handler=handler)
    watcher = Client(broker.port, "watcher", subscribe=(codec.events_topic("dev1"),))
    attacker = Client(broker.port, "mallory")
    try:
        wait_until(lambda: agent.publisher.state == "connected", 10, "agent connected")
        heartbeat = agent.publisher.heartbeat_s
        now = time.time()

        def command(name: str, cid: str, args: dict[str, Any], key: Ed25519PrivateKey | None) -> dict[str, Any]:
            payload = {"v": 1, "id": cid, "device": "dev1", "name": name, "args": args, "ts": now, "exp": now + 60}
            return signing.sign(payload, key) if key is not None else payload

        silence = {"pipeline": "p", "score": 1.0}
        sent = [
            ("set_thresholds", command("set_thresholds", "a1", silence, None)),
            ("set_thresholds", command("set_thresholds", "a2", silence, operator_key)),
            ("set_heartbeat_interval", command("set_heartbeat_interval", "a3", {"seconds": 86400}, None)),
            ("set_heartbeat_interval", command("set_heartbeat_interval", "a4", {"seconds": 86400}, operator_key)),
        ]
        for name, payload in sent:
            assert attacker.publish(codec.command_topic("dev1", name), payload)
        wait_until(lambda: len(watcher.events("command_result")) == 4, 10, "four answers")
        assert [(e["id"], e["code"]) for e in watcher.events("command_result")] == [
            ("a1", "command_unsigned"), ("a2", "command_out_of_bounds"),
            ("a3", "command_unsigned"), ("a4", "command_out_of_bounds"),
        ]
        assert applied == [] and agent.publisher.heartbeat_s == heartbeat
        # the operator's CLI: sign, send, wait for the answer
        op = tmp_path / "operator.yaml"
        op.write_text(f"mqtt: {{port: {broker.port}, client_id: operator}}\n")
        ok = run_cli("command", "dev1", "set_heartbeat_interval", "--args", '{"seconds": 60}',
                     "--key", str(operator_file), "--config", str(op))
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) | {"id": None} == {"id": None, "name": "set_heartbeat_interval", "ok": True,
                                                          "result": {"seconds": 60.0}}
        assert agent.publisher.heartbeat_s == 60
        refused = run_cli("command", "dev1", "set_thresholds", "--args", json.dumps(silence),
                          "--key", str(operator_file), "--config", str(op))
        assert refused.returncode == 1 and json.loads(refused.stdout)["code"] == "command_out_of_bounds"
        unsigned = run_cli("command", "dev1", "ping", "--config", str(op))
        assert unsigned.returncode == 1 and json.loads(unsigned.stdout)["code"] == "command_unsigned"
        assert applied == []
    finally:
        watcher.close()
        attacker.close()
        agent.stop()


def test_the_cli_prints_a_signed_command_without_a_broker(tmp_path: Path) -> None:
    _, trusted, key_file = keypair(tmp_path / "keys", "operator")
    out = run_cli("command", "dev1", "set_thresholds", "--args", '{"pipeline": "crop", "score": 0.5}',
                  "--key", str(key_file), "--ttl", "120", "--id", "t-1", "--print")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert signing.verify(payload, trusted) == next(iter(trusted))
    assert (payload["device"], payload["name"], payload["id"], payload["exp"] - payload["ts"]) == (
        "dev1", "set_thresholds", "t-1", 120)
    bad = run_cli("command", "dev1", "set_thresholds", "--args", '{"pipeline": "crop", "score": 7}', "--print")
    assert bad.returncode == 2 and "command_invalid" in bad.stderr


# ---------------------------------------------------------------------------------------------- the shipped broker

USERS = {"coordinator": "pw-coord", "farm-01": "pw-farm-01", "mallory": "pw-mallory", "operator": "pw-op"}


def connack_code(port: int, ca_file: Path | None = None) -> int:
    """Connect without a user name (MQTT 3.1.1) and return the CONNACK return code (5: not authorised)."""
    packet = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x05\x00\x04anon"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        sock = raw
        if ca_file is not None:
            sock = ssl.create_default_context(cafile=str(ca_file)).wrap_socket(raw, server_hostname="127.0.0.1")
        sock.sendall(packet)
        data = sock.recv(4)
    assert data[:2] == b"\x20\x02", data
    return data[3]


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return make_tls(tmp_path / "tls")


@pytest.mark.parametrize("drop", [(), ("use_username_as_clientid",)], ids=["shipped", "without-username-as-id"])
def test_the_shipped_broker_refuses_strangers_and_client_id_takeovers(
    tmp_path: Path, tls: TlsFiles, drop: tuple[str, ...]
) -> None:
    broker = ShippedBroker(tmp_path / "broker", users=USERS, tls=tls, drop=drop)
    broker.start()
    coordinator = start_coordinator(tmp_path / "c.db", broker.tls_port, client_id="coordinator",
                                    username="coordinator", password=USERS["coordinator"], ca_file=tls.ca)
    agent = start_agent(tmp_path / "agent", broker.tls_port, "farm-01", username="farm-01",
                        password=USERS["farm-01"], ca_file=tls.ca)
    mallory = None
    try:
        assert connack_code(broker.port) == 5 and connack_code(broker.tls_port, tls.ca) == 5  # no anonymous access
        agent.feed([f"a{i}" for i in range(10)])
        wait_until(lambda: agent.outbox.stats().backlog == 0, 30, "the device delivers")
        assert agent.publisher.counters["disconnects"] == 0
        # another device's valid credentials, the victim's client id
        mallory = Client(broker.tls_port, "farm-01", username="mallory", password=USERS["mallory"], ca_file=tls.ca)
        wait_until(lambda: mallory is not None and mallory.connects >= 1, 10, "mallory connected")
        if drop:  # the line matters: without it the broker hands mallory the victim's session
            wait_until(lambda: agent.publisher.counters["disconnects"] >= 1, 10, "the victim kicked off")
            return
        # the broker took mallory's CONNECT before answering it: a takeover would have disconnected the victim by now,
        # and the victim's next round trip would see it
        agent.feed([f"b{i}" for i in range(10)])
        wait_until(lambda: agent.outbox.stats().backlog == 0, 30, "the device still delivers")
        assert agent.publisher.counters["disconnects"] == 0
        assert coordinator.store.count_results("farm-01") == 20
        # the ACL: a device can forge neither another device's acks nor its results, nor send commands
        ack = codec.ack_payload(device="farm-01", epoch=agent.outbox.epoch, seq=99, ts=time.time())
        assert not mallory.publish(codec.ack_topic("farm-01"), ack)
        assert not mallory.publish(codec.results_topic("farm-01", "p"), b"{}")
        assert not mallory.publish(codec.command_topic("farm-01", "ping"), b'{"id": "x"}')
        assert mallory.publish(codec.heartbeat_topic("mallory"), b"{}")  # its own prefix is fine
    finally:
        if mallory is not None:
            mallory.close()
        agent.stop()
        coordinator.stop()
        broker.close()
