"""Reject outputs behind one small interface, :class:`RejectSignal`: ``signal(decision)`` (and ``release()`` at
the end of a pulse). Adapters:

- :class:`MqttEventSignal`: a ``part_rejected`` (and, opt-in, ``part_passed``) event on the events topic;
- :class:`WebhookSignal`: an HTTP POST of the decision as JSON (urllib, timeout, bounded retries);
- :class:`ModbusSignal`: write a coil or a holding register of a PLC over Modbus TCP (``pymodbus``, the
  ``modbus`` extra, imported when the first output is built);
- :class:`GpioSignal`: drive a GPIO line through libgpiod (``gpiod`` >= 2, imported lazily). Tested against a fake
  line only: not verified on hardware here.

Each output runs on its own :class:`SignalLane` thread, so a slow webhook never delays the PLC and signalling
never blocks an inference worker; a lane serialises its output's writes (in decision order) and ends a pulse
(``pulse_s``) by calling ``release`` unless a newer reject extended it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from edge_agent.config import GpioOutputConfig, LineOutput, ModbusOutputConfig, MqttOutputConfig, WebhookOutputConfig
from edge_agent.errors import EdgeAgentError, MissingDependencyError

log = logging.getLogger(__name__)

DecisionValue = Literal["reject", "pass"]
Cause = Literal["verdict", "deadline", "error", "overloaded"]


@dataclass(frozen=True)
class Decision:
    """What the line is told about one part. ``cause`` is ``verdict`` when the inspection answered in time;
    otherwise the recipe's fail-safe was signalled because of a ``deadline``, an ``error`` or ``overloaded``."""

    recipe: str
    part_id: str
    decision: DecisionValue
    cause: Cause
    input_id: str
    trigger: str
    deadline_ms: float
    triggered_at: float = field(compare=False)
    """``time.monotonic()`` of the trigger (latency is measured from here)."""
    decided_at: float = field(compare=False)
    verdict: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def fail_safe(self) -> bool:
        return self.cause != "verdict"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "recipe": self.recipe,
            "part_id": self.part_id,
            "decision": self.decision,
            "cause": self.cause,
            "fail_safe": self.fail_safe,
            "input_id": self.input_id,
            "trigger": self.trigger,
            "deadline_ms": self.deadline_ms,
            "elapsed_ms": round((self.decided_at - self.triggered_at) * 1000.0, 3),
        }
        if self.verdict is not None:
            for key in ("verdict", "reasons", "defects", "score", "defect_type"):
                if key in self.verdict:
                    out[key] = self.verdict[key]
        return out


class RejectSignal(Protocol):
    """One reject output. ``signal`` raises on failure (the lane counts and logs it); ``pulse_s`` > 0 asks the
    lane to call ``release`` that long after a reject (0: never)."""

    name: str
    pulse_s: float

    def signal(self, decision: Decision) -> None: ...
    def release(self) -> None: ...
    def close(self) -> None: ...


class SignalError(EdgeAgentError):
    code = "signal_failed"


# --- MQTT event ---------------------------------------------------------------------------------------------------

PublishEvent = Callable[[str, str, dict[str, Any]], None]


class MqttEventSignal:
    def __init__(self, cfg: MqttOutputConfig, publish: PublishEvent) -> None:
        self.name, self.pulse_s, self._publish, self._on_pass = cfg.name, 0.0, publish, cfg.on_pass

    def signal(self, decision: Decision) -> None:
        data = decision.to_dict()
        if decision.decision == "reject":
            if decision.verdict is not None and "heatmap" in decision.verdict:
                data["heatmap"] = decision.verdict["heatmap"]
            self._publish("part_rejected", "warning", {**data, "signal": "reject"})
        elif self._on_pass:
            self._publish("part_passed", "info", data)

    def release(self) -> None:
        return None

    def close(self) -> None:
        return None


# --- HTTP webhook -------------------------------------------------------------------------------------------------


class WebhookSignal:
    def __init__(self, cfg: WebhookOutputConfig, environ: Mapping[str, str] | None = None) -> None:
        self.name, self.pulse_s, self.cfg = cfg.name, 0.0, cfg
        env = os.environ if environ is None else environ
        self._token = env.get(cfg.token_env) if cfg.token_env else None

    def signal(self, decision: Decision) -> None:
        if decision.decision == "pass" and not self.cfg.on_pass:
            return
        body = json.dumps(decision.to_dict()).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "edge-agent-line"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(min(0.05 * 2 ** (attempt - 1), 1.0))  # bounded backoff between tries
            # the URL is http(s) only (config pattern)
            request = urllib.request.Request(self.cfg.url, data=body, headers=headers, method="POST")  # noqa: S310
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:  # noqa: S310
                    if 200 <= response.status < 300:
                        return
                    last = f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
                if 400 <= exc.code < 500 and exc.code not in (408, 429):
                    break  # the receiver refuses this decision: retrying will not help
            except (urllib.error.URLError, OSError) as exc:
                last = str(getattr(exc, "reason", exc))
        raise SignalError(f"webhook {self.name}: {last}")

    def release(self) -> None:
        return None

    def close(self) -> None:
        return None


# --- Modbus TCP ---------------------------------------------------------------------------------------------------


class ModbusSignal:
    """Writes ``reject_value`` / ``pass_value`` to a coil (non-zero: on) or a holding register."""

    def __init__(self, cfg: ModbusOutputConfig, client_factory: Callable[[ModbusOutputConfig], Any] | None = None):
        self.name, self.cfg = cfg.name, cfg
        self.pulse_s = (cfg.pulse_ms or 0.0) / 1000.0
        self._factory = client_factory or _pymodbus_client
        self._client: Any = None

    def _write(self, value: int) -> None:
        cfg, last = self.cfg, ""
        for _attempt in range(cfg.retries + 1):
            try:
                if self._client is None:
                    self._client = self._factory(cfg)
                if not self._client.connected and not self._client.connect():
                    last = f"cannot connect to {cfg.host}:{cfg.port}"
                    self._drop()
                    continue
                if cfg.coil is not None:
                    reply = self._client.write_coil(cfg.coil, bool(value), device_id=cfg.unit)
                else:
                    assert cfg.holding_register is not None
                    reply = self._client.write_register(cfg.holding_register, value, device_id=cfg.unit)
                if not reply.isError():
                    return
                last = f"device answered {reply}"
            except Exception as exc:  # pymodbus raises its own ModbusException family and OSError
                last = f"{type(exc).__name__}: {exc}"
                self._drop()
        raise SignalError(f"modbus {self.name}: {last}")

    def signal(self, decision: Decision) -> None:
        value = self.cfg.reject_value if decision.decision == "reject" else self.cfg.pass_value
        if value is not None:
            self._write(value)

    def release(self) -> None:
        if self.cfg.pass_value is not None:
            self._write(self.cfg.pass_value)

    def _drop(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                log.debug("modbus %s: close failed", self.name, exc_info=True)
        self._client = None

    def close(self) -> None:
        self._drop()


def _pymodbus_client(cfg: ModbusOutputConfig) -> Any:
    try:
        from pymodbus.client import ModbusTcpClient
    except ImportError as exc:  # pragma: no cover - the modbus extra is in dev
        raise MissingDependencyError("a modbus output needs pymodbus: pip install 'edge-agent[modbus]'") from exc
    return ModbusTcpClient(cfg.host, port=cfg.port, timeout=cfg.timeout_s, retries=0, reconnect_delay=0)


# --- GPIO (libgpiod) ----------------------------------------------------------------------------------------------


class GpioLine(Protocol):
    """One output line: ``set(True)`` drives it active (electrical level per ``active_low``)."""

    def set(self, active: bool) -> None: ...
    def close(self) -> None: ...


class _LibgpiodLine:
    """gpiod >= 2 (libgpiod 2.x Python bindings). Not exercised on hardware by the test suite."""

    def __init__(self, cfg: GpioOutputConfig) -> None:
        try:
            import gpiod
            from gpiod.line import Direction, Value
        except ImportError as exc:
            raise MissingDependencyError("a gpio output needs libgpiod 2's Python bindings: pip install gpiod") from exc
        self._line, self._active, self._inactive = cfg.line, Value.ACTIVE, Value.INACTIVE
        settings = gpiod.LineSettings(direction=Direction.OUTPUT, output_value=Value.INACTIVE,
                                      active_low=cfg.active_low)
        self._request = gpiod.request_lines(cfg.chip, consumer="edge-agent", config={cfg.line: settings})

    def set(self, active: bool) -> None:
        self._request.set_value(self._line, self._active if active else self._inactive)

    def close(self) -> None:
        self._request.release()


class GpioSignal:
    """A reject drives the line active for ``pulse_ms``; a pass does nothing."""

    def __init__(self, cfg: GpioOutputConfig, line_factory: Callable[[GpioOutputConfig], GpioLine] | None = None):
        self.name, self.pulse_s = cfg.name, cfg.pulse_ms / 1000.0
        self._line = (line_factory or _LibgpiodLine)(cfg)

    def signal(self, decision: Decision) -> None:
        if decision.decision == "reject":
            self._line.set(True)

    def release(self) -> None:
        self._line.set(False)

    def close(self) -> None:
        self._line.close()


def build_output(cfg: LineOutput, *, publish: PublishEvent | None = None) -> RejectSignal:
    """The adapter for one configured output (``publish``: the agent's event publisher, for ``mqtt``)."""
    if isinstance(cfg, ModbusOutputConfig):
        return ModbusSignal(cfg)
    if isinstance(cfg, WebhookOutputConfig):
        return WebhookSignal(cfg)
    if isinstance(cfg, GpioOutputConfig):
        return GpioSignal(cfg)
    if publish is None:
        raise ValueError(f"output {cfg.name}: an mqtt output needs the MQTT publisher")
    return MqttEventSignal(cfg, publish)


# --- lanes ----------------------------------------------------------------------------------------------------------

_STOP = object()
Observe = Callable[[str, Decision, float, bool], None]
"""(output name, decision, monotonic time the output returned, ok)."""


class SignalLane:
    """One thread per output: decisions are signalled in order; a reject with a pulse is released ``pulse_s``
    later unless another reject came meanwhile (the pulse then runs from the newest)."""

    def __init__(self, output: RejectSignal, observe: Observe | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.output = output
        self._observe = observe
        self._clock = clock
        self._queue: queue.SimpleQueue[Decision | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"line-output-{output.name}", daemon=True)
        self.signalled = 0
        self.errors = 0
        self.last_error: str | None = None
        """Why the newest signal or release failed; None once one succeeds again."""

    def start(self) -> None:
        self._thread.start()

    def put(self, decision: Decision) -> None:
        self._queue.put(decision)

    def stop(self, timeout: float = 2.0) -> bool:
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)
        try:
            self.output.close()
        except Exception:
            log.debug("line output %s: close failed", self.output.name, exc_info=True)
        return not self._thread.is_alive()

    def _run(self) -> None:
        release_at: float | None = None
        while True:
            timeout = None if release_at is None else max(0.0, release_at - self._clock())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                release_at = None
                self._call(self.output.release, None)
                continue
            if item is _STOP:
                if release_at is not None:
                    self._call(self.output.release, None)
                return
            assert isinstance(item, Decision)
            ok = self._call(self.output.signal, item)
            if ok and item.decision == "reject" and self.output.pulse_s > 0:
                release_at = self._clock() + self.output.pulse_s

    def _call(self, fn: Callable[..., None], decision: Decision | None) -> bool:
        try:
            if decision is None:
                fn()
            else:
                fn(decision)
            ok = True
            self.last_error = None
        except Exception as exc:
            ok = False
            self.errors += 1
            self.last_error = str(exc)[:200]
            log.warning("line output %s failed: %s", self.output.name, exc)
        if decision is not None:
            self.signalled += ok
            if self._observe is not None:
                self._observe(self.output.name, decision, self._clock(), ok)
        return ok
