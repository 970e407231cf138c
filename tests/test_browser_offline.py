"""The farmer page with no board in reach, in a real headless Chromium (Debian's, driven by Playwright).

Given a real agent process serving the page on a free loopback port (http://127.0.0.1 is a secure context, so the
service worker registers); when a phone opens the page once, then the agent is stopped and the phone goes offline,
the page is reopened (answered by the service worker), a photo is taken (queued in IndexedDB, visible in the
queue) and then the agent comes back on the same port and the phone goes online; then the queued photo is sent
with its Idempotency-Key and the diagnosis appears. Also: everything the browser loads before the first photo
(the service worker's own fetches included) stays under 100 KB; the page is installable (manifest, icons); Hindi
renders with the system's Devanagari font (Debian's fonts-lohit-deva), no web font downloaded; and each of the four
answer bands (diagnosis, not sure, not a crop I know, retake) shows as it should, in Hindi.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, Response, Route, sync_playwright

from edge_agent.api.present import present
from edge_agent.sectors.advice import CROP_LABELS
from tests.support.agent_process import agent_process, tiny_crop_models
from tests.support.api_harness import advice_book, free_port

from .conftest import CROPS
from .test_browser import CHROMIUM, FLAGS, T_MS, texts

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
LEAF = CROPS / "ibean" / "bean_rust" / "bean_rust_train_0.jpg"
PAGE_BUDGET = 100 * 1024

CONFIG = """\
device_id: offline-test
state_dir: {root}/state
models_dir: {root}/models
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
  port: {{port}}
"""


@pytest.fixture
def browser_context() -> Iterator[BrowserContext]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(
            locale="en-GB", viewport={"width": 360, "height": 760}, device_scale_factor=2, is_mobile=True,
            has_touch=True, service_workers="allow",
        )
        context.set_default_timeout(T_MS)
        try:
            yield context
        finally:
            context.close()
            browser.close()


def wait_controlled(page: Page) -> None:
    """Until the service worker is active, has filled its cache and controls the page."""
    page.evaluate("navigator.serviceWorker.ready.then(() => true)")
    page.wait_for_function("navigator.serviceWorker.controller !== null")
    page.wait_for_function(
        "caches.keys().then(ks => Promise.all(ks.map(k => caches.open(k).then(c => c.keys()))))"
        ".then(all => all.some(reqs => reqs.length >= 7))"
    )


def test_page_opens_offline_queues_the_photo_and_shows_the_diagnosis_when_the_board_is_back(
    tmp_path: Path, browser_context: BrowserContext
) -> None:
    tiny_crop_models(tmp_path, list(CROP_LABELS))
    body = CONFIG.format(root=tmp_path)
    port = free_port()
    loaded: list[tuple[str, int]] = []
    foreign: list[str] = []

    def on_response(r: Response) -> None:
        if r.ok:  # the service worker's fetches have no body here: count their Content-Length (an upper bound)
            loaded.append((r.url, len(r.body()) or int(r.headers.get("content-length") or 0)))

    context = browser_context
    context.on("response", on_response)  # the page's and the service worker's requests alike
    context.on("request", lambda r: foreign.append(r.url) if not r.url.startswith(
        (f"http://127.0.0.1:{port}", "blob:", "data:")) else None)
    page = context.new_page()

    with agent_process(tmp_path, body, port=port) as agent:
        page.goto(agent.base + "/", wait_until="networkidle")
        wait_controlled(page)
        first_visit = sum(n for _, n in loaded)
        ARTIFACTS.mkdir(exist_ok=True)
        weight = {"bytes": first_visit, "responses": loaded}
        (ARTIFACTS / "farmer_page_weight.json").write_text(json.dumps(weight, indent=1))
        assert first_visit < PAGE_BUDGET, (first_visit, loaded)
        assert {u.rsplit("/", 1)[1] for u, _ in loaded} >= {"", "app.js", "i18n.js", "sw.js", "manifest.webmanifest"}
        assert not [u for u, _ in loaded if re.search(r"\.(woff2?|ttf|otf)(\?|$)", u)]  # no font download
        manifest = httpx.get(f"{agent.base}/static/manifest.webmanifest", timeout=5).json()
        assert manifest["start_url"] == "/" and manifest["display"] == "standalone"
        assert {i["sizes"] for i in manifest["icons"]} >= {"192x192", "512x512"}
        for icon in manifest["icons"]:
            assert httpx.get(agent.base + icon["src"], timeout=5).status_code == 200
        sw = httpx.get(f"{agent.base}/sw.js", timeout=5)
        assert sw.headers["cache-control"] == "no-cache" and "javascript" in sw.headers["content-type"]
        assert "__VERSION__" not in sw.text

    # the board is gone and the phone has no network: the page still opens, from the service worker
    context.set_offline(True)
    reopened = page.reload(wait_until="load")
    assert reopened is not None and reopened.from_service_worker
    assert page.inner_text("#take").strip() == "Take photo"
    page.set_input_files("#photo", str(LEAF))
    page.wait_for_selector("#status-text:has-text('No connection')")
    assert page.is_visible("#queue") and page.inner_text("#queue-text").strip() == "Photos waiting to be sent: 1"
    assert page.locator("#queue-list li[data-state='waiting']").count() == 1
    assert "waiting for the board" in page.inner_text("#queue-list")
    queued = page.evaluate(
        """new Promise(r => { const q = indexedDB.open("leaf-doctor", 1); q.onsuccess = () =>
             { const g = q.result.transaction("queue").objectStore("queue").getAll(); g.onsuccess = () =>
               r(g.result.map(x => ({key: x.key, size: x.blob.size}))); }; })"""
    )
    assert len(queued) == 1 and re.fullmatch(r"[0-9a-f]{32}", queued[0]["key"]) and queued[0]["size"] > 1000
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "farmer_page_offline_queue.png"), full_page=True)

    # the board is back on the same address and the phone online: the queued photo goes, the diagnosis shows
    keys: list[str] = []
    page.on("request", lambda r: keys.append(r.headers.get("idempotency-key", "")) if "/v1/diagnose" in r.url else None)
    with agent_process(tmp_path, body, port=port) as agent:
        context.set_offline(False)
        page.wait_for_selector("#result:not([hidden])")
        page.wait_for_selector("#queue[hidden]", state="attached")
        assert keys and set(keys) == {queued[0]["key"]}  # sent with the key it was queued with
        result_id = page.evaluate("JSON.parse(localStorage.getItem('last')).id")
        got = httpx.get(f"{agent.base}/v1/results/{result_id}", params={"lang": "en"}, timeout=10)
        stored: dict[str, Any] = got.json()
        assert page.get_attribute("#result", "data-band") == stored["band"] != "retake"  # a good photo: checks pass
        assert page.get_attribute("#result", "data-label") == stored["diagnosis"]["label"]
        if stored["band"] == "diagnosis":
            assert page.inner_text("#diag-name").strip() == stored["diagnosis"]["name"]
        page.screenshot(path=str(ARTIFACTS / "farmer_page_back_online.png"), full_page=True)
    assert foreign == []


def test_hindi_renders_with_the_system_devanagari_font_and_each_band_shows(
    tmp_path: Path, browser_context: BrowserContext
) -> None:
    tiny_crop_models(tmp_path, list(CROP_LABELS))
    fonts_loaded: list[str] = []
    with agent_process(tmp_path, CONFIG.format(root=tmp_path)) as agent:
        page = browser_context.new_page()
        page.on("request", lambda r: fonts_loaded.append(r.url) if r.resource_type == "font" else None)
        page.goto(agent.base + "/", wait_until="networkidle")
        page.select_option("#lang", "hi")
        page.wait_for_function("document.documentElement.lang === 'hi'")
        assert page.inner_text("h1").strip() == "पत्ती डॉक्टर"
        cdp = browser_context.new_cdp_session(page)
        root = cdp.send("DOM.getDocument")["root"]["nodeId"]
        cdp.send("CSS.enable")
        used: dict[str, Any] = {}
        for selector in ("h1", "#take", "#disclaimer"):
            node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
            for font in cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]:
                used[font["familyName"]] = font
        # every glyph drawn by an installed system font (no tofu from a missing one, no web font)
        deva = [f for name, f in used.items() if "devanagari" in name.lower()]
        assert deva and sum(f["glyphCount"] for f in deva) >= 20, json.dumps(used)
        assert not any(f["isCustomFont"] for f in used.values())
        width = page.evaluate(
            """() => { const c = document.createElement('canvas').getContext('2d');
                       const s = getComputedStyle(document.body); c.font = s.fontSize + ' ' + s.fontFamily;
                       return [c.measureText('क').width, c.measureText('ख').width, c.measureText('ग').width]; }"""
        )
        assert len(set(width)) > 1, width  # distinct glyph widths: real letters, not identical missing-glyph boxes
        assert fonts_loaded == []
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "farmer_page_hi.png"), full_page=True)
        show_each_band(page)


def band_answers(lang: str) -> dict[str, dict[str, Any]]:
    """API answers of each band, made by the API's own ``present`` from stored verdicts."""
    from tests.test_answer_bands import Stored, verdict

    book = advice_book()
    stored = {
        "diagnosis": verdict(band="diagnosis", confidence=0.91),
        "unsure": verdict(band="unsure"),
        "unknown_plant": verdict(band="unknown_plant", recognised=False, label="not_recognised", crop=None,
                                 condition=None, known_crops=["Apple", "Bean", "Corn", "Pepper_bell", "Strawberry"]),
        "retake": verdict(band="retake", recognised=False, label="not_recognised", crop=None, condition=None,
                          retake={"code": "too_dark", "hint": "retake.too_dark"}),
    }
    return {band: present(Stored(v, result_id=f"r-{band}"), book, lang).model_dump(mode="json")
            for band, v in stored.items()}


def answering(answer: dict[str, Any]) -> Callable[[Route], None]:
    def handler(route: Route) -> None:
        route.fulfill(json=answer)

    return handler


def show_each_band(page: Page) -> None:
    """Each band as the page shows it, in Hindi (the answer to the upload is replaced by one of each band)."""
    answers = band_answers("hi")
    i18n = json.loads(page.evaluate("JSON.stringify(window.I18N.hi)"))
    for band, answer in answers.items():
        page.route("**/v1/diagnose*", answering(answer))
        page.set_input_files("#photo", str(LEAF))
        page.wait_for_selector(f"#result[data-band='{band}'][data-label='{answer['diagnosis']['label']}']")
        page.unroute("**/v1/diagnose*")
        name, note = page.inner_text("#diag-name").strip(), page.inner_text("#band-note").strip()
        alternatives = texts(page, "#alternatives li") if page.is_visible("#alt-box") else []
        if band == "diagnosis":
            assert name == answer["diagnosis"]["name"] and page.is_visible("#advice-box") and len(alternatives) == 3
        elif band == "unsure":
            assert name == i18n["unsureTitle"] and note == i18n["unsure"] and not page.is_visible("#advice-box")
            assert len(alternatives) == 2 and alternatives[0].startswith(answer["alternatives"][0]["name"])
        elif band == "unknown_plant":
            assert name == i18n["unknownTitle"] and not alternatives and not page.is_visible("#advice-box")
            assert all(c["crop_name"] in note for c in answer["known_crops"]) and "सेब" in note
        else:
            assert name == "कृपया फ़ोटो फिर से लें" and note == answer["retake"]["hint"] and "अँधेरी" in note
            assert not alternatives and not page.is_visible("#advice-box") and not page.is_visible("#conf-line")
        page.screenshot(path=str(ARTIFACTS / f"farmer_page_hi_{band}.png"), full_page=True)
