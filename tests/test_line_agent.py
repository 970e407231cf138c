"""Done-when of the line: the real agent (``edge-agent run``) drives recipes from an HTTP trigger to a Modbus write
on pymodbus's real TCP server on loopback (read back over Modbus), and a verdict that would be late gets the
fail-safe at the deadline while the late verdict is recorded and signals nothing."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
from PIL import Image as PILImage

from tests.support.agent_process import agent_process
from tests.support.api_harness import wait_for
from tests.support.modbus_server import modbus_server
from tests.support.onnx_models import classifier_manifest, tiny_classifier, write_bundle

CONFIG = """
device_id: line-test
state_dir: {state}
models_dir: {models}
models:
  - {{name: gate, bundle: tiny_gate}}
  - {{name: types, bundle: tiny_types}}
pipelines:
  - name: parts
    kind: inspection
    model: gate
    inspection: {{fail_labels: [good, scratch], min_score: 0.0, fail_when_rejected: false,
                  classify: {{model: types}}}}
mqtt: {{enabled: false}}
metrics: {{enabled: false}}
http: {{enabled: true, port: {{port}}}}
line:
  recipes:
    - {{id: reject-all, pipeline: parts, deadline_ms: 20000, outputs: [coil-a]}}
    - {{id: pass-all, pipeline: parts, min_score: 1.0, deadline_ms: 20000, outputs: [register-c]}}
    - {{id: too-slow, pipeline: parts, min_score: 1.0, deadline_ms: 1, fail_safe: reject, outputs: [coil-b]}}
  outputs:
    - {{type: modbus, name: coil-a, host: 127.0.0.1, port: {modbus}, coil: 1}}
    - {{type: modbus, name: coil-b, host: 127.0.0.1, port: {modbus}, coil: 2}}
    - {{type: modbus, name: register-c, host: 127.0.0.1, port: {modbus}, holding_register: 5,
       reject_value: 2, pass_value: 1}}
"""


def models(root: Path) -> Path:
    for name, labels, seed in (("tiny_gate", ["good", "scratch"], 1), ("tiny_types", ["crazing", "pits", "rolled"], 2)):
        bundle = root / "models" / name
        bundle.mkdir(parents=True)
        onnx_path = tiny_classifier(bundle / "model.onnx", n_classes=len(labels), size=32, seed=seed)
        manifest = classifier_manifest(onnx_path, labels, size=32, name=name, thresholds={"ood": 1e9})
        write_bundle(bundle, manifest)
    return root / "models"


def png(width: int, height: int) -> bytes:
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    pixels = np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_http_trigger_to_modbus_coil_and_a_late_verdict_gets_the_fail_safe(tmp_path: Path) -> None:
    with modbus_server() as plc:
        body = CONFIG.format(state=tmp_path / "state", models=models(tmp_path), modbus=plc.port)
        with agent_process(tmp_path, body) as agent:
            url = f"{agent.base}/v1/line/trigger"
            small = png(64, 48)
            r = httpx.post(url, params={"recipe": "reject-all", "part_id": "A-1"}, content=small,
                           headers={"Content-Type": "image/png"}, timeout=30)
            assert r.status_code == 200, r.text
            decision = r.json()
            assert (decision["decision"], decision["cause"], decision["part_id"]) == ("reject", "verdict", "A-1")
            assert decision["defect_type"]["label"] in {"crazing", "pits", "rolled"}  # the chain named it
            (write,) = plc.wait_writes(1)
            assert (write.kind, write.address, write.value) == ("coil", 1, 1)
            assert plc.coils(0, 8)[1] is True

            r = httpx.post(url, params={"recipe": "pass-all", "part_id": "B-1"}, content=small, timeout=30)
            assert r.status_code == 200 and r.json()["decision"] == "pass" and r.json()["cause"] == "verdict"
            assert plc.wait_writes(2)[1].value == 1 and plc.registers(0, 8)[5] == 1

            # a 6-megapixel photo takes longer to decode than the 1 ms deadline: the fail-safe (reject) goes out,
            # although the model's verdict (min_score 1.0) would have passed the part
            r = httpx.post(url, params={"recipe": "too-slow", "part_id": "C-1"}, content=png(3000, 2000), timeout=30)
            assert r.status_code == 200, r.text
            late = r.json()
            assert (late["decision"], late["cause"], late["fail_safe"]) == ("reject", "deadline", True)
            assert plc.wait_writes(3)[2].address == 2 and plc.coils(0, 8)[2] is True

            def metric(line: str) -> bool:
                return any(row.startswith(line) for row in httpx.get(f"{agent.base}/metrics").text.splitlines())

            wait_for(lambda: metric('edge_agent_line_late_verdicts_total{recipe="too-slow"} 1.0'), 30,
                     "the late verdict to be recorded")
            assert metric('edge_agent_line_failsafe_total{cause="deadline",recipe="too-slow"} 1.0')
            assert len(plc.writes) == 3  # the late verdict signalled nothing

            r = httpx.post(url, params={"recipe": "nope"}, content=small)
            assert r.status_code == 400 and r.json()["error"]["code"] == "recipe_unknown"
            r = httpx.post(url, params={"recipe": "reject-all"})  # no image, and the recipe names no camera
            assert r.status_code == 409 and r.json()["error"]["code"] == "no_frame"
