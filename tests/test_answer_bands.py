"""The four answer bands in the API: diagnosis, unsure, unknown_plant, retake (photo-quality check failed).

Given stored crop verdicts of each band, when they are presented in a language, then the answer carries the band,
the known crops (unknown_plant) or the retake hint in that language (retake), and no advice where nothing is
diagnosed. Given a real crop pipeline with its photo checks (``make_sector`` + ``decode_for_sector``) behind the
API, when a real leaf photo and a blurred copy of it are uploaded, then the first is diagnosed and the second is
answered "retake" with the blur hint, in the farmer's language.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from PIL import ImageFilter

from edge_agent.api import ApiContext, create_app
from edge_agent.api.present import present
from edge_agent.config import HttpConfig, PipelineConfig
from edge_agent.delivery.outbox import Outbox
from edge_agent.flow.pipeline import Pipeline, make_sector, sector_image_side
from tests.support.api_harness import LABELS, LOCAL, advice_book, fake_crop_model

from .conftest import CROPS

LEAF = CROPS / "ibean" / "bean_rust" / "bean_rust_train_0.jpg"


@dataclass
class Stored:
    body: dict[str, Any]
    result_id: str = "r1"
    seq: int = 1
    input_id: str = "i1"
    model: str = "crop"
    model_version: str = "1"
    created_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def top3() -> list[dict[str, Any]]:
    return [
        {"label": "Bean___bean_rust", "confidence": 0.45},
        {"label": "Bean___angular_leaf_spot", "confidence": 0.40},
        {"label": "Bean___healthy", "confidence": 0.15},
    ]


def verdict(**kw: Any) -> dict[str, Any]:
    base = {"crop": "Bean", "condition": "bean_rust", "label": "Bean___bean_rust", "healthy": False,
            "recognised": True, "confidence": 0.45, "top3": top3()}
    return {"sector": {**base, **kw}}


def test_diagnosis_band_and_verdicts_from_before_bands() -> None:
    book = advice_book()
    answer = present(Stored(verdict()), book, "en")
    assert answer.band == "diagnosis" and answer.advice is not None and answer.retake is None
    old = present(Stored(verdict(recognised=False, label="not_recognised", crop=None)), book, "en")
    assert old.band == "unknown_plant"  # stored before bands: "not recognised" reads as not a crop it knows


def test_unsure_band_keeps_the_top_two() -> None:
    answer = present(Stored(verdict(band="unsure", top2=top3()[:2])), advice_book(), "fr")
    assert answer.band == "unsure"
    assert [a.label for a in answer.alternatives[:2]] == ["Bean___bean_rust", "Bean___angular_leaf_spot"]


def test_unknown_plant_band_lists_the_known_crops_in_the_language() -> None:
    book = advice_book()
    v = verdict(band="unknown_plant", recognised=False, label="not_recognised", crop=None, condition=None,
                known_crops=["Apple", "Bean", "Corn"])
    answer = present(Stored(v), book, "sw")
    assert answer.band == "unknown_plant" and not answer.diagnosis.recognised
    assert [(c.crop, c.crop_name) for c in answer.known_crops] == [
        ("Apple", "Tufaha"), ("Bean", "Maharagwe"), ("Corn", "Mahindi")]
    fallback = present(Stored(verdict(band="unknown_plant", recognised=False, label="not_recognised")), book, "en")
    assert {c.crop for c in fallback.known_crops} == {label.split("___")[0] for label in LABELS}


@pytest.mark.parametrize("lang", ["en", "sw", "fr", "es", "hi"])
def test_retake_band_gives_the_hint_in_every_language(lang: str) -> None:
    book = advice_book()
    v = verdict(band="retake", recognised=False, label="not_recognised", crop=None, condition=None,
                retake={"code": "leaf_too_small", "hint": "retake.leaf_too_small"})
    answer = present(Stored(v), book, lang)
    texts = book.retake(lang)
    assert texts is not None and book.pack(lang).retake is texts  # every shipped language has its own texts
    assert answer.band == "retake" and answer.retake is not None
    assert answer.retake.code == "leaf_too_small" and answer.retake.hint == texts.leaf_too_small
    assert answer.diagnosis.name == texts.title and answer.advice is None


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    cfg = PipelineConfig(name="crop", kind="crop", model="fake")
    outbox = Outbox(tmp_path / "outbox.db", "test-device")
    pipeline = Pipeline("crop", [fake_crop_model()], outbox, kind="crop", sector=make_sector(cfg),
                        sector_image_side=sector_image_side(cfg))
    pipeline.start()
    (tmp_path / "spool").mkdir()
    ctx = ApiContext(
        settings=HttpConfig(), spool_dir=tmp_path / "spool", outbox=outbox, submit=pipeline.submit,
        models=lambda: [], is_ready=lambda: True, pipeline="crop", advice=advice_book(),
    )
    with TestClient(create_app(ctx), base_url=LOCAL) as c:
        yield c
    pipeline.stop(10)
    outbox.close()


def test_a_blurred_photo_is_answered_retake_and_a_sharp_one_is_diagnosed(client: TestClient) -> None:
    sharp = LEAF.read_bytes()
    buf = io.BytesIO()
    PILImage.open(LEAF).convert("RGB").filter(ImageFilter.GaussianBlur(4)).save(buf, "JPEG", quality=90)
    good = client.post("/v1/diagnose", content=sharp, headers={"content-type": "image/jpeg"}, params={"lang": "fr"})
    assert good.status_code == 200, good.text
    assert good.json()["band"] == "diagnosis" and good.json()["diagnosis"]["recognised"] is True
    bad = client.post("/v1/diagnose", content=buf.getvalue(), headers={"content-type": "image/jpeg"},
                      params={"lang": "fr"})
    assert bad.status_code == 200, bad.text
    answer = bad.json()
    assert answer["band"] == "retake" and answer["retake"]["code"] == "blurry"
    assert answer["retake"]["hint"] == advice_book().retake("fr").blurry  # type: ignore[union-attr]
    assert answer["diagnosis"]["recognised"] is False and answer["advice"] is None
    again = client.get(f"/v1/results/{answer['id']}", params={"lang": "hi"}).json()
    assert again["band"] == "retake" and again["retake"]["hint"] == advice_book().retake("hi").blurry  # type: ignore[union-attr]
