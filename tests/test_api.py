"""HTTP API (issue 5): every route, and every HTTP and image bad-input row of RELIABILITY.md.

Given a real crop pipeline (real decode and model code over a fake runtime, real SQLite outbox)
behind ``create_app``; when a client sends good or hostile requests; then the answers carry stable
codes, accepted uploads are durable and diagnosed, and nothing else is stored. Streaming rows
(Content-Length, chunked, slow body, early disconnect) run against a real uvicorn server.
"""

from __future__ import annotations

import io
import re
import socket
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from prometheus_client import generate_latest

from edge_agent.api.middleware import RateLimit
from edge_agent.auth.tokens import TokenSet, is_loopback
from edge_agent.config import HttpConfig
from edge_agent.errors import ConfigError, OverloadedError, StorageFullError
from edge_agent.flow.pipeline import InputItem
from tests.support.api_harness import (
    LOCAL,
    GatedModel,
    Harness,
    build,
    fake_crop_model,
    leaf_jpeg,
    serve,
    wait_for,
)

GOOD_ID = re.compile(r"^http-[0-9a-f]{12}-[0-9a-f]{16}\.(jpg|png|webp)$")
TOKEN = "s3cret-token-0123456789abcdef"
OLD_TOKEN = "expired-token-0123456789abcdef"


# --------------------------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = build(tmp_path)
    yield h
    h.close()


@pytest.fixture
def client(harness: Harness) -> Iterator[TestClient]:
    with TestClient(harness.app, base_url=LOCAL, raise_server_exceptions=False) as c:
        yield c


def png(arr: np.ndarray[Any, Any], mode: str | None = None, **save: Any) -> bytes:
    buf = io.BytesIO()
    (PILImage.fromarray(arr, mode) if mode else PILImage.fromarray(arr)).save(buf, "PNG", **save)
    return buf.getvalue()


def encode(im: PILImage.Image, fmt: str, **save: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def multipart(parts: list[tuple[str, bytes]], boundary: str = "edgeboundary42") -> tuple[bytes, str]:
    """Raw multipart body from (part header block, payload) pairs, sent exactly as given."""
    out = b""
    for headers, payload in parts:
        out += (
            f"--{boundary}\r\n".encode() + headers.encode("utf-8", "surrogateescape") + b"\r\n\r\n" + payload + b"\r\n"
        )
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def image_part(data: bytes, filename: str = "leaf.jpg", name: str = "image") -> tuple[str, bytes]:
    return (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\nContent-Type: image/jpeg', data)


def field_part(name: str, value: str) -> tuple[str, bytes]:
    return (f'Content-Disposition: form-data; name="{name}"', value.encode())


def post_raw(client: TestClient, data: bytes, ctype: str = "image/jpeg", **kw: Any) -> Any:
    return client.post("/v1/diagnose", content=data, headers={"content-type": ctype, **kw.pop("headers", {})}, **kw)


def error_code(response: Any) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return str(body["error"]["code"])


def spool_names(h: Harness) -> list[str]:
    return sorted(p.name for p in h.spool_dir.iterdir())


def raw_http(
    port: int, head: bytes, body_chunks: Iterator[bytes] | None = None, read_timeout: float = 10.0
) -> tuple[bytes, int]:
    """Send ``head`` (request line + headers) then ``body_chunks`` until the server answers or closes.

    Returns (response bytes, body bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head)
        if body_chunks is not None:
            s.setblocking(False)
            for chunk in body_chunks:
                try:
                    if s.recv(1, socket.MSG_PEEK):  # the server has answered: stop sending
                        break
                except BlockingIOError:
                    pass
                except OSError:
                    break
                try:
                    s.setblocking(True)
                    s.settimeout(read_timeout)
                    s.sendall(chunk)
                    sent += len(chunk)
                    s.setblocking(False)
                except OSError:  # reset or broken pipe: the server gave up on us
                    break
            s.setblocking(True)
            s.settimeout(read_timeout)
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _content_length(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
    return data, sent


def _content_length(data: bytes) -> int:
    m = re.search(rb"(?i)content-length:\s*(\d+)", data)
    return int(m.group(1)) if m else 0


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


# ------------------------------------------------------------------------------------------------- happy paths


def test_multipart_upload_is_diagnosed_in_the_requested_language_and_stored_in_the_outbox(
    harness: Harness, client: TestClient
) -> None:
    body, ctype = multipart([image_part(leaf_jpeg()), field_part("lang", "sw"), field_part("crop", "Bean")])
    r = client.post("/v1/diagnose", content=body, headers={"content-type": ctype})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["language"] == "sw"
    assert got["diagnosis"]["label"] == "Bean___bean_rust"
    assert got["diagnosis"]["name"] == "Kutu ya maharagwe"
    assert got["diagnosis"]["crop_name"] == "Maharagwe"
    assert got["diagnosis"]["recognised"] is True and got["diagnosis"]["healthy"] is False
    assert 0.5 < got["diagnosis"]["confidence"] <= 1.0
    assert [a["label"] for a in got["alternatives"]][:2] == ["Bean___bean_rust", "Bean___angular_leaf_spot"]
    assert got["advice"]["now"] and got["advice"]["prevention"] and got["advice"]["description"]
    assert "afisa ugani" in got["disclaimer"]
    assert got["crop_hint"] == "Bean" and got["crop_hint_applied"] is True
    # durable and on its way to MQTT: the outbox row is there, unacknowledged, with the sector verdict
    stored = harness.outbox.get_result(got["id"])
    assert stored is not None and stored.input_id == got["input_id"] and stored.seq == got["seq"]
    assert stored.body["sector"]["label"] == "Bean___bean_rust"
    assert [u.result_id for u in harness.outbox.unacked()] == [got["id"]]
    # the spooled photo is removed once its result is durable
    wait_for(lambda: spool_names(harness) == [], what="spool cleanup")


def test_raw_jpeg_body_with_query_hints(client: TestClient) -> None:
    r = post_raw(client, leaf_jpeg(top_bright=False), params={"lang": "fr-FR", "crop": "bean"})
    assert r.status_code == 200, r.text
    assert r.json()["diagnosis"]["label"] == "Bean___healthy"
    assert r.json()["diagnosis"]["healthy"] is True
    assert r.json()["language"] == "fr" and r.json()["diagnosis"]["name"] == "Feuille de haricot saine"


def test_language_falls_back_to_accept_language_then_english(client: TestClient) -> None:
    r = post_raw(client, leaf_jpeg(), headers={"accept-language": "hi-IN,hi;q=0.9"})
    assert r.json()["language"] == "hi"
    r = post_raw(client, leaf_jpeg(), params={"lang": "xx"})
    assert r.json()["language"] == "en" and r.json()["diagnosis"]["name"] == "Bean rust"


def test_black_photo_is_not_a_recognised_leaf(client: TestClient) -> None:
    r = post_raw(client, png(np.zeros((64, 64, 3), np.uint8)), "image/png")
    assert r.status_code == 200, r.text
    d = r.json()["diagnosis"]
    assert d["recognised"] is False and d["label"] == "not_recognised" and d["crop"] is None
    assert r.json()["advice"]["now"]  # tells the farmer how to take a better photo


def test_get_result_by_result_id_or_input_id_in_another_language(client: TestClient) -> None:
    first = post_raw(client, leaf_jpeg()).json()
    for key in (first["id"], first["input_id"]):
        r = client.get(f"/v1/results/{key}", params={"lang": "es"})
        assert r.status_code == 200
        assert r.json()["id"] == first["id"] and r.json()["language"] == "es"
        assert r.json()["diagnosis"]["name"] == "Roya del frijol"
    assert error_code(client.get("/v1/results/nope-unknown")) == "not_found"
    assert client.get("/v1/results/nope-unknown").status_code == 404
    assert client.get("/v1/results/" + "x" * 300).status_code == 422


def test_rejected_upload_reads_back_as_rejected(harness: Harness, client: TestClient) -> None:
    r = post_raw(client, leaf_jpeg()[:300])
    assert r.status_code == 422
    input_id = harness.submitted[-1].input_id
    assert harness.outbox.input_state(input_id) == "rejected"
    got = client.get(f"/v1/results/{input_id}")
    assert got.status_code == 422 and error_code(got) == "input_rejected"


def test_slow_diagnosis_answers_202_then_the_result_can_be_polled(tmp_path: Path) -> None:
    gate = threading.Event()
    h = build(tmp_path, HttpConfig(result_timeout_s=0.2), model=GatedModel(fake_crop_model(), gate))
    try:
        with TestClient(h.app, base_url=LOCAL) as c:
            r = post_raw(c, leaf_jpeg())
            assert r.status_code == 202
            assert r.json()["status"] == "pending"
            location = r.headers["location"]
            assert location == r.json()["location"] == f"/v1/results/{r.json()['input_id']}"
            assert c.get(location).status_code == 202
            gate.set()
            wait_for(lambda: c.get(location).status_code == 200, what="the pending result")
            assert c.get(location).json()["diagnosis"]["label"] == "Bean___bean_rust"
    finally:
        gate.set()
        h.close()


def test_models_health_ready_and_metrics(harness: Harness, client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert models["models"][0]["name"] == "fake_crop" and "Bean___bean_rust" in models["models"][0]["labels"]
    assert models["upload_pipeline"] == "crop"
    assert set(models["languages"]) >= {"en", "sw", "fr", "es", "hi"}
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    harness.ready.clear()
    r = client.get("/readyz")
    assert r.status_code == 503 and error_code(r) == "not_ready"
    post_raw(client, leaf_jpeg())
    post_raw(client, b"GIF89a not allowed")
    text = client.get("/metrics").text
    assert 'edge_agent_http_requests_total{route="/v1/diagnose",status="200"} 1.0' in text
    assert 'edge_agent_http_requests_total{route="/v1/diagnose",status="415"} 1.0' in text
    assert 'edge_agent_http_uploads_total{outcome="diagnosed"} 1.0' in text


def test_page_and_static_files_are_served_with_a_strict_policy(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'capture="environment"' in r.text and 'accept="image/*"' in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    for name in ("app.js", "i18n.js", "app.css", "icon.svg", "icon-192.png", "icon-512.png"):
        assert client.get(f"/static/{name}").status_code == 200
    manifest = client.get("/static/manifest.webmanifest")
    assert manifest.headers["content-type"].startswith("application/manifest+json") and manifest.json()["icons"]
    sw = client.get("/sw.js")  # the service worker: at the root (scope /), never cached, versioned by the page
    assert sw.status_code == 200 and sw.headers["content-type"].startswith("text/javascript")
    assert sw.headers["cache-control"] == "no-cache" and re.search(r'VERSION = "[0-9a-f]{16}"', sw.text)
    assert client.get("/static/../api/app.py").status_code == 404
    assert client.get("/docs").status_code == 404  # the Swagger page would pull a CDN: not served


def test_openapi_document_describes_every_route_body_and_error(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    assert {"/v1/diagnose", "/v1/results/{result_id}", "/v1/models", "/healthz", "/readyz", "/metrics", "/"} <= set(
        paths
    )
    post = paths["/v1/diagnose"]["post"]
    content = post["requestBody"]["content"]
    assert {"multipart/form-data", "image/jpeg", "image/png", "image/webp"} <= set(content)
    assert content["multipart/form-data"]["schema"]["required"] == ["image"]
    assert {"200", "202", "400", "401", "408", "413", "415", "422", "429", "503", "507"} <= set(post["responses"])
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/DiagnosisResponse")
    assert post["responses"]["415"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert {"lang", "crop"} <= {p["name"] for p in post["parameters"]}
    assert "HTTPBearer" in doc["components"]["securitySchemes"]
    schemas = doc["components"]["schemas"]
    assert {"DiagnosisResponse", "Diagnosis", "Alternative", "AdviceOut", "ErrorBody", "ModelsResponse"} <= set(schemas)


# -------------------------------------------------------------------------------------------------- bad images


def _jpeg_with_size(width: int, height: int) -> bytes:
    data = bytearray(leaf_jpeg((16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _png_text_bomb() -> bytes:
    data = png(np.full((16, 16, 3), 90, np.uint8))
    payload = b"comment\x00\x00" + zlib.compress(b"A" * 20_000_000, 9)
    chunk = struct.pack(">I", len(payload)) + b"zTXt" + payload + struct.pack(">I", zlib.crc32(b"zTXt" + payload))
    return data[:33] + chunk + data[33:]


def _bit_flipped() -> bytes:
    data = bytearray(leaf_jpeg())
    rng = np.random.default_rng(7)
    for i in rng.integers(len(data) // 3, len(data) - 4, 40):
        data[int(i)] ^= 0xFF
    return bytes(data)


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("evil.sh", "#!/bin/sh\nrm -rf /\n")
    return buf.getvalue()


def _rgb(size: tuple[int, int] = (40, 30)) -> PILImage.Image:
    return PILImage.fromarray(np.full((size[1], size[0], 3), 120, np.uint8))


BAD_IMAGES: list[tuple[str, Any, set[int], set[str]]] = [
    ("empty", lambda: b"", {400}, {"image_empty"}),
    ("truncated jpeg", lambda: leaf_jpeg()[:400], {422}, {"image_invalid"}),
    ("bit-flipped jpeg", _bit_flipped, {200, 422}, {"image_invalid"}),
    ("png bomb 30000x30000", lambda: _png_header_only(30000, 30000), {413}, {"image_too_large"}),
    ("jpeg header 65500x65500", lambda: _jpeg_with_size(65500, 65500), {413}, {"image_too_large"}),
    ("png huge text chunk", _png_text_bomb, {200, 422}, {"image_invalid"}),
    ("pdf named jpg", lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", {415}, {"image_unsupported_format"}),
    ("html named jpg", lambda: b"<html><script>alert(1)</script></html>", {415}, {"image_unsupported_format"}),
    ("elf named jpg", lambda: b"\x7fELF\x02\x01\x01" + b"\x00" * 64, {415}, {"image_unsupported_format"}),
    ("zip named jpg", _zip_bytes, {415}, {"image_unsupported_format"}),
    ("tiff", lambda: encode(_rgb(), "TIFF"), {415}, {"image_unsupported_format"}),
    ("psd", lambda: b"8BPS\x00\x01" + b"\x00" * 40, {415}, {"image_unsupported_format"}),
    ("eps", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", {415}, {"image_unsupported_format"}),
    ("jpeg 2000", lambda: b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 40, {415}, {"image_unsupported_format"}),
    ("gif", lambda: encode(_rgb(), "GIF"), {415}, {"image_unsupported_format"}),
]


@pytest.mark.parametrize(("name", "make", "statuses", "codes"), BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_bad_image_gets_a_stable_code_and_the_agent_keeps_serving(
    harness: Harness, client: TestClient, name: str, make: Any, statuses: set[int], codes: set[str]
) -> None:
    before = len(harness.submitted)
    r = post_raw(client, make())
    assert r.status_code in statuses, (r.status_code, r.text)
    if r.status_code != 200:
        assert error_code(r) in codes
    if r.status_code in (400, 415):  # refused from the first bytes: never accepted, never stored
        assert len(harness.submitted) == before
        assert spool_names(harness) == []
    elif r.status_code != 200:  # accepted, then rejected by the decoder: journalled as rejected
        assert harness.outbox.input_state(harness.submitted[-1].input_id) == "rejected"
    wait_for(lambda: spool_names(harness) == [], what="spool cleanup")
    assert post_raw(client, leaf_jpeg()).status_code == 200  # and the next farmer is served


def test_polyglot_jpeg_with_zip_appended_is_only_ever_read_as_a_jpeg(client: TestClient) -> None:
    r = post_raw(client, leaf_jpeg() + _zip_bytes())
    assert r.status_code == 200, r.text
    assert r.json()["diagnosis"]["label"] == "Bean___bean_rust"


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied_so_the_photo_comes_out_upright(client: TestClient, orientation: int) -> None:
    upright = PILImage.open(io.BytesIO(leaf_jpeg((200, 300))))  # bright upper half -> rust
    stored = upright.transpose(PILImage.Transpose.ROTATE_90 if orientation == 6 else PILImage.Transpose.ROTATE_270)
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    r = post_raw(client, encode(stored, "JPEG", exif=exif.tobytes(), quality=92))
    assert r.status_code == 200, r.text
    assert r.json()["diagnosis"]["label"] == "Bean___bean_rust"
    # without the tag the same pixels read as a healthy leaf: the orientation really mattered
    assert post_raw(client, encode(stored, "JPEG", quality=92)).json()["diagnosis"]["label"] == "Bean___healthy"


def test_malformed_exif_block_is_ignored(client: TestClient) -> None:
    data = leaf_jpeg()
    app1 = b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xf0garbage"
    bad = data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:]
    r = post_raw(client, bad)
    assert r.status_code == 200, r.text


CONVERTED = [
    ("cmyk jpeg", lambda: encode(_rgb().convert("CMYK"), "JPEG"), "image/jpeg"),
    ("16-bit png", lambda: png(np.full((20, 20), 40000, np.uint16)), "image/png"),
    ("grayscale png", lambda: png(np.full((20, 20), 128, np.uint8)), "image/png"),
    ("palette png", lambda: encode(_rgb().convert("P"), "PNG"), "image/png"),
    ("webp", lambda: encode(_rgb(), "WEBP"), "image/webp"),
    ("1x1 png", lambda: png(np.full((1, 1, 3), 128, np.uint8)), "image/png"),
    ("1x100000 png", lambda: png(np.full((100000, 1, 3), 128, np.uint8)), "image/png"),
]


@pytest.mark.parametrize(("name", "make", "ctype"), CONVERTED, ids=[c[0] for c in CONVERTED])
def test_unusual_but_valid_images_are_converted_and_diagnosed(
    client: TestClient, name: str, make: Any, ctype: str
) -> None:
    r = post_raw(client, make(), ctype)
    assert r.status_code == 200, r.text
    assert r.json()["diagnosis"]["recognised"] is True


# ----------------------------------------------------------------------------------------------- bad requests


def test_wrong_content_type_is_refused(client: TestClient) -> None:
    r = post_raw(client, leaf_jpeg(), "text/plain")
    assert r.status_code == 415 and error_code(r) == "unsupported_media_type"


@pytest.mark.parametrize("kind", ["fields", "files"])
def test_thousands_of_multipart_parts_are_refused(harness: Harness, client: TestClient, kind: str) -> None:
    parts = [field_part(f"f{i}", "x") if kind == "fields" else image_part(b"x", name=f"file{i}") for i in range(5000)]
    body, ctype = multipart([image_part(leaf_jpeg()), *parts])
    r = client.post("/v1/diagnose", content=body, headers={"content-type": ctype})
    assert r.status_code == 400 and error_code(r) == "multipart_invalid"
    assert harness.submitted == [] and spool_names(harness) == []


@pytest.mark.parametrize(
    ("boundary", "declared"),
    [
        ("b", "multipart/form-data"),  # no boundary at all
        ("b" * 5000, None),  # absurdly long
        ("ends with space ", 'multipart/form-data; boundary="ends with space "'),
        ("at@sign", None),  # outside the RFC 2046 alphabet
        ("\x01\x02ctl", None),  # control characters
    ],
    ids=["missing", "5000 chars", "trailing space", "bad character", "control chars"],
)
def test_hostile_multipart_boundary_is_refused(
    harness: Harness, client: TestClient, boundary: str, declared: str | None
) -> None:
    body, ctype = multipart([image_part(leaf_jpeg())], boundary=boundary)
    r = client.post("/v1/diagnose", content=body, headers={"content-type": declared or ctype})
    assert r.status_code == 400 and error_code(r) == "multipart_invalid"
    assert harness.submitted == [] and spool_names(harness) == []


@pytest.mark.parametrize(
    ("parts", "code"),
    [
        ([field_part("lang", "sw")], "image_missing"),
        ([image_part(leaf_jpeg()), image_part(leaf_jpeg())], "multipart_invalid"),
        ([image_part(leaf_jpeg()), field_part("crop", "x" * 500)], "multipart_invalid"),
    ],
    ids=["no image", "two images", "oversized hint"],
)
def test_malformed_multipart_forms_are_refused(
    harness: Harness, client: TestClient, parts: list[tuple[str, bytes]], code: str
) -> None:
    body, ctype = multipart(parts)
    r = client.post("/v1/diagnose", content=body, headers={"content-type": ctype})
    assert r.status_code == 400 and error_code(r) == code
    assert harness.submitted == [] and spool_names(harness) == []


def test_multipart_body_that_never_closes_is_refused(harness: Harness, client: TestClient) -> None:
    body, ctype = multipart([image_part(leaf_jpeg())])
    r = client.post(
        "/v1/diagnose", content=body[: -len("--edgeboundary42--\r\n") - 10], headers={"content-type": ctype}
    )
    assert r.status_code == 400 and error_code(r) == "multipart_invalid"
    assert harness.submitted == [] and spool_names(harness) == []


@pytest.mark.parametrize(
    "filename",
    ["../../etc/cron.d/x", "a.jpg\x00.sh", "x" * 4096 + ".jpg", "\u202egpj.exe", "/etc/passwd", "C:\\Windows\\x.jpg"],
    ids=["dot-dot", "nul byte", "4 KB", "right-to-left mark", "absolute", "windows"],
)
def test_client_file_names_are_never_used_as_paths(tmp_path: Path, filename: str) -> None:
    gate = threading.Event()  # hold the diagnosis so the spooled file can be looked at
    h = build(tmp_path / "agent", HttpConfig(result_timeout_s=0.05), model=GatedModel(fake_crop_model(), gate))
    try:
        with TestClient(h.app, base_url=LOCAL) as c:
            body, ctype = multipart([image_part(leaf_jpeg(), filename=filename)])
            r = c.post("/v1/diagnose", content=body, headers={"content-type": ctype})
            assert r.status_code == 202
            names = spool_names(h)
            assert len(names) == 1 and GOOD_ID.match(names[0]), names
            pending = h.outbox.pending_inputs()
            assert len(pending) == 1 and Path(pending[0].spool_path or "").parent == h.spool_dir
            assert pending[0].spool_path == str(h.spool_dir / names[0])
            assert not any(n in str(pending[0].meta) for n in ("etc", "passwd", ".sh", "Windows", "gpj"))
            everything = [p.name for p in tmp_path.rglob("*")]
            assert not any(("cron" in n or "passwd" in n or n.endswith(".sh") or "gpj" in n) for n in everything)
            gate.set()
            wait_for(lambda: c.get(r.headers["location"]).status_code == 200, what="the diagnosis")
    finally:
        gate.set()
        h.close()


# ----------------------------------------------------------------------------------------------- capacity


def test_storage_full_refuses_the_upload_with_507_and_retry_after(tmp_path: Path) -> None:
    h = build(tmp_path)
    real = h.outbox.check_capacity

    def full() -> None:
        raise StorageFullError("disk full")

    h.outbox.check_capacity = full  # type: ignore[method-assign]
    try:
        with TestClient(h.app, base_url=LOCAL) as c:
            r = post_raw(c, leaf_jpeg())
            assert r.status_code == 507 and error_code(r) == "storage_full"
            assert int(r.headers["retry-after"]) > 0
            assert spool_names(h) == [] and h.submitted == []
            h.outbox.check_capacity = real  # type: ignore[method-assign]
            assert post_raw(c, leaf_jpeg()).status_code == 200  # recovers by itself
    finally:
        h.close()


def test_overloaded_pipeline_answers_503_and_forgets_the_upload(tmp_path: Path) -> None:
    def refuse(item: InputItem) -> Any:
        raise OverloadedError("queue full")

    h = build(tmp_path, HttpConfig(queue_wait_s=0.05), submit=refuse)
    try:
        with TestClient(h.app, base_url=LOCAL) as c:
            r = post_raw(c, leaf_jpeg())
            assert r.status_code == 503 and error_code(r) == "overloaded" and r.headers["retry-after"]
        assert h.outbox.pending_inputs() == []  # journalled as refused, not left to a restart
        assert spool_names(h) == []
    finally:
        h.close()


def test_full_queue_is_waited_on_briefly_before_503(tmp_path: Path) -> None:
    gate = threading.Event()
    h = build(tmp_path, HttpConfig(queue_wait_s=10.0), model=GatedModel(fake_crop_model(), gate), queue_size=1)
    results: list[int] = []
    try:
        with TestClient(h.app, base_url=LOCAL) as c:
            threads = [
                threading.Thread(target=lambda: results.append(post_raw(c, leaf_jpeg()).status_code)) for _ in range(4)
            ]
            for t in threads:
                t.start()
            wait_for(lambda: len(h.submitted) >= 2, what="the queue to fill")
            gate.set()
            for t in threads:
                t.join(20)
        assert results == [200, 200, 200, 200]
    finally:
        gate.set()
        h.close()


# ------------------------------------------------------------------------------------------------ auth


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# cooperative board\n{TOKEN}\n{OLD_TOKEN} 2001-01-01T00:00:00Z\n")
    return path


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "unauthorized"),
        ("Bearer wrong-token-0123456789abcdef", "unauthorized"),
        (f"Basic {TOKEN}", "unauthorized"),
        ("Bearer ", "unauthorized"),
        (f"Bearer {OLD_TOKEN}", "token_expired"),
    ],
    ids=["missing", "wrong", "wrong scheme", "empty", "expired"],
)
def test_bad_tokens_get_401(tmp_path: Path, tokens_file: Path, header: str | None, code: str) -> None:
    h = build(tmp_path, HttpConfig(tokens_file=tokens_file, bind="0.0.0.0"))
    try:
        with TestClient(h.app, base_url=LOCAL) as c:
            headers = {"authorization": header} if header else {}
            for method, path in (("POST", "/v1/diagnose"), ("GET", "/v1/models"), ("GET", "/metrics")):
                r = c.request(method, path, content=leaf_jpeg(), headers={"content-type": "image/jpeg", **headers})
                assert r.status_code == 401 and error_code(r) == code
                assert r.headers["www-authenticate"].startswith("Bearer")
            assert h.submitted == []
            good = {"authorization": f"Bearer {TOKEN}", "content-type": "image/jpeg"}
            assert c.post("/v1/diagnose", content=leaf_jpeg(), headers=good).status_code == 200
            for public in ("/", "/healthz", "/readyz", "/static/app.js", "/openapi.json"):
                assert c.get(public).status_code == 200, public
    finally:
        h.close()


def test_token_is_checked_before_the_body_is_read(tmp_path: Path, tokens_file: Path) -> None:
    h = build(tmp_path, HttpConfig(tokens_file=tokens_file))
    try:
        with serve(h.app) as port:
            head = (
                b"POST /v1/diagnose HTTP/1.1\r\nHost: [::1]\r\n"
                b"Content-Type: image/jpeg\r\nContent-Length: 10000000\r\n\r\n"
            )
            response, _ = raw_http(port, head)  # not a byte of the body is ever sent
            assert status_of(response) == 401 and b'"unauthorized"' in response
    finally:
        h.close()


def test_auth_is_required_when_not_bound_to_loopback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tokens_file"):
        build(tmp_path, HttpConfig(bind="0.0.0.0"))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("short\n", "shorter than 16"),
        ("# nothing\n", "no tokens"),
        (f"{TOKEN} not-a-date\n", "bad expiry"),
        ("", "no tokens"),
    ],
)
def test_bad_tokens_file_fails_fast(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TokenSet.parse(text, "tokens")


def test_token_comparison_checks_every_token() -> None:
    tokens = TokenSet.parse(f"{TOKEN}\n{'b' * 32}\n", "tokens")
    assert tokens.check(f"Bearer {TOKEN}", time.time()) == "ok"
    assert tokens.check(f"bearer {'b' * 32}", time.time()) == "ok"
    assert tokens.check(f"Bearer {TOKEN[:-1]}", time.time()) == "invalid"


# ------------------------------------------------------------------------------------------------ rate limit


def test_burst_from_one_client_gets_429_with_retry_after(tmp_path: Path) -> None:
    h = build(tmp_path, HttpConfig(rate_limit_per_minute=60, rate_limit_burst=5))
    try:
        with TestClient(h.app, base_url=LOCAL) as c:
            codes = [c.get("/v1/models").status_code for _ in range(100)]
            assert codes[:5] == [200] * 5 and set(codes[5:]) == {429}
            r = c.get("/v1/models")
            assert error_code(r) == "rate_limited" and int(r.headers["retry-after"]) >= 1
            assert c.get("/healthz").status_code == 200  # probes and the page are not limited
            assert c.get("/").status_code == 200
            metrics = generate_latest(h.registry).decode()
            assert 'edge_agent_http_refused_total{reason="rate_limited"} 96.0' in metrics
    finally:
        h.close()


def test_rate_limit_refills_over_time_and_is_per_client() -> None:
    now = [0.0]

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never called here
        return None

    limiter = RateLimit(app, per_minute=60, burst=2, applies=lambda p: True, clock=lambda: now[0], max_clients=3)
    assert limiter.take("a") == 0.0 and limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(1.0)
    assert limiter.take("b") == 0.0  # another client has its own bucket
    now[0] += 1.0
    assert limiter.take("a") == 0.0  # one token back after a second at 60/min
    for client in ("c", "d", "e", "f"):
        limiter.take(client)
    assert len(limiter._buckets) == 3  # bounded memory


# --------------------------------------------------------------------------------- streaming, real uvicorn server


def test_oversize_body_with_content_length_gets_413_before_it_is_read(tmp_path: Path) -> None:
    h = build(tmp_path, HttpConfig(max_body_bytes=1_000_000))
    try:
        with serve(h.app) as port:
            head = (
                b"POST /v1/diagnose HTTP/1.1\r\nHost: [::1]\r\n"
                b"Content-Type: image/jpeg\r\nContent-Length: 60000000\r\n\r\n"
            )
            response, _ = raw_http(port, head)  # 60 MB declared, nothing sent
            assert status_of(response) == 413 and b'"body_too_large"' in response
        assert h.submitted == [] and spool_names(h) == []
    finally:
        h.close()


def test_chunked_body_is_aborted_at_the_limit(tmp_path: Path) -> None:
    limit = 1_000_000
    h = build(tmp_path, HttpConfig(max_body_bytes=limit))
    try:
        with serve(h.app) as port:
            head = (
                b"POST /v1/diagnose HTTP/1.1\r\nHost: [::1]\r\n"
                b"Content-Type: image/jpeg\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            piece = leaf_jpeg()[:3] + b"\x00" * (64 * 1024 - 3)

            def chunks() -> Iterator[bytes]:
                first = True
                for _ in range(200 * 16):  # 200 MB if nobody stops us
                    data = piece if first else b"\x00" * (64 * 1024)
                    first = False
                    yield f"{len(data):x}\r\n".encode() + data + b"\r\n"

            response, sent = raw_http(port, head, chunks())
            assert status_of(response) == 413 and b'"body_too_large"' in response
            assert sent < 20 * limit  # stopped near the limit, not after 200 MB
        wait_for(lambda: spool_names(h) == [], what="partial upload removed")
        assert h.submitted == [] and h.outbox.pending_inputs() == []
    finally:
        h.close()


def test_slow_body_is_cut_off(tmp_path: Path) -> None:
    h = build(tmp_path, HttpConfig(body_timeout_s=0.5))
    try:
        with serve(h.app) as port:
            head = (
                b"POST /v1/diagnose HTTP/1.1\r\nHost: [::1]\r\n"
                b"Content-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\n"
            )

            def trickle() -> Iterator[bytes]:
                for _ in range(1000):
                    time.sleep(0.05)  # the attack itself: one byte at a time
                    yield b"\xff"

            started = time.monotonic()
            response, sent = raw_http(port, head, trickle())
            assert status_of(response) == 408 and b'"body_timeout"' in response
            assert sent < 1000 and time.monotonic() - started < 10
        wait_for(lambda: spool_names(h) == [], what="partial upload removed")
        assert h.submitted == []
    finally:
        h.close()


def test_client_that_disconnects_mid_upload_leaves_nothing_behind(tmp_path: Path) -> None:
    h = build(tmp_path)
    try:
        with serve(h.app) as port:
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(
                    b"POST /v1/diagnose HTTP/1.1\r\nHost: [::1]\r\n"
                b"Content-Type: image/jpeg\r\n"
                    b"Content-Length: 100000\r\n\r\n"
                    + leaf_jpeg()[:2000]
                )
                wait_for(lambda: any(n.endswith(".part") for n in spool_names(h)), what="the upload to start")
            wait_for(lambda: spool_names(h) == [], what="partial upload removed")
            assert h.submitted == [] and h.outbox.pending_inputs() == []
            # and the server still serves
            r = httpx.post(
                f"http://127.0.0.1:{port}/v1/diagnose", content=leaf_jpeg(), headers={"content-type": "image/jpeg"}
            )
            assert r.status_code == 200
    finally:
        h.close()


def test_labels_without_advice_are_reported_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from edge_agent.api import ApiContext, create_app
    from tests.support.api_harness import advice_book

    ctx = ApiContext(
        settings=HttpConfig(),
        spool_dir=tmp_path,
        outbox=None,  # type: ignore[arg-type]  # not used by create_app
        submit=lambda item: None,  # type: ignore[arg-type,return-value]
        models=lambda: [{"name": "m", "version": "1", "task": "classification", "labels": ["Tomato___Late_blight"]}],
        is_ready=lambda: True,
        advice=advice_book(),
    )
    with caplog.at_level("WARNING", logger="edge_agent.api.app"):
        create_app(ctx)
    assert "Tomato___Late_blight" in caplog.text


def test_full_disk_refuses_the_upload_with_507_and_recovers(tmp_path: Path) -> None:
    """A real full disk: the spool is a 1 MB tmpfs in a private mount namespace (R9 for uploads)."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    spool = tmp_path / "spool"
    spool.mkdir()
    root = Path(__file__).resolve().parent.parent
    script = f"""
import json, sys
sys.path.insert(0, {str(root)!r})
from pathlib import Path
from fastapi.testclient import TestClient
from tests.support.api_harness import LOCAL, build, leaf_jpeg
h = build(Path({str(tmp_path)!r}))
out = {{}}
with TestClient(h.app, base_url=LOCAL) as c:
    big = leaf_jpeg()[:3] + b"\\0" * 3_000_000
    r = c.post("/v1/diagnose", content=big, headers={{"content-type": "image/jpeg"}})
    out["full"] = [r.status_code, r.json()["error"]["code"], r.headers.get("retry-after")]
    out["left"] = sorted(p.name for p in h.spool_dir.iterdir())
    r = c.post("/v1/diagnose", content=leaf_jpeg(), headers={{"content-type": "image/jpeg"}})
    out["after"] = r.status_code
    out["pending"] = len(h.outbox.pending_inputs())
h.close()
print(json.dumps(out))
"""
    unshare = shutil.which("unshare")
    assert unshare is not None
    (tmp_path / "full_disk.py").write_text(script)
    shell = f"mount -t tmpfs -o size=1m tmpfs {spool} && exec {sys.executable} {tmp_path / 'full_disk.py'}"
    flags = ["-m"] if os.geteuid() == 0 else ["-r", "-m"]
    run = subprocess.run([unshare, *flags, "sh", "-c", shell], capture_output=True, timeout=120, check=False, cwd=root)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    out = json.loads(run.stdout.decode().strip().splitlines()[-1])
    assert out["full"][:2] == [507, "storage_full"] and int(out["full"][2]) > 0
    assert out["left"] == []  # the partial photo was removed, nothing half-accepted
    assert out["after"] == 200 and out["pending"] == 0  # and the next upload works again


def test_burst_of_concurrent_uploads_every_one_answered_with_a_result(tmp_path: Path) -> None:
    """R13 (upload half, functional): 50 concurrent ~1 MB uploads through a small queue: no 5xx, every 2xx stored."""
    import asyncio

    settings = HttpConfig(rate_limit_burst=1000, queue_wait_s=60, result_timeout_s=60)
    h = build(tmp_path, settings, workers=2, queue_size=4)
    rng = np.random.default_rng(1)
    photo = encode(PILImage.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)), "JPEG", quality=95)
    assert len(photo) > 500_000

    async def burst(port: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits) as c:
            return await asyncio.gather(
                *(c.post("/v1/diagnose", files={"image": ("p.jpg", photo, "image/jpeg")}) for _ in range(50))
            )

    try:
        with serve(h.app) as port:
            responses = asyncio.run(burst(port))
        assert [r.status_code for r in responses] == [200] * 50
        ids = {r.json()["id"] for r in responses}
        assert len(ids) == 50 and all(h.outbox.get_result(i) is not None for i in ids)
        assert h.outbox.pending_inputs() == [] and spool_names(h) == []
    finally:
        h.close()
