"""Real chute frames through ``edge-agent run`` -> Mosquitto -> ``edge-coordinator run``: counts and alerts arrive.

The frames are ``../shared/datasets/livestock/cattle_chute/train/images`` (no licence: read in place, never copied
into the repository): the sequence ``frame_000030.jpg`` .. ``frame_000372.jpg``, every 3rd frame of the video
(115 frames). The video's frame rate is not recorded; we take 30 fps, so the sequence spans 11.4 s of capture time
at 10 frames a second. The frames go through a folder source in name order (= time order); each file's
modification time is set to its capture time (``T0 + frame number / 30``), which the folder source hands to the
pipeline as ``captured_at``, the clock of the livestock events.

What a person counts on these frames (from the label files, one box per visible animal, checked by eye):
cow A walks in from the top, crosses the line half way down the frame (y = 0.5) downwards at frame ~66-75,
stands in the lower half, then (the hand-held camera moving on along the chute) its centre passes back
above the line at frame ~225-231 and it stands still near the top from frame ~290 to the end; cow B comes in
at the top at frame ~39 and leaves at the top at frame ~291 without crossing; a third, tiny at the top edge,
is labelled in frames 120-156. So: 1 crossing forward, 1 backward; 1-2 animals in frame (2 from frame ~39 to
~291; 3 labelled for frames 120-156 of which the third is a few pixels tall) and 1 after frame ~291; one animal
standing still for the last ~2.5 s. Per 4 s interval (T0 aligned to a multiple of 4: frames 30-117 / 120-237 /
240-357; 372 falls in the fourth, still open): median animals in frame 2 / 2 / 1, crossings forward 1 / 0 / 0,
backward 0 / 1 / 0.

The same tracker and events fed with the labelled boxes instead of the detector give the same reports, crossings
and stationary alert (cow A, from frame ~288); the headcount_drop alert then fires at frame ~240 against a learned
baseline of 3 (the tiny third cow, which the detector misses: baseline 2, fired at frame ~360 when B has left).
The frames were part of the cattle_overhead bundle's training split: this tests the system, not the detector.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from edge_agent.transport.base import InboundMessage, MqttSettings
from edge_agent.transport.mqtt import PahoTransport
from tests.conftest import DATASETS, ROOT
from tests.support.agent_process import agent_process
from tests.support.broker import Broker
from tests.support.coordinator_proc import CoordinatorProcess
from tests.support.wait import wait_for

pytestmark = pytest.mark.datasets

FRAMES = DATASETS / "livestock" / "cattle_chute" / "train" / "images"
SEQUENCE = range(30, 373, 3)
FPS = 30.0
INTERVAL = 4.0
DEVICE = "barn-2"


class Watcher:
    """Subscribes to the device's events (the live copy of the livestock events)."""

    def __init__(self, port: int) -> None:
        self.ready = threading.Event()
        self.received: list[dict[str, Any]] = []
        self.transport = PahoTransport(MqttSettings(port=port, client_id="watcher"))
        self.transport.start(self)

    def on_connected(self, session_present: bool) -> None:
        self.transport.subscribe([f"edge/v1/{DEVICE}/events"], qos=1)
        self.ready.set()

    def on_disconnected(self, reason: str) -> None:
        self.ready.clear()

    def on_message(self, message: InboundMessage) -> None:
        self.received.append(json.loads(message.payload))

    def on_published(self, token: int, ok: bool, reason: str) -> None: ...


def agent_config(tmp_path: Path, broker_port: int, inbox: Path) -> str:
    """deploy/examples/livestock.yaml with a folder source for the frames, a loopback broker and test-sized times."""
    cfg = yaml.safe_load((ROOT / "deploy" / "examples" / "livestock.yaml").read_text())
    cfg["state_dir"] = str(tmp_path / "state")
    cfg.pop("commands", None)  # operator keys of a real barn
    (herd,) = cfg["pipelines"]
    herd["livestock"].update(
        report_interval_s=INTERVAL,
        expected="learn",  # watch the whole frame against its recent maximum
        stationary={"after_s": 1.5, "radius": 0.05, "clear_radius": 0.1, "clear_after_s": 0.5},
        headcount_drop={"after_s": 2.0, "clear_after_s": 1.0, "smooth_s": 1.0, "baseline_s": 60.0,
                        "min_baseline": 2},
    )
    cfg["sources"] = [{"type": "folder", "name": "chute-cam", "pipeline": herd["name"], "path": str(inbox),
                       "poll_interval_s": 0.05, "settle_s": 0.0}]
    cfg["mqtt"] = {"host": "127.0.0.1", "port": broker_port, "heartbeat_s": 1, "reconnect_max_s": 1}
    cfg["metrics"] = {"enabled": False}
    cfg["http"] = {"enabled": True, "bind": "127.0.0.1", "port": 0}
    return yaml.safe_dump(cfg).replace("port: 0\n", "port: {port}\n")  # agent_process fills in the HTTP port


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.close()


def test_real_chute_frames_through_edge_agent_run_reach_the_coordinator(tmp_path: Path, broker: Broker) -> None:
    started = time.monotonic()
    t0 = math.floor((time.time() - 3600) / INTERVAL) * INTERVAL  # an hour ago: long settled, interval-aligned
    staging, inbox = tmp_path / "staging", tmp_path / "inbox"
    staging.mkdir()
    inbox.mkdir()
    for n in SEQUENCE:
        dst = staging / f"frame_{n:06d}.jpg"
        shutil.copyfile(FRAMES / dst.name, dst)
        os.utime(dst, (t0 + n / FPS, t0 + n / FPS))
    for f in sorted(staging.iterdir()):  # all there before the agent's first scan
        f.rename(inbox / f.name)

    coordinator = CoordinatorProcess(tmp_path / "coord", broker.port)
    watcher = Watcher(broker.port)
    try:
        coordinator.start(wait_connected=True)
        assert watcher.ready.wait(10)
        with agent_process(tmp_path, agent_config(tmp_path, broker.port, inbox)) as agent:
            assert wait_for(lambda: coordinator.count(DEVICE) >= len(SEQUENCE), 60), (
                f"{coordinator.count(DEVICE)} of {len(SEQUENCE)} results at the coordinator\n"
                + agent.log.read_text()[-3000:])
            assert wait_for(lambda: sum(e["event"] == "livestock_headcount" for e in watcher.received) >= 3, 10)
        rows = coordinator.query("SELECT payload FROM results WHERE device = ?", DEVICE)
        entries = sum(len(json.loads(p)["body"]["sector"].get(k, ())) for (p,) in rows for k in ("alerts", "reports"))

        def copies_seen() -> int:  # each entry reaches the coordinator twice: live event and inside its result
            c = (coordinator.stats() or {}).get("counters", {})
            return int(c.get("events_inserted", 0)) + int(c.get("events_duplicates", 0))

        assert wait_for(lambda: copies_seen() >= 2 * entries, 10), (copies_seen(), entries)
        stored = coordinator.query("SELECT event, ts, via, data FROM events WHERE device = ?", DEVICE)
        counters = (coordinator.stats() or {})["counters"]
    finally:
        watcher.transport.stop()
        coordinator.close()

    bodies = sorted((json.loads(p)["body"] for (p,) in rows), key=lambda b: b["sector"]["captured_at"])
    assert len(bodies) == len(SEQUENCE) and all(b["source"] == "chute-cam" for b in bodies)
    assert [round(b["sector"]["captured_at"] - t0, 2) for b in bodies] == [round(n / FPS, 2) for n in SEQUENCE]
    schema = json.loads(resources.files("edge_agent.protocol").joinpath("schemas/livestock.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for body in bodies:
        validator.validate(body["sector"])

    # crossings: what a person counts on the frames
    last = bodies[-1]["sector"]["counts"]
    assert (last["forward"], last["backward"]) == (1, 1)
    crossed = [a for b in bodies for a in b["sector"]["alerts"] if a["type"] == "line_crossed"]
    assert [a["direction"] for a in crossed] == ["forward", "backward"]

    # headcount per interval, published once per interval (in 3 of the 115 results), not per frame
    reports = [r for b in bodies for r in b["sector"]["reports"]]
    assert [r["start"] - t0 for r in reports] == [0.0, 4.0, 8.0]
    assert [r["count"] for r in reports] == [2, 2, 1]
    assert [(r["crossed_forward"], r["crossed_backward"]) for r in reports] == [(1, 0), (0, 1), (0, 0)]
    assert sum(r["frames"] for r in reports) == sum(1 for n in SEQUENCE if n / FPS < 12.0)
    assert [z["name"] for z in reports[0]["zones"]] == ["crush", "entry"]

    # alerts a farmer acts on: cow A standing still at the end, and the frame's count fell from 2 to 1
    alerts = [a for b in bodies for a in b["sector"]["alerts"] if a["type"] in ("animal_stationary", "headcount_drop")]
    kinds = [(a["type"], a["state"]) for a in alerts]
    assert sorted(kinds) == [("animal_stationary", "active"), ("headcount_drop", "active")]
    still = next(a for a in alerts if a["type"] == "animal_stationary")
    assert still["since"] - t0 >= 280 / FPS and still["position"][1] < 0.5  # the one standing near the top
    drop = next(a for a in alerts if a["type"] == "headcount_drop")
    assert (drop["zone"], drop["baseline_from"]) == (None, "learned")
    assert drop["baseline"] in (2, 3) and drop["count"] < drop["baseline"]  # 3 if the tiny third cow is detected

    # the live copies on the events topic
    live = {(e["event"], e["data"]["ts"]) for e in watcher.received if e["event"].startswith("livestock_")}
    assert {("livestock_headcount", r["ts"]) for r in reports} <= live
    assert {(f"livestock_{a['type']}", a["ts"]) for a in alerts} <= live
    event_schema = {"$defs": schema["$defs"], "$ref": "#/$defs/event_data"}
    for e in watcher.received:
        if e["event"].startswith("livestock_"):
            jsonschema.validate(e["data"], event_schema, cls=jsonschema.Draft202012Validator)
    # the coordinator stored every entry once, from whichever copy came first (live event or result)
    assert (counters["events_inserted"], counters["events_duplicates"]) == (entries, entries)
    assert sorted((e, ts) for e, ts, _, _ in stored) == sorted(
        (f"livestock_{x['type']}", x["ts"]) for b in bodies for x in (*b["sector"]["alerts"], *b["sector"]["reports"]))
    for _, _, _, data in stored:
        jsonschema.validate(json.loads(data), event_schema, cls=jsonschema.Draft202012Validator)
    figures = [(r["count"], r["crossed_forward"], r["crossed_backward"]) for r in reports]
    print(f"e2e: {len(bodies)} results, reports {figures}, alerts {kinds}, events stored "
          f"{sorted(collections.Counter(v for _, _, v, _ in stored).items())}, {time.monotonic() - started:.1f} s")
