"""Staged model rollout: what ``edge-coordinator rollout`` runs.

The update file is served by the coordinator (``files.py``); each device of a stage gets a signed ``model_update``
command carrying the file's name, URL, sha256 and size; the agent fetches, verifies and installs it and reports on
``edge/v1/<device>/events``. A stage passes when every one of its devices has answered the command, reported
``model_updated`` for the new version and then ``model_probation_passed``, and none rolled back or went offline
during the optional soak. The first failure halts the rollout: later stages are never sent the command.

    stage 1 (canary) -> all passed? -> stage 2 (wave of the fleet) -> ... -> done
                     -> a failure (command refused, model_update_rejected, model_rolled_back, rollback refused,
                        offline, timeout) -> halt, report

Event-driven (no polling of devices): one MQTT connection subscribed to the devices' events, status and heartbeat
topics; a heartbeat's ``health.updates`` stands in for an event lost while the agent was offline.
"""

from __future__ import annotations

import logging
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.coordinator.files import Published
from edge_agent.coordinator.operator import build_command
from edge_agent.errors import UpdateCorruptError
from edge_agent.protocol import codec
from edge_agent.transport.base import InboundMessage, Transport
from edge_agent.updates.format import Statement, parse_statement

log = logging.getLogger(__name__)

FAILED, PASSED = "failed", "passed"


def read_statement(path: Path) -> Statement:
    """The model name and version an update file claims (its ``update.json``; the agents check the signature)."""
    try:
        with tarfile.open(path, "r:") as tf:
            member = tf.getmember("update.json")
            if not member.isfile() or member.size > 1 << 20:
                raise UpdateCorruptError(f"{path}: update.json is not a small regular file")
            data = tf.extractfile(member)
            assert data is not None
            return parse_statement(data.read())
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise UpdateCorruptError(f"{path} is not an update file: {exc}") from exc


@dataclass
class DeviceProgress:
    device: str
    stage: int
    state: str = "pending"  # pending | sent | accepted | installed | passed | failed
    command_id: str | None = None
    code: str | None = None
    message: str | None = None
    sent_at: float | None = None
    sent_wall: float = 0.0
    installed_at: float | None = None
    passed_at: float | None = None

    def to_dict(self, t0: float) -> dict[str, Any]:
        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - t0, 3)

        return {"device": self.device, "stage": self.stage, "state": self.state, "code": self.code,
                "message": self.message, "sent_s": rel(self.sent_at), "installed_s": rel(self.installed_at),
                "passed_s": rel(self.passed_at)}


@dataclass
class RolloutSettings:
    ttl_s: float = 300.0
    answer_timeout_s: float = 30.0
    install_timeout_s: float = 600.0
    probation_timeout_s: float = 3600.0
    soak_s: float = 0.0
    connect_timeout_s: float = 15.0


@dataclass
class Rollout:
    """One rollout of ``published`` (served at ``url``) to ``stages`` of devices, through ``transport``."""

    transport: Transport
    published: Published
    url: str
    model: str
    version: str
    key: Ed25519PrivateKey | None
    settings: RolloutSettings = field(default_factory=RolloutSettings)
    clock: Callable[[], float] = time.monotonic
    on_progress: Callable[[DeviceProgress], None] | None = None

    def __post_init__(self) -> None:
        self._inbox: queue.Queue[InboundMessage] = queue.Queue()
        self._connected = threading.Event()
        self._devices: list[str] = []
        self.progress: dict[str, DeviceProgress] = {}
        self.offline: set[str] = set()

    # --- transport listener (paho's thread) ---------------------------------------------------------------------

    def on_connected(self, session_present: bool) -> None:
        filters = [f for d in self._devices
                   for f in (codec.events_topic(d), codec.status_topic(d), codec.heartbeat_topic(d))]
        self.transport.subscribe(filters, qos=1)
        self._connected.set()

    def on_disconnected(self, reason: str) -> None:
        log.warning("rollout: disconnected from the broker (%s); reconnecting", reason)

    def on_published(self, token: int, ok: bool, reason: str) -> None:
        if not ok:
            log.error("rollout: the broker refused a command (%s)", reason)

    def on_message(self, message: InboundMessage) -> None:
        self._inbox.put(message)

    # --- the run ------------------------------------------------------------------------------------------------

    def run(self, groups: Sequence[Sequence[str]]) -> dict[str, Any]:
        """Roll out stage by stage; returns the report (``ok``, ``halted``, per device progress, timings)."""
        stages = [list(s) for s in groups if s]
        seen: set[str] = set()
        for i, stage in enumerate(stages):
            for device in stage:
                codec.check_name(device, "device")
                if device in seen:
                    raise ValueError(f"device {device} is listed twice")
                seen.add(device)
                self.progress[device] = DeviceProgress(device, i)
        self._devices = [d for s in stages for d in s]
        t0 = self.clock()
        halted: dict[str, Any] | None = None
        stage_times: list[float] = []
        self.transport.start(self)
        try:
            if not self._connected.wait(self.settings.connect_timeout_s):
                halted = {"stage": 0, "device": None, "code": "broker_unreachable",
                          "message": f"no MQTT connection within {self.settings.connect_timeout_s:g} s"}
            # the subscription's retained statuses arrive first; a device already offline fails at its stage
            for i, stage in enumerate(stages if halted is None else []):
                started = self.clock()
                failed = self._run_stage(i, stage)
                stage_times.append(round(self.clock() - started, 3))
                if failed is not None:
                    halted = {"stage": i, "device": failed.device, "code": failed.code, "message": failed.message}
                    break
        finally:
            self.transport.stop(2.0)
        report = {
            "ok": halted is None,
            "model": self.model, "version": self.version,
            "file": {"name": self.published.name, "sha256": self.published.sha256, "size": self.published.size,
                     "url": self.url},
            "stages": [{"devices": s, "seconds": stage_times[i] if i < len(stage_times) else None}
                       for i, s in enumerate(stages)],
            "halted": halted,
            "never_sent": [d for d, p in self.progress.items() if p.sent_at is None],
            "devices": [p.to_dict(t0) for p in self.progress.values()],
            "seconds": round(self.clock() - t0, 3),
        }
        return report

    def _run_stage(self, index: int, devices: list[str]) -> DeviceProgress | None:
        log.info("rollout: stage %d: %s", index, ", ".join(devices))
        self._drain(0.0)
        for device in devices:  # nobody in a stage is sent anything while one of them is known to be offline
            if device in self.offline:
                return self._fail(self.progress[device], "device_offline", "the device is offline (its status)")
        for device in devices:
            p = self.progress[device]
            payload = build_command(device, "model_update", {
                "file": self.published.name, "url": self.url, "sha256": self.published.sha256,
                "size": self.published.size}, key=self.key, ttl_s=self.settings.ttl_s)
            p.command_id = payload["id"]
            if self.transport.publish(codec.command_topic(device, "model_update"), codec.dumps(payload),
                                      qos=1, retain=False) is None:
                return self._fail(p, "publish_failed", "the command could not be published (not connected)")
            p.sent_at, p.sent_wall = self.clock(), time.time()
            self._set(p, "sent")
        s = self.settings
        while True:
            now = self.clock()
            for p in self.progress.values():  # an earlier stage's device rolling back late halts too
                if p.state == FAILED:
                    return p
            for device in devices:
                p = self.progress[device]
                assert p.sent_at is not None
                if p.state == "sent" and now - p.sent_at > s.answer_timeout_s:
                    return self._fail(p, "no_answer", f"no command_result within {s.answer_timeout_s:g} s")
                if p.state in ("sent", "accepted") and now - p.sent_at > s.install_timeout_s:
                    return self._fail(p, "install_timeout", f"no model_updated within {s.install_timeout_s:g} s")
                if (p.state == "installed" and p.installed_at is not None
                        and now - p.installed_at > s.probation_timeout_s):
                    return self._fail(p, "probation_timeout",
                                      f"probation not passed within {s.probation_timeout_s:g} s (too few inputs?)")
            if all(self.progress[d].state == PASSED for d in devices):
                break
            self._drain(0.2)
        soak_end = self.clock() + s.soak_s
        while self.clock() < soak_end:  # watch for a late rollback or a device going offline
            self._drain(min(0.2, max(0.0, soak_end - self.clock())))
            for p in self.progress.values():
                if p.state == FAILED:
                    return p
        return None

    # --- events -------------------------------------------------------------------------------------------------

    def _drain(self, wait_s: float) -> None:
        try:
            message = self._inbox.get(timeout=wait_s) if wait_s > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(message)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, message: InboundMessage) -> None:
        try:
            topic = codec.parse_topic(message.topic)
            doc = codec.loads(message.payload)
        except codec.CodecError:
            return
        p = self.progress.get(topic.device)
        if p is None:
            return
        if doc.get("kind") == "status":
            if doc.get("state") == "offline":
                self.offline.add(p.device)
                if p.state not in ("pending", PASSED, FAILED):  # one that passed may reboot
                    self._fail(p, "device_offline", "the device went offline")
            elif doc.get("state") == "online":
                self.offline.discard(p.device)
            return
        if doc.get("kind") == "heartbeat":
            self._heartbeat(p, doc)
            return
        data = doc.get("data")
        if doc.get("kind") != "event" or not isinstance(data, dict) or p.state in ("pending", FAILED):
            return
        event = doc.get("event")
        mine = data.get("model") == self.model
        if event == "command_result" and data.get("id") == p.command_id:
            if data.get("ok"):
                if p.state == "sent":
                    self._set(p, "accepted")
            else:
                self._fail(p, str(data.get("code")), str(data.get("message")))
        elif event == "model_update_rejected" and data.get("file") == self.published.name:
            self._fail(p, str(data.get("code")), str(data.get("message")))
        elif event == "model_updated" and mine and data.get("version") == self.version:
            p.installed_at = self.clock()
            self._set(p, "installed")
        elif event == "model_probation_passed" and mine and data.get("version") == self.version:
            p.installed_at = p.installed_at or self.clock()
            p.passed_at = self.clock()
            self._set(p, PASSED)
        elif event == "model_rolled_back" and mine and data.get("from_version") == self.version:
            self._fail(p, "rolled_back", str(data.get("reason")))
        elif event == "model_rollback_refused" and mine:
            self._fail(p, "rollback_refused", str(data.get("message")))

    def _heartbeat(self, p: DeviceProgress, doc: dict[str, Any]) -> None:
        """Events are not durable (dropped while an agent is offline): the heartbeat's ``health.updates.last``, when
        it is newer than our command, stands in for a lost ``model_updated`` / ``model_update_rejected`` /
        ``model_rolled_back``; the new version in force out of probation for a lost ``model_probation_passed``."""
        if p.state not in ("sent", "accepted", "installed"):
            return
        health = doc.get("health")
        updates = health.get("updates") if isinstance(health, dict) else None
        if not isinstance(updates, dict):
            return
        last, models = updates.get("last"), updates.get("models")
        status = models.get(self.model) if isinstance(models, dict) else None
        at = last.get("at") if isinstance(last, dict) else None
        if not isinstance(last, dict) or not isinstance(at, int | float) or at < p.sent_wall:
            return  # (agent clock) an outcome from before this command
        outcome = last.get("outcome")
        if outcome == "installed" and last.get("model") == self.model and last.get("version") == self.version:
            if p.state != "installed":
                p.installed_at = self.clock()
                self._set(p, "installed")
            if (isinstance(status, dict) and status.get("version") == self.version
                    and status.get("probation") is None):
                p.passed_at = self.clock()
                self._set(p, PASSED)
        elif outcome == "rejected" and last.get("file") == self.published.name:
            self._fail(p, str(last.get("code")), str(last.get("message")))
        elif outcome == "rolled_back" and last.get("model") == self.model and last.get("from_version") == self.version:
            self._fail(p, "rolled_back", str(last.get("reason")))

    def _set(self, p: DeviceProgress, state: str) -> None:
        p.state = state
        log.info("rollout: %s %s", p.device, state)
        if self.on_progress is not None:
            self.on_progress(p)

    def _fail(self, p: DeviceProgress, code: str, message: str) -> DeviceProgress:
        p.code, p.message = code, message[:500]
        log.error("rollout: %s failed: [%s] %s", p.device, code, message)
        self._set(p, FAILED)
        return p
