"""The shipped crop model behind the HTTP API: sample leaf photos (tests/data) come back with the right disease and
advice in the farmer's language, and photos that are not leaves come back as "not a recognised leaf".

Tolerant on purpose (4 of 5 per class): this checks the wiring from upload to advice with the real
model, not its accuracy (that is the model card's job, on a held-out split)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edge_agent.bundles.bundle import load_bundle
from edge_agent.vision.model import Model
from edge_agent.vision.runtime import RuntimeOptions
from tests.support.api_harness import LOCAL, Harness, build

from .conftest import TEST_DATA

ROOT = Path(__file__).resolve().parent.parent
DATA = TEST_DATA
BUNDLE = ROOT / "models" / "crop_disease"


def photos(folder: Path, n: int = 5) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Harness, TestClient]]:
    model = Model.load(load_bundle(BUNDLE), RuntimeOptions(intra_op_threads=1))
    h = build(tmp_path_factory.mktemp("crop_model"), model=model)
    with TestClient(h.app, base_url=LOCAL) as client:
        yield h, client
    h.close()


@pytest.mark.parametrize(
    ("folder", "label", "swahili"),
    [
        ("crops/ibean/bean_rust", "Bean___bean_rust", "Kutu ya maharagwe"),
        ("crops/plantvillage/Apple___Apple_scab", "Apple___Apple_scab", "Ukoko wa tufaha (apple scab)"),
        ("crops/plantvillage/Corn___Common_rust", "Corn___Common_rust", "Kutu ya kawaida ya mahindi"),
    ],
)
def test_leaf_photos_get_their_disease_and_advice(
    agent: tuple[Harness, TestClient], folder: str, label: str, swahili: str
) -> None:
    _, client = agent
    answers = []
    for path in photos(DATA / folder):
        r = client.post(
            "/v1/diagnose", params={"lang": "sw"}, files={"image": (path.name, path.read_bytes(), "image/jpeg")}
        )
        assert r.status_code == 200, r.text
        answers.append(r.json())
    right = [a for a in answers if a["diagnosis"]["label"] == label]
    assert len(right) >= 4, [a["diagnosis"]["label"] for a in answers]
    assert all(a["diagnosis"]["name"] == swahili and a["advice"]["now"] for a in right)


def test_photos_that_are_not_leaves_are_not_recognised(agent: tuple[Harness, TestClient]) -> None:
    _, client = agent
    labels = []
    for path in photos(DATA / "coco_demo" / "images"):
        r = client.post(
            "/v1/diagnose", params={"lang": "fr"}, content=path.read_bytes(), headers={"content-type": "image/jpeg"}
        )
        assert r.status_code == 200, r.text
        labels.append(r.json()["diagnosis"]["label"])
        if labels[-1] == "not_recognised":
            assert r.json()["diagnosis"]["name"] == "Feuille non reconnue"
    assert labels.count("not_recognised") >= 4, labels
