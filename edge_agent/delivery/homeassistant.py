"""Home Assistant MQTT discovery: retained entity configs per device and pipeline, and a retained state per pipeline.

Pure (no I/O): the publisher asks for the messages and sends them. Conventions of Home Assistant's MQTT discovery
(https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery):

* config topic ``<discovery_prefix>/<component>/<node_id>/<object_id>/config``, retained; ``node_id`` is the device id
  with every character outside ``[A-Za-z0-9_-]`` turned into ``_`` (Home Assistant's rule for that level);
* every entity has a ``unique_id`` (``edge_agent_<device>_<pipeline>_<field>``), the same ``device`` block
  (``identifiers: ["edge_agent_<device>"]``) so Home Assistant groups them under one device, and ``availability``
  from the agent's retained ``edge/v1/<device>/status`` (its last will says ``offline``);
* the values come from one retained JSON state per pipeline, ``edge/v1/<device>/state/<pipeline>`` (see
  :meth:`HomeAssistant.state_payload`), picked out with ``value_template``; the backlog sensor reads the heartbeat.

The summary is of the results this agent process has *published* (the first time each): ``results`` and the
totals restart at 0 with the process (``state_class: total_increasing`` sensors take that as a reset).
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from edge_agent import __version__
from edge_agent.protocol import codec

AVAILABILITY_TEMPLATE = "{{ value_json.state }}"
DEFECT_WINDOW = 100
"""Inspection parts the defect rate is computed over (the latest ones)."""

_NODE_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def state_topic(device: str, pipeline: str) -> str:
    return f"{codec.ROOT}/{codec.check_name(device, 'device')}/state/{codec.check_name(pipeline, 'pipeline')}"


def node_id(device: str) -> str:
    """The device id as a discovery topic level (Home Assistant allows ``[A-Za-z0-9_-]`` there)."""
    return _NODE_UNSAFE.sub("_", device)


@dataclass(frozen=True)
class Entity:
    """One Home Assistant entity: ``key`` is the field name in the state payload (or a device-level name)."""

    component: str
    key: str
    name: str
    template: str
    unit: str | None = None
    state_class: str | None = None
    device_class: str | None = None
    icon: str | None = None
    diagnostic: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _pipeline_entities(kind: str) -> list[Entity]:
    results = Entity("sensor", "results", "results", "{{ value_json.results }}", state_class="total_increasing",
                     icon="mdi:counter")
    last = Entity("sensor", "last_result", "last result", "{{ value_json.last_at }}", device_class="timestamp",
                  diagnostic=True)
    confidence = Entity("sensor", "confidence", "confidence", "{{ value_json.confidence }}", unit="%",
                        state_class="measurement", icon="mdi:percent")
    if kind == "crop":
        return [
            Entity("sensor", "diagnosis", "diagnosis", "{{ value_json.diagnosis }}", icon="mdi:leaf"),
            Entity("sensor", "label", "label", "{{ value_json.label }}", icon="mdi:tag"),
            confidence,
            Entity("binary_sensor", "disease", "disease", "{{ 'ON' if value_json.healthy == false else 'OFF' }}",
                   device_class="problem"),
            results,
            last,
        ]
    if kind == "inspection":
        return [
            Entity("sensor", "verdict", "verdict", "{{ value_json.verdict }}", icon="mdi:check-decagram"),
            Entity("sensor", "defect_rate", "defect rate", "{{ value_json.defect_rate }}", unit="%",
                   state_class="measurement", icon="mdi:alert-decagram"),
            Entity("sensor", "defects", "defects", "{{ value_json.defects }}", state_class="total_increasing",
                   icon="mdi:close-octagon"),
            confidence,
            results,
            last,
        ]
    if kind == "livestock":
        return [
            Entity("sensor", "headcount", "headcount", "{{ value_json.headcount }}", state_class="measurement",
                   icon="mdi:cow"),
            Entity("sensor", "in_frame", "in frame", "{{ value_json.in_frame }}", state_class="measurement",
                   icon="mdi:cow"),
            Entity("sensor", "crossed_forward", "crossed forward", "{{ value_json.forward }}",
                   state_class="total_increasing"),
            Entity("sensor", "crossed_backward", "crossed backward", "{{ value_json.backward }}",
                   state_class="total_increasing"),
            results,
            last,
        ]
    return [Entity("sensor", "label", "label", "{{ value_json.label }}", icon="mdi:tag"), confidence, results, last]


@dataclass
class _Summary:
    kind: str
    results: int = 0
    last_at: float | None = None
    values: dict[str, Any] = field(default_factory=dict)
    parts: deque[bool] = field(default_factory=lambda: deque(maxlen=DEFECT_WINDOW))  # True: failed
    defects: int = 0
    dirty: bool = True


def _percent(value: Any) -> float | None:
    return round(float(value) * 100.0, 2) if isinstance(value, (int, float)) else None


def _top_prediction(body: dict[str, Any]) -> dict[str, Any]:
    predictions = body.get("predictions")
    if isinstance(predictions, list) and predictions and isinstance(predictions[0], dict):
        return predictions[0]
    return {}


class HomeAssistant:
    """Discovery configs and per-pipeline state for one device; ``pipelines`` are (name, kind) pairs."""

    def __init__(
        self,
        device_id: str,
        pipelines: Iterable[tuple[str, str]],
        *,
        discovery_prefix: str = "homeassistant",
        state_interval_s: float = 1.0,
    ) -> None:
        self.device_id = codec.check_name(device_id, "device")
        self.prefix = discovery_prefix
        self.state_interval_s = state_interval_s
        self.node = node_id(self.device_id)
        self._summaries = {codec.check_name(name, "pipeline"): _Summary(kind) for name, kind in pipelines}
        self._next_flush = 0.0

    # ------------------------------------------------------------------ discovery
    def _device_block(self) -> dict[str, Any]:
        return {
            "identifiers": [f"edge_agent_{self.device_id}"],
            "name": self.device_id,
            "manufacturer": "edge-agent",
            "model": "edge-agent",
            "sw_version": __version__,
        }

    def _availability(self) -> list[dict[str, str]]:
        return [{
            "topic": codec.status_topic(self.device_id),
            "value_template": AVAILABILITY_TEMPLATE,
            "payload_available": "online",
            "payload_not_available": "offline",
        }]

    def _config(
        self, entity: Entity, object_id: str, name: str, topic: str, *, available: bool = True
    ) -> dict[str, Any]:
        config: dict[str, Any] = {
            "name": name,
            "unique_id": f"edge_agent_{self.device_id}_{object_id}",
            "state_topic": topic,
            "value_template": entity.template,
            "qos": 1,
            "device": self._device_block(),
            "origin": {"name": "edge-agent", "sw_version": __version__},
        }
        if available:
            config["availability"] = self._availability()
        for key, value in (("unit_of_measurement", entity.unit), ("state_class", entity.state_class),
                           ("device_class", entity.device_class), ("icon", entity.icon)):
            if value is not None:
                config[key] = value
        if entity.diagnostic:
            config["entity_category"] = "diagnostic"
        config.update(entity.extra)
        return config

    def discovery(self) -> list[tuple[str, dict[str, Any]]]:
        """Every (config topic, config) of this device, to publish retained."""
        out: list[tuple[str, dict[str, Any]]] = []
        status = Entity("binary_sensor", "status", "status", AVAILABILITY_TEMPLATE, device_class="connectivity",
                        diagnostic=True, extra={"payload_on": "online", "payload_off": "offline"})
        out.append(self._entry(status, "status", "status", codec.status_topic(self.device_id), available=False))
        backlog = Entity("sensor", "backlog", "backlog", "{{ value_json.outbox.backlog }}", state_class="measurement",
                         icon="mdi:tray-full", diagnostic=True)
        out.append(self._entry(backlog, "backlog", "backlog", codec.heartbeat_topic(self.device_id)))
        for pipeline, summary in self._summaries.items():
            topic = state_topic(self.device_id, pipeline)
            for entity in _pipeline_entities(summary.kind):
                out.append(self._entry(entity, f"{pipeline}_{entity.key}", f"{pipeline} {entity.name}", topic))
        return out

    def _entry(self, entity: Entity, object_id: str, name: str, topic: str, *,
               available: bool = True) -> tuple[str, dict[str, Any]]:
        safe = node_id(object_id)
        config_topic = f"{self.prefix}/{entity.component}/{self.node}/{safe}/config"
        return config_topic, self._config(entity, object_id, name, topic, available=available)

    # ------------------------------------------------------------------ state
    def observe(self, pipeline: str, created_at: float, body: dict[str, Any]) -> None:
        """Fold one published result into its pipeline's summary (unknown pipelines are ignored)."""
        summary = self._summaries.get(pipeline)
        if summary is None:
            return
        summary.results += 1
        summary.last_at = created_at
        summary.dirty = True
        sector = body.get("sector") if isinstance(body.get("sector"), dict) else {}
        assert isinstance(sector, dict)
        values = summary.values
        if summary.kind == "crop":
            values["label"] = sector.get("label")
            values["diagnosis"] = sector.get("condition") if sector.get("recognised") else "not recognised"
            values["crop"] = sector.get("crop")
            values["healthy"] = sector.get("healthy")
            values["confidence"] = _percent(sector.get("confidence"))
        elif summary.kind == "inspection":
            failed = sector.get("passed") is False
            summary.parts.append(failed)
            summary.defects += int(failed)
            values["verdict"] = sector.get("verdict")
            values["confidence"] = _percent(sector.get("score"))
        elif summary.kind == "livestock":
            counts = sector.get("counts") if isinstance(sector.get("counts"), dict) else {}
            assert isinstance(counts, dict)
            values["headcount"] = counts.get("unique")
            values["forward"] = counts.get("forward")
            values["backward"] = counts.get("backward")
            values["in_frame"] = sector.get("in_frame")
        else:
            top = _top_prediction(body)
            values["label"] = top.get("label")
            values["confidence"] = _percent(top.get("score"))

    def state_payload(self, pipeline: str, ts: float | None = None) -> dict[str, Any]:
        """``{"v": 1, "kind": "state", "device", "pipeline", "pipeline_kind", "ts", "results", "last_at", ...}``."""
        summary = self._summaries[pipeline]
        payload: dict[str, Any] = {
            "v": codec.PROTOCOL_VERSION,
            "kind": "state",
            "device": self.device_id,
            "pipeline": pipeline,
            "pipeline_kind": summary.kind,
            "ts": time.time() if ts is None else ts,
            "results": summary.results,
            "last_at": (
                datetime.fromtimestamp(summary.last_at, tz=timezone.utc).isoformat()
                if summary.last_at is not None else None
            ),
            **summary.values,
        }
        if summary.kind == "inspection":
            parts = len(summary.parts)
            payload["defects"] = summary.defects
            payload["defect_rate"] = round(100.0 * sum(summary.parts) / parts, 2) if parts else None
            payload["defect_window"] = parts
        return payload

    def states(self, now: float, *, force: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """The (state topic, payload) of every pipeline changed since the last call, at most once per
        ``state_interval_s`` (``force``: every pipeline, now; e.g. after a reconnect)."""
        if not force and now < self._next_flush:
            return []
        self._next_flush = now + self.state_interval_s
        out = []
        for pipeline, summary in self._summaries.items():
            if summary.dirty or force:
                summary.dirty = False
                out.append((state_topic(self.device_id, pipeline), self.state_payload(pipeline)))
        return out
