"""The farmer page in a real headless Chromium (Debian's, driven by Playwright; never `playwright install`).

Given a real agent process (``edge-agent run``, tiny ONNX crop classifier over the 15 crop labels)
serving the page on a free loopback port; when a phone-sized browser opens the page and uploads a
leaf photo from tests/data through the "Take photo" file input; then the diagnosis,
confidence, advice and alternatives appear, match the API, switch language (French from the
browser locale, then Kiswahili from the picker), are remembered on the phone, and a photo whose
upload fails is kept and sent again. A screenshot is kept under ``artifacts/``.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image as PILImage
from playwright.sync_api import Page, Request, Route, sync_playwright

from edge_agent.sectors.advice import CROP_LABELS
from tests.support.api_harness import free_port, wait_for
from tests.support.onnx_models import classifier_manifest, tiny_classifier, write_bundle

from .conftest import CROPS

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
LEAF = CROPS / "ibean" / "bean_rust" / "bean_rust_train_0.jpg"
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
T_MS = 20_000


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real agent process serving the API and the page; yields its base URL; ended by PID."""
    root = tmp_path_factory.mktemp("agent")
    bundle = root / "models" / "tiny_crop"
    bundle.mkdir(parents=True)
    onnx_path = tiny_classifier(bundle / "model.onnx", n_classes=len(CROP_LABELS), size=32, seed=3)
    manifest = classifier_manifest(onnx_path, list(CROP_LABELS), size=32, name="tiny_crop", thresholds={"ood": 50.0})
    write_bundle(bundle, manifest)
    port = free_port()
    config = root / "agent.yaml"
    config.write_text(
        f"""\
device_id: browser-test
state_dir: {root / "state"}
models_dir: {root / "models"}
shutdown_timeout_s: 5
models:
  - name: crop
    bundle: tiny_crop
pipelines:
  - name: crop
    kind: crop
    model: crop
mqtt:
  enabled: false
metrics:
  enabled: false
http:
  enabled: true
  port: {port}
"""
    )
    log = (root / "agent.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (root / "agent.log").read_text()
        try:
            return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, timeout=60, what="the agent to be ready")
        yield base
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


@pytest.fixture
def phone(agent: str) -> Iterator[Page]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(
            locale="fr-FR",
            viewport={"width": 360, "height": 760},
            device_scale_factor=2,
            is_mobile=True,
            has_touch=True,
        )
        page = context.new_page()
        page.set_default_timeout(T_MS)
        try:
            yield page
        finally:
            context.close()
            browser.close()


def api(base: str, result_id: str, lang: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/v1/results/{result_id}", params={"lang": lang}, timeout=10)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def texts(page: Page, selector: str) -> list[str]:
    return [t.strip() for t in page.locator(selector).all_inner_texts()]


def check_rendered(page: Page, expected: dict[str, Any]) -> None:
    d = expected["diagnosis"]
    assert page.inner_text("#diag-name").strip() == d["name"]
    assert page.inner_text("#diag-crop").strip() == (d["crop_name"] or "")
    assert page.inner_text("#diag-conf").strip() == f"{round(d['confidence'] * 100)}%"
    assert page.inner_text("#advice-desc").strip() == expected["advice"]["description"]
    assert texts(page, "#advice-now li") == expected["advice"]["now"]
    assert texts(page, "#advice-prevention li") == expected["advice"]["prevention"]
    alternatives = texts(page, "#alternatives li")
    assert 1 <= len(alternatives) == len(expected["alternatives"]) <= 3
    for shown, alt in zip(alternatives, expected["alternatives"], strict=True):
        assert shown.startswith(alt["name"]) and shown.endswith(f"{round(alt['confidence'] * 100)}%")
    assert page.inner_text("#disclaimer").strip() == expected["disclaimer"]


def test_farmer_uploads_a_leaf_and_reads_the_advice_in_two_languages(agent: str, phone: Page) -> None:
    page = phone
    loaded: list[int] = []
    foreign: list[str] = []
    page.on("response", lambda r: loaded.append(len(r.body())) if r.ok else None)
    page.on("request", lambda r: foreign.append(r.url) if not r.url.startswith((agent, "blob:", "data:")) else None)

    page.add_init_script(
        """window.__seen = [];
        document.addEventListener("DOMContentLoaded", () => {
          const el = document.getElementById("status-text");
          new MutationObserver(() => { if (!el.closest("section").hidden) window.__seen.push(el.textContent); })
            .observe(el, {childList: true, characterData: true, subtree: true});
        });"""
    )
    page.goto(agent + "/", wait_until="networkidle")
    assert sum(loaded) < 100 * 1024, f"{sum(loaded)} bytes before the first photo"
    assert page.eval_on_selector("html", "e => e.lang") == "fr"  # from the browser's language
    assert page.inner_text("#take").strip() == "Prendre une photo"
    assert "conseiller agricole" in page.inner_text("#disclaimer")
    page.select_option("#crop", "Bean")

    page.set_input_files("#photo", str(LEAF))
    page.wait_for_selector("#result:not([hidden])[data-lang='fr']")
    result_id = page.evaluate("JSON.parse(localStorage.getItem('last')).id")
    french = api(agent, result_id, "fr")
    assert french["diagnosis"]["crop"] == "Bean" and french["crop_hint_applied"] is True
    check_rendered(page, french)
    assert page.is_visible("#preview")
    seen = page.evaluate("window.__seen")
    assert "Préparation de la photo…" in seen and "Examen de la feuille…" in seen, seen  # visible progress states

    page.select_option("#lang", "sw")
    page.wait_for_selector("#result[data-lang='sw']")
    swahili = api(agent, result_id, "sw")
    check_rendered(page, swahili)
    assert swahili["diagnosis"]["name"] != french["diagnosis"]["name"]
    assert page.inner_text("#take").strip() == "Piga picha nyingine"
    assert page.inner_text("h1").strip() == "Daktari wa majani"

    history = page.evaluate("JSON.parse(localStorage.getItem('history'))")
    assert [h["id"] for h in history] == [result_id]
    assert page.locator("#history-list li").count() == 1
    assert foreign == []
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "farmer_page_sw.png"), full_page=True)

    # a reload keeps the language and shows the last diagnosis, even before any new photo
    page.reload(wait_until="networkidle")
    assert page.inner_text("#diag-name").strip() == swahili["diagnosis"]["name"]


def test_photo_is_shrunk_on_the_phone_and_kept_when_the_link_drops(agent: str, phone: Page, tmp_path: Path) -> None:
    page = phone
    big = tmp_path / "phone_photo.jpg"  # a 12 MP phone-sized photo made from the sample leaf
    PILImage.open(LEAF).convert("RGB").resize((4000, 3000), PILImage.Resampling.BICUBIC).save(big, "JPEG", quality=92)
    uploads: list[int] = []

    def drop(route: Route, request: Request) -> None:
        uploads.append(len(request.post_data_buffer or b""))
        route.abort("internetdisconnected")

    page.goto(agent + "/", wait_until="networkidle")
    page.route("**/v1/diagnose*", drop)
    page.set_input_files("#photo", str(big))
    page.wait_for_selector("#status-text:has-text('Pas de connexion')")  # told the photo is kept
    assert page.is_visible("#queue") and "1" in page.inner_text("#queue-text")
    assert uploads, "the upload was attempted"
    assert uploads[0] < 400_000 < big.stat().st_size  # downscaled to ~1024 px before sending
    page.unroute("**/v1/diagnose*")
    sent: list[int] = []

    def through(route: Route, request: Request) -> None:
        sent.append(len(request.post_data_buffer or b""))
        route.continue_()

    page.route("**/v1/diagnose*", through)  # the link is back
    page.click("#retry")
    page.wait_for_selector("#result:not([hidden])")
    page.wait_for_selector("#queue[hidden]", state="attached")
    assert sent and sent[0] == uploads[0]  # the very same kept photo was sent
    result_id = page.evaluate("JSON.parse(localStorage.getItem('last')).id")
    stored = api(agent, result_id, "fr")
    assert page.inner_text("#diag-name").strip() == stored["diagnosis"]["name"]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "farmer_page_fr_retry.png"), full_page=True)


def uploads_accepted(base: str) -> tuple[float, float]:
    """(accepted, replayed) upload counters of the agent."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    found = dict(re.findall(r'^edge_agent_http_uploads_total\{outcome="(\w+)"\} (\S+)$', text, re.M))
    return float(found.get("accepted", 0)), float(found.get("replayed", 0))


def test_answer_lost_after_the_photo_was_stored_is_retried_with_the_same_key_and_stored_once(
    agent: str, phone: Page
) -> None:
    page = phone
    keys: list[str] = []

    def lose_first_answer(route: Route, request: Request) -> None:
        keys.append(request.headers.get("idempotency-key", ""))
        if len(keys) == 1:
            route.fetch()  # the agent receives and stores the photo and answers...
            route.abort("connectionreset")  # ...but the phone never hears the answer
        else:
            route.continue_()

    accepted, replayed = uploads_accepted(agent)
    page.goto(agent + "/", wait_until="networkidle")
    page.route("**/v1/diagnose*", lose_first_answer)
    page.set_input_files("#photo", str(LEAF))
    page.wait_for_selector("#status-text:has-text('Pas de connexion')")  # kept, to be sent again
    page.click("#retry")
    page.wait_for_selector("#result:not([hidden])")
    assert len(keys) == 2 and keys[0] == keys[1] and re.fullmatch(r"[0-9a-f]{32}", keys[0]), keys
    assert uploads_accepted(agent) == (accepted + 1, replayed + 1)  # stored once, answered twice
    result_id = page.evaluate("JSON.parse(localStorage.getItem('last')).id")
    assert page.inner_text("#diag-name").strip() == api(agent, result_id, "fr")["diagnosis"]["name"]


def test_sample_leaf_photo_exists_and_is_a_jpeg() -> None:
    data = LEAF.read_bytes()
    assert data[:3] == b"\xff\xd8\xff"
    assert PILImage.open(io.BytesIO(data)).size[0] > 0
