"""The line: part-present detection, recipes, the chain, deadlines with fail-safe, and the reject outputs
(Modbus TCP against pymodbus's real server on loopback, a webhook against a real HTTP server, GPIO on a fake
line, the MQTT event)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from edge_agent.config import (
    GpioOutputConfig,
    LineConfig,
    ModbusOutputConfig,
    MqttOutputConfig,
    PipelineConfig,
    WebhookOutputConfig,
    parse_config,
)
from edge_agent.errors import ConfigError, NoFrameError, RecipeUnknownError
from edge_agent.flow.pipeline import InputItem, Pipeline, PipelineOutput, make_sector
from edge_agent.line.controller import LineController, crop
from edge_agent.line.outputs import (
    Decision,
    GpioSignal,
    ModbusSignal,
    MqttEventSignal,
    RejectSignal,
    SignalError,
    SignalLane,
    WebhookSignal,
)
from edge_agent.line.presence import PresenceDetector
from edge_agent.metrics import Metrics
from edge_agent.types import Classification, Image, Result, Timings
from tests.support.api_harness import free_port, wait_for
from tests.support.modbus_server import ModbusServer, modbus_server
from tests.test_pipeline import FakeOutbox

T = 10.0

# --- part-present detection (pure) ---------------------------------------------------------------------------------


def belt(level: int = 80, part: tuple[int, int] | None = None, part_level: int = 220, noise: int = 0,
         seed: int = 0) -> np.ndarray:
    """A 120x160 BGR frame of an empty belt, with a 60x60 part at ``part`` (top-left x, y)."""
    frame = np.full((120, 160, 3), level, np.uint8)
    if noise:
        jitter = np.random.default_rng(seed).integers(-noise, noise + 1, frame.shape)
        frame = np.clip(frame.astype(int) + jitter, 0, 255).astype(np.uint8)
    if part is not None:
        x, y = part
        frame[y:y + 60, x:x + 60] = part_level
    return frame


def test_presence_arrives_after_settle_frames_and_leaves_with_hysteresis() -> None:
    det = PresenceDetector(enter=12.0, leave=6.0, settle_frames=2, size=32)
    assert det.update(belt()) is None  # the first frame is the background
    assert [det.update(belt(noise=3, seed=s)) for s in range(5)] == [None] * 5  # sensor noise: nothing
    assert det.update(belt(part=(50, 30))) is None  # one changed frame is not enough
    assert det.update(belt(part=(50, 30))) == "arrived"
    assert det.present and det.change > 12.0
    assert det.update(belt(part=(50, 30))) is None  # still there: no second trigger
    # most of the part left: the change falls between leave and enter; hysteresis keeps the part present
    half = belt()
    half[30:90, 50:70] = 220  # a third of it: change 8.75
    assert det.update(half) is None and det.present and 6.0 <= det.change < 12.0
    assert det.update(belt()) is None
    assert det.update(belt()) == "left"
    assert det.update(belt(part=(10, 10))) is None
    assert det.update(belt(part=(10, 10))) == "arrived"  # the next part


def test_presence_background_follows_slow_light_changes_but_not_a_part() -> None:
    det = PresenceDetector(enter=12.0, leave=6.0, settle_frames=2, size=32, background_rate=0.2)
    det.update(belt(80))
    events = [det.update(belt(80 + step)) for step in range(1, 60)]  # the light drifts up by 59 grey levels
    assert "arrived" not in events and not det.present
    assert det.update(belt(139, part=(50, 30))) is None
    assert det.update(belt(139, part=(50, 30))) == "arrived"


def test_presence_refuses_inverted_hysteresis() -> None:
    with pytest.raises(ValueError, match="hysteresis"):
        PresenceDetector(enter=5.0, leave=6.0)


def test_crop_takes_the_region_of_interest() -> None:
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[20:60, 100:180] = 255
    out = crop(Image.from_array(pixels, "BGR"), (0.5, 0.2, 0.9, 0.6))
    assert out.pixels.shape == (40, 80, 3) and out.original_size == (80, 40) and out.pixels.min() == 255


# --- the controller with a real pipeline ---------------------------------------------------------------------------


class LineModel:
    """'scratch' (0.9) on a bright image, 'good' (0.9) on a dark one; waits on ``gate`` when given; raises on an
    image whose top-left pixel is 13."""

    def __init__(self, gate: threading.Event | None = None, name: str = "gate") -> None:
        self.gate, self.name, self.calls = gate, name, 0
        self.running = threading.Event()

    def predict(self, image: Image) -> Result:
        self.calls += 1
        self.running.set()
        if self.gate is not None:
            assert self.gate.wait(T)
        if int(image.pixels[0, 0, 0]) == 13:
            raise RuntimeError("model exploded")
        label = "scratch" if image.pixels.mean() > 128 else "good"
        preds = (Classification(label, 0.9, 0),)
        return Result(self.name, "1.0", "classification", preds, image.original_size, Timings(1, 1, 1, 1))

    def predict_bytes(self, data: bytes) -> Result:
        raise AssertionError("line inputs are decoded frames")


class TypeModel(LineModel):
    def predict(self, image: Image) -> Result:
        preds = (Classification("crazing", 0.7, 0), Classification("patches", 0.2, 1), Classification("pits", 0.1, 2))
        return Result("steel", "1.0", "classification", preds, image.original_size, Timings(1, 1, 1, 1))


PIPE = PipelineConfig.model_validate({"name": "parts", "kind": "inspection", "model": "gate",
                                      "inspection": {"pass_labels": ["good"]}})


def line_cfg(port: int, **recipe: Any) -> LineConfig:
    return LineConfig.model_validate({
        "recipes": [
            {"id": "tile-a", "pipeline": "parts", "deadline_ms": 5000, "fail_safe": "reject", "outputs": ["plc"],
             "classify": {"model": "steel", "min_score": 0.5}, **recipe},
            {"id": "tile-fast", "pipeline": "parts", "deadline_ms": 50, "fail_safe": "reject", "outputs": ["plc2"]},
        ],
        "outputs": [
            {"type": "modbus", "name": "plc", "host": "127.0.0.1", "port": port, "coil": 3},
            {"type": "modbus", "name": "plc2", "host": "127.0.0.1", "port": port, "holding_register": 7,
             "reject_value": 2, "pass_value": 1},
        ],
        "max_pending": 4,
    })


class Rig:
    def __init__(self, server: ModbusServer, gate: threading.Event | None = None, queue_size: int = 16,
                 clock: Any = None, **recipe: Any) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.model = LineModel(gate)
        cfg = line_cfg(server.port, **recipe)
        outputs: dict[str, RejectSignal] = {o.name: ModbusSignal(o) for o in cfg.outputs
                                            if isinstance(o, ModbusOutputConfig)}
        self.pipeline: Pipeline | None = None
        self.line = LineController(cfg, pipelines=[PIPE], submit=self.submit, outputs=outputs,
                                   models={"steel": TypeModel()}, metrics=self.metrics,
                                   **({"clock": clock} if clock is not None else {}))
        self.outputs: list[PipelineOutput] = []
        self.pipeline = Pipeline("parts", [self.model], FakeOutbox(), kind="inspection",
                                 sector=self.line.sector_for(make_sector(PIPE)), queue_size=queue_size,
                                 sinks=[("seen", lambda out, _item: self.outputs.append(out))])

    def submit(self, item: InputItem) -> Future[PipelineOutput]:
        assert self.pipeline is not None
        return self.pipeline.submit(item)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def __enter__(self) -> Rig:
        assert self.pipeline is not None
        self.pipeline.start()
        self.line.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.pipeline is not None
        self.pipeline.stop(5)
        self.line.stop(5)


def bright(level: int = 200) -> np.ndarray:
    return np.full((48, 64, 3), level, np.uint8)


@pytest.fixture
def server() -> Iterator[ModbusServer]:
    with modbus_server() as srv:
        yield srv


def test_a_verdict_in_time_writes_the_coil_and_names_the_defect_type(server: ModbusServer) -> None:
    with Rig(server) as rig:
        decision = rig.line.trigger("tile-a", "part-1", frame=bright(), source="api").result(T)
        assert (decision.decision, decision.cause, decision.part_id) == ("reject", "verdict", "part-1")
        assert decision.verdict is not None and decision.verdict["defect_type"]["label"] == "crazing"
        (write,) = server.wait_writes(1)
        assert (write.kind, write.address, write.value) == ("coil", 3, 1)
        assert server.coils(0, 8)[3] is True  # read back over Modbus, as a PLC would
        wait_for(lambda: len(rig.outputs) == 1, T)
        line = rig.outputs[0].sector["line"]
        assert line["late"] is False and line["decision"] == "reject" and line["recipe"] == "tile-a"
        assert rig.outputs[0].sector["defect_type"]["candidates"][0] == {"label": "crazing", "score": 0.7}
        # a good part: the pass value goes to the coil, no defect type (the chain runs on failed parts only)
        good = rig.line.trigger("tile-a", "part-2", frame=bright(40)).result(T)
        assert good.decision == "pass" and good.verdict is not None and "defect_type" not in good.verdict
        assert server.wait_writes(2)[1].value == 0 and server.coils(0, 8)[3] is False
        wait_for(lambda: rig.metric("edge_agent_line_signal_seconds_count", output="plc") == 2, T)
        assert rig.metric("edge_agent_line_decisions_total", recipe="tile-a", decision="reject", cause="verdict") == 1


def test_a_late_verdict_gets_the_fail_safe_at_the_deadline_and_never_signals_again(server: ModbusServer) -> None:
    gate = threading.Event()
    with Rig(server, gate) as rig:
        future = rig.line.trigger("tile-fast", "slow-1", frame=bright(40))  # a good part, but the model is slow
        decision = future.result(T)
        assert (decision.decision, decision.cause, decision.fail_safe) == ("reject", "deadline", True)
        assert decision.decided_at - decision.triggered_at >= 0.05
        (write,) = server.wait_writes(1)
        assert (write.kind, write.address, write.value) == ("register", 7, 2)
        assert server.registers(0, 8)[7] == 2
        assert rig.model.running.is_set() and not rig.outputs  # the verdict is still coming
        gate.set()
        wait_for(lambda: len(rig.outputs) == 1, T)
        line = rig.outputs[0].sector["line"]
        assert line["late"] is True and line["cause"] == "deadline" and line["decision"] == "reject"
        assert rig.outputs[0].sector["verdict"] == "pass"  # recorded as the model saw it
        assert rig.metric("edge_agent_line_late_verdicts_total", recipe="tile-fast") == 1
        assert rig.metric("edge_agent_line_failsafe_total", recipe="tile-fast", cause="deadline") == 1
        # an on-time part after it is signalled as usual; the late verdict wrote nothing in between
        rig.line.trigger("tile-fast", "fast-2", frame=bright(40)).result(T)
        writes = server.wait_writes(2)
        assert [(w.address, w.value) for w in writes] == [(7, 2), (7, 1)]


def test_an_input_that_fails_gets_the_fail_safe_at_once(server: ModbusServer) -> None:
    with Rig(server) as rig:
        frame = bright(40)
        frame[0, 0] = 13  # LineModel raises
        decision = rig.line.trigger("tile-fast", "boom", frame=frame).result(T)
        assert (decision.decision, decision.cause) == ("reject", "error")
        assert server.wait_writes(1)[0].value == 2
        assert rig.metric("edge_agent_line_failsafe_total", recipe="tile-fast", cause="error") == 1
        assert rig.line.pending == 0


def test_too_many_parts_waiting_get_the_fail_safe_without_inference(server: ModbusServer) -> None:
    gate = threading.Event()
    with Rig(server, gate) as rig:
        futures = [rig.line.trigger("tile-a", f"p{i}", frame=bright()) for i in range(5)]  # max_pending 4
        assert futures[4].result(T).cause == "overloaded"
        gate.set()
        assert [f.result(T).cause for f in futures[:4]] == ["verdict"] * 4


def test_unknown_recipe_and_missing_frame_are_refused_before_anything_is_signalled(server: ModbusServer) -> None:
    with Rig(server) as rig:
        with pytest.raises(RecipeUnknownError):
            rig.line.trigger("nope", frame=bright())
        with pytest.raises(NoFrameError):
            rig.line.trigger("tile-a")  # no image and no camera
        assert not server.writes


def test_a_recipe_threshold_and_region_of_interest_decide(server: ModbusServer) -> None:
    with Rig(server, roi=(0.0, 0.0, 0.5, 1.0)) as rig:
        frame = bright(40)
        frame[:, 40:] = 255  # bright only outside the region of interest
        assert rig.line.trigger("tile-a", frame=frame).result(T).decision == "pass"
    with modbus_server() as other, Rig(other, min_score=0.95) as rig:
        assert rig.line.trigger("tile-a", frame=bright()).result(T).decision == "pass"  # 0.9 < the recipe's 0.95


def test_camera_frames_serve_triggers_and_presence(server: ModbusServer) -> None:
    cfg = line_cfg(server.port)
    cfg = cfg.model_copy(update={
        "recipes": tuple(r.model_copy(update={"camera": "cam"}) for r in cfg.recipes),
        "presence": (LineConfig.model_validate({"presence": [{"camera": "cam", "recipe": "tile-a",
                                                             "settle_frames": 1}]}).presence[0],),
    })
    decisions: list[Decision] = []
    rig = Rig(server)
    rig.line = LineController(cfg, pipelines=[PIPE], submit=rig.submit,
                              outputs={"plc": ModbusSignal(cfg.outputs[0])},  # type: ignore[arg-type]
                              models={"steel": TypeModel()})
    assert rig.pipeline is not None
    rig.pipeline._sector = rig.line.sector_for(make_sector(PIPE))
    with rig:
        rig.line.on_frame("cam", belt(40))  # background
        decisions.append(rig.line.trigger("tile-a", "from-camera").result(T))  # the newest frame
        rig.line.on_frame("cam", belt(40, part=(50, 30)))  # a part arrives: a presence trigger
        wait_for(lambda: len(rig.outputs) == 2, T)
        sources = sorted(o.sector["line"]["trigger"] for o in rig.outputs)
        assert sources == ["api", "presence"] and decisions[0].decision == "pass"


# --- the outputs ------------------------------------------------------------------------------------------------


def decision(value: str = "reject") -> Decision:
    return Decision("r", "p1", "reject" if value == "reject" else "pass", "verdict", "l-r-1", "api", 100.0, 0.0, 0.01,
                    {"verdict": "fail", "reasons": ["class:scratch"], "defects": [], "score": 0.9})


class FakeLine:
    def __init__(self) -> None:
        self.values: list[bool] = []
        self.changed = threading.Condition()

    def set(self, active: bool) -> None:
        with self.changed:
            self.values.append(active)
            self.changed.notify_all()

    def close(self) -> None:
        return None


def test_gpio_pulses_the_line_on_a_reject_only() -> None:
    fake = FakeLine()
    cfg = GpioOutputConfig(type="gpio", name="gate", line=17, pulse_ms=30)
    lane = SignalLane(GpioSignal(cfg, line_factory=lambda _c: fake))
    lane.start()
    lane.put(decision("pass"))
    lane.put(decision("reject"))
    with fake.changed:
        assert fake.changed.wait_for(lambda: fake.values == [True, False], T)  # on, then off after the pulse
    lane.stop()


def test_a_modbus_pulse_writes_the_pass_value_back(server: ModbusServer) -> None:
    cfg = ModbusOutputConfig(type="modbus", name="plc", host="127.0.0.1", port=server.port, coil=5, pulse_ms=20)
    lane = SignalLane(ModbusSignal(cfg))
    lane.start()
    lane.put(decision("reject"))
    writes = server.wait_writes(2)
    assert [(w.address, w.value) for w in writes] == [(5, 1), (5, 0)] and writes[1].at - writes[0].at >= 0.02
    lane.stop()


def test_modbus_to_nobody_fails_after_bounded_retries() -> None:
    cfg = ModbusOutputConfig(type="modbus", name="plc", host="127.0.0.1", port=free_port(), coil=0, retries=1,
                             timeout_s=0.2)
    with pytest.raises(SignalError, match="modbus plc"):
        ModbusSignal(cfg).signal(decision())


class Hook(http.server.BaseHTTPRequestHandler):
    statuses: ClassVar[list[int]] = []
    bodies: ClassVar[list[dict[str, Any]]] = []
    auth: ClassVar[list[str | None]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = Hook.statuses.pop(0) if Hook.statuses else 200
        Hook.bodies.append(json.loads(body))
        Hook.auth.append(self.headers.get("Authorization"))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


def test_webhook_retries_a_server_error_then_delivers_the_decision() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        Hook.statuses, Hook.bodies, Hook.auth = [503], [], []
        cfg = WebhookOutputConfig(type="webhook", name="hook", url=f"http://127.0.0.1:{server.server_port}/line",
                                  retries=2, token_env="HOOK_TOKEN")
        WebhookSignal(cfg, environ={"HOOK_TOKEN": "s3cret"}).signal(decision())
        assert len(Hook.bodies) == 2 and Hook.bodies[1]["decision"] == "reject" and Hook.bodies[1]["part_id"] == "p1"
        assert Hook.auth[1] == "Bearer s3cret"
        Hook.statuses = [400]
        with pytest.raises(SignalError, match="HTTP 400"):
            WebhookSignal(cfg).signal(decision())  # the receiver refuses it: no retry
        assert len(Hook.bodies) == 3
    finally:
        server.shutdown()
        server.server_close()


def test_mqtt_output_publishes_part_rejected_with_the_recipe_and_part() -> None:
    events: list[tuple[str, str, dict[str, Any]]] = []
    out = MqttEventSignal(MqttOutputConfig(type="mqtt", name="events"), lambda *e: events.append(e))
    out.signal(decision("reject"))
    out.signal(decision("pass"))
    (event,) = events
    assert event[0] == "part_rejected" and event[2]["recipe"] == "r" and event[2]["part_id"] == "p1"
    assert event[2]["signal"] == "reject" and event[2]["cause"] == "verdict"


# --- configuration ----------------------------------------------------------------------------------------------


BASE = """
models: [{name: gate, bundle: tile_anomaly}, {name: steel, bundle: steel_defects}]
pipelines: [{name: parts, kind: inspection, model: gate}, {name: plain, kind: plain, model: gate}]
sources: [{type: camera, name: cam, pipeline: parts, url: '0', submit_frames: false}]
mqtt: {enabled: false}
line:
  recipes: [{id: tile-a, pipeline: parts, camera: cam, classify: {model: steel}, outputs: [plc]}]
  outputs: [{type: modbus, name: plc, host: 127.0.0.1, coil: 3}]
  presence: [{camera: cam, recipe: tile-a}]
"""


@pytest.mark.parametrize(("old", "new", "message"), [
    ("outputs: [plc]", "outputs: [nope]", "line.recipes.0.outputs.0: unknown output 'nope'"),
    ("pipeline: parts, camera", "pipeline: plain, camera", "line.recipes.0.pipeline: pipeline 'plain' is kind plain"),
    ("camera: cam, classify", "camera: cam2, classify", "line.recipes.0.camera: unknown camera source 'cam2'"),
    ("{model: steel}", "{model: nope}", "line.recipes.0.classify.model: unknown model 'nope'"),
    ("coil: 3", "coil: 3, holding_register: 1", "line.outputs.0.coil: set exactly one of coil or holding_register"),
    ("recipe: tile-a}", "recipe: tile-b}", "line.presence.0.recipe: unknown recipe 'tile-b'"),
    ("recipe: tile-a}", "recipe: tile-a, enter: 5, leave: 6}", "line.presence.0.leave: leave must be below enter"),
    ("outputs: [{type: modbus, name: plc, host: 127.0.0.1, coil: 3}]", "outputs: [{type: mqtt, name: plc}]",
     "line.outputs.0.type: an mqtt output needs mqtt.enabled"),
    ("outputs: [plc]}", "outputs: [plc], deadline_ms: 0}", "line.recipes.0.deadline_ms"),
    ("outputs: [plc]}", "outputs: [plc], roi: [0.5, 0, 0.4, 1]}", "line.recipes.0.roi: roi must be"),
])
def test_bad_recipes_are_refused_with_their_key(old: str, new: str, message: str) -> None:
    parse_config(BASE)
    assert old in BASE
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(BASE.replace(old, new))


def test_example_inspection_config_has_a_recipe_and_a_modbus_output() -> None:
    text = (Path(__file__).resolve().parent.parent / "deploy/examples/inspection.yaml").read_text()
    cfg = parse_config(text, "inspection.yaml")
    assert cfg.line.recipes and any(o.type == "modbus" for o in cfg.line.outputs)


def test_the_mqtt_trigger_command_inspects_the_recipe_cameras_newest_frame(server: ModbusServer) -> None:
    from edge_agent.agent.control import handle_command
    from edge_agent.protocol.commands import CommandError, parse_command

    cfg = line_cfg(server.port)
    cfg = cfg.model_copy(update={"recipes": tuple(r.model_copy(update={"camera": "cam"}) for r in cfg.recipes)})
    rig = Rig(server)
    rig.line = LineController(cfg, pipelines=[PIPE], submit=rig.submit,
                              outputs={"plc": ModbusSignal(cfg.outputs[0])},  # type: ignore[arg-type]
                              models={"steel": TypeModel()})
    assert rig.pipeline is not None
    rig.pipeline._sector = rig.line.sector_for(make_sector(PIPE))
    with rig:
        command = parse_command("trigger", b'{"id": "op-7", "args": {"recipe": "tile-a"}}')
        with pytest.raises(CommandError) as refused:
            handle_command(command, {}, None, line=rig.line)  # no frame yet
        assert refused.value.code == "no_frame"
        rig.line.on_frame("cam", bright())
        answer = handle_command(command, {}, None, line=rig.line)
        assert answer["accepted"] is True and answer["part_id"] == "op-7"
        assert server.wait_writes(1)[0].value == 1
        wait_for(lambda: len(rig.outputs) == 1, T)
        assert rig.outputs[0].sector["line"]["trigger"] == "mqtt" and rig.outputs[0].sector["line"]["part_id"] == "op-7"
        with pytest.raises(CommandError) as no_line:
            handle_command(command, {}, None, line=None)
        assert no_line.value.code == "command_unsupported"
        with pytest.raises(CommandError):
            parse_command("trigger", b'{"id": "op-8", "args": {"recipe": "../x"}}')


def test_an_unreachable_plc_shows_in_health_until_a_signal_gets_through() -> None:
    from edge_agent.agent.health import agent_health

    port = free_port()
    cfg = ModbusOutputConfig(type="modbus", name="plc", host="127.0.0.1", port=port, coil=0, retries=0,
                             timeout_s=0.2)
    output = ModbusSignal(cfg)
    lane = SignalLane(output)
    lane.start()
    lane.put(decision())
    wait_for(lambda: lane.errors == 1, T)
    line = {"outputs": {"plc": {"signalled": lane.signalled, "errors": lane.errors, "last_error": lane.last_error}}}
    health = agent_health(ready=True, state="running", device="d", sources={}, publisher="disabled", outbox=None,
                          state_dir=Path("."), min_free_bytes=0, models=[], updates=None, pipelines={}, line=line)
    assert health["state"] == "degraded" and health["problems"][0].startswith("line output plc: failing")
    with modbus_server(port=port) as plc:  # the PLC is back
        lane.put(decision())
        wait_for(lambda: lane.signalled == 1, T)
        assert lane.last_error is None and plc.coils(0, 1) == [True]
        lane.stop()


def test_the_trigger_route_needs_a_token_and_is_not_rate_limited(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from edge_agent.api import create_app
    from edge_agent.api.context import ApiContext
    from edge_agent.config import HttpConfig
    from edge_agent.delivery.outbox import Outbox
    from tests.support.api_harness import LOCAL, advice_book

    token = "s3cret-token-0123456789abcdef"
    (tmp_path / "tokens").write_text(f"{token}\n")
    calls: list[tuple[str | None, str | None, bytes | None, str]] = []

    def trigger(recipe: str | None, part_id: str | None, *, data: bytes | None = None,
                source: str = "api") -> Future[Decision]:
        calls.append((recipe, part_id, data, source))
        if recipe == "nope":
            raise RecipeUnknownError("unknown recipe 'nope'")
        fut: Future[Decision] = Future()
        fut.set_result(Decision(recipe or "r", part_id or "p", "pass", "verdict", "l-1", source, 100.0, 0.0, 0.004))
        return fut

    settings = HttpConfig(tokens_file=tmp_path / "tokens", rate_limit_per_minute=6, rate_limit_burst=2)
    outbox = Outbox(tmp_path / "outbox.db", "d")
    ctx = ApiContext(settings=settings, spool_dir=tmp_path, outbox=outbox, submit=lambda item: Future(),
                     models=list, is_ready=lambda: True, advice=advice_book(), line_trigger=trigger)
    try:
        with TestClient(create_app(ctx), base_url=LOCAL) as client:
            assert client.post("/v1/line/trigger", params={"recipe": "r"}).status_code == 401
            auth = {"authorization": f"Bearer {token}"}
            answers = [client.post("/v1/line/trigger", params={"recipe": "r", "part_id": f"P-{i}"}, content=b"img",
                                   headers=auth) for i in range(10)]  # a burst of 2 would stop an upload here
            assert [a.status_code for a in answers] == [200] * 10
            assert answers[3].json()["part_id"] == "P-3" and answers[3].json()["elapsed_ms"] == 4.0
            assert calls[0] == ("r", "P-0", b"img", "http")
            refused = client.post("/v1/line/trigger", params={"recipe": "nope"}, headers=auth)
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "recipe_unknown"
            models = [client.get("/v1/models", headers=auth).status_code for _ in range(3)]
            assert models == [200, 200, 429]  # the rest of /v1 is still limited (burst 2)
    finally:
        outbox.close()


def test_a_verdict_past_its_deadline_is_never_signalled_even_when_the_deadline_thread_is_starved(
    server: ModbusServer,
) -> None:
    now = [1000.0]
    gate = threading.Event()
    rig = Rig(server, gate, clock=lambda: now[0])
    assert rig.pipeline is not None
    rig.pipeline.start()
    for lane in rig.line.lanes.values():
        lane.start()  # no deadline thread: as if it never got a CPU
    try:
        future = rig.line.trigger("tile-fast", "starved", frame=bright(40))  # a good part, deadline 50 ms
        assert rig.model.running.wait(T)
        now[0] += 1.0  # the model took a second
        gate.set()
        decision = future.result(T)
        assert (decision.decision, decision.cause) == ("reject", "deadline")  # the fail-safe, not the late "pass"
        assert server.wait_writes(1)[0].value == 2
        wait_for(lambda: len(rig.outputs) == 1, T)
        assert rig.outputs[0].sector["line"]["late"] is True and rig.outputs[0].sector["verdict"] == "pass"
        # a trigger whose decoding alone outlasts the deadline gets the fail-safe before inference
        ticks = iter([0.0])  # the trigger's time, then 5 s later for every other look at the clock
        slow = Rig(server, clock=lambda: next(ticks, 5.0))
        assert slow.line.trigger("tile-fast", "slow-decode", frame=bright(40)).result(T).cause == "deadline"
        assert slow.pipeline is not None and slow.pipeline.depth == 1  # and it is still inspected (late)
    finally:
        rig.pipeline.stop(5)
        rig.line.stop(5)
