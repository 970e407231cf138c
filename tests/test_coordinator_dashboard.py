"""The coordinator's live dashboard in a real headless Chromium (Debian's, driven by Playwright).

Given the coordinator's HTTP app (tokens required) over a store and a fleet monitor; when the page opens it
asks for the token, then shows the devices with their availability and backlog, the latest results with
their verdicts, and the charts; when a disease outbreak happens, the alert appears on the open page by
itself (server-sent events, no reload), and the page fetched nothing from anywhere but the coordinator.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, Request, sync_playwright

from edge_agent.auth.tokens import TokenSet
from edge_agent.coordinator.alerts import AlertsConfig, DeviceMeta, OfflineRule, OutbreakRule
from edge_agent.coordinator.events import event_row
from edge_agent.coordinator.http import HttpContext, HttpServer, create_app
from edge_agent.coordinator.monitor import FleetMonitor
from edge_agent.coordinator.store import DeviceUpdate, ResultRow, SqliteStore
from edge_agent.protocol import codec
from tests.fleet_fixtures import crop, inspection, livestock, result_row

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
TOKEN = "dashboard-token-0123456789abcdef"
T_MS = 15_000


class Fleet:
    def __init__(self, root: Path) -> None:
        self.store = SqliteStore(root / "c.db")
        meta = {"leaf-1": DeviceMeta(site="farm-a"), "leaf-2": DeviceMeta(site="farm-a"),
                "cam-1": DeviceMeta(site="plant", line="line-1"), "pen-1": DeviceMeta(site="barn", pen="pen-A")}
        config = AlertsConfig(disease_outbreak=OutbreakRule(count=3, window_s=86_400),
                              device_offline=OfflineRule(enabled=False))
        self.monitor = FleetMonitor(self.store, None, config, meta)
        (root / "tokens").write_text(TOKEN + "\n")
        tokens = TokenSet.load(root / "tokens")
        ctx = HttpContext(self.store, lambda: {"inserted": 0, "store_ok": True, "connected": True}, tokens,
                          self.monitor, meta, stream_interval_s=0.1)
        self.server = HttpServer(create_app(ctx), "127.0.0.1", 0, tokens)
        self.seq = 0

    def add(self, rows: list[ResultRow], devices: list[DeviceUpdate] | None = None) -> None:
        self.store.commit_batch(rows, devices or [])
        self.monitor.process((rows, devices or []))

    def add_events(self) -> None:
        """An operator's false reject on cam-1's line and a stationary cow on pen-1, as the devices send them."""
        import time

        now = time.time()
        feedback = {"pipeline": "line", "result_id": "a" * 32, "input_id": "i1", "part_id": "P-17", "kind":
                    "false_reject", "verdict": "fail", "score": 5.0, "threshold": 4.0, "model": "m",
                    "model_version": "1", "operator": "ann", "note": None, "via": "http", "at": now,
                    "inspected_at": now, "totals": {"false_reject": 1, "missed_defect": 0}}
        cow = {"pipeline": "pen", "source": "cam", "input_id": "f1", "result_id": "b" * 32, "type":
               "animal_stationary", "ts": now - 1, "state": "active", "track_id": 3, "label": "cow", "since": now - 700,
               "duration_s": 699.0, "position": [0.5, 0.5], "box": [1.0, 2.0, 3.0, 4.0]}
        rows = []
        for device, name, data in (("cam-1", "inspection_feedback", feedback),
                                   ("pen-1", "livestock_animal_stationary", cow)):
            payload = codec.event_payload(device=device, ts=now, event=name, severity="warning", data=data)
            message = codec.parse_device_message(codec.events_topic(device), codec.dumps(payload))
            assert message is not None and isinstance(message[0], codec.EventMessage)
            rows.append(event_row(message[0], now))
        self.store.commit_batch([], [], [], rows)

    def row(self, device: str, body: dict[str, object], pipeline: str = "p") -> ResultRow:
        import time

        self.seq += 1
        return result_row(device, self.seq, time.time(), body, pipeline=pipeline)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    f.server.start()
    yield f
    f.server.stop()
    f.store.close()


def test_dashboard_is_live_in_chromium(fleet: Fleet) -> None:
    base = f"http://127.0.0.1:{fleet.server.port}/"
    now_devices = [DeviceUpdate(d, 1.0, state="online") for d in ("leaf-1", "leaf-2", "cam-1")]
    now_devices.append(DeviceUpdate("pen-1", 1.0, state="offline"))
    fleet.add([fleet.row("leaf-1", crop("Bean___rust")), fleet.row("cam-1", inspection(True), "line"),
               fleet.row("cam-1", inspection(False), "line"), fleet.row("pen-1", livestock(12), "pen")],
              now_devices)
    fleet.add_events()
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page: Page = browser.new_page(viewport={"width": 1200, "height": 1000})

            def note(request: Request) -> None:
                requests.append(request.url)

            page.on("request", note)
            page.goto(base)
            page.locator("#login").wait_for(state="visible", timeout=T_MS)  # 401: the page asks for the token
            page.fill("#token", TOKEN)
            page.click("#login button")
            devices = page.locator("#devices tr")
            devices.filter(has_text="pen-1").wait_for(timeout=T_MS)
            assert devices.count() == 4
            pen = devices.filter(has_text="pen-1")
            assert "offline" in pen.inner_text() and pen.locator("td.offline").count() == 1
            assert "online" in devices.filter(has_text="cam-1").inner_text()
            latest = page.locator("#latest tr")
            assert latest.filter(has_text="Bean___rust").count() == 1
            assert latest.filter(has_text="fail").locator("td.fail").count() == 1
            assert "farm-a Bean___rust" in page.locator("#diagnoses").inner_html()
            defects = page.locator("#defects").inner_html()
            assert "line-1" in defects and "50.0 %" in defects
            assert "pen-A" in page.locator("#headcount").inner_html()
            falsereject = page.locator("#falsereject").inner_html()  # 1 false reject of 2 parts inspected
            assert "line-1/line: 1 of 2" in falsereject and "50.0 %" in falsereject
            events = page.locator("#events tr")
            assert "false_reject on P-17 by ann" in events.filter(has_text="inspection_feedback").inner_text()
            assert "active cow 699 s" in events.filter(has_text="livestock_animal_stationary").inner_text()
            assert page.locator("#alerts tr").count() == 0

            # an outbreak on the open page: the alert arrives by the stream, without a reload
            updates = int(page.evaluate("document.body.dataset.updates"))
            fleet.add([fleet.row("leaf-2", crop("Bean___rust")), fleet.row("leaf-1", crop("Bean___rust"))])
            alert = page.locator("#alerts tr").filter(has_text="disease_outbreak")
            alert.wait_for(timeout=T_MS)
            assert "firing" in alert.inner_text() and "Bean___rust@farm-a" in alert.inner_text()
            assert int(page.evaluate("document.body.dataset.updates")) > updates
            assert page.evaluate("performance.getEntriesByType('navigation')[0].type") == "navigate"  # no reload
            assert "1 alerts firing" in page.inner_text("#status")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "coordinator_dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert requests and all(url.startswith(base) for url in requests), requests  # no CDN, nothing external
