"""Farmer advice data: every class of the crop model has every part of its advice in every language,
the loader names the file and key of any gap, and the page's UI strings are complete too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge_agent.bundles.bundle import load_bundle
from edge_agent.errors import ConfigError
from edge_agent.sectors.advice import (
    CROP_LABELS,
    NOT_RECOGNISED,
    REQUIRED_LANGUAGES,
    AdviceBook,
    load_advice,
    parse_language_pack,
)

from .conftest import CROPS, MODELS

ROOT = Path(__file__).resolve().parent.parent
ADVICE = ROOT / "edge_agent" / "sectors" / "advice"
STATIC = ROOT / "edge_agent" / "web" / "static"


@pytest.fixture(scope="module")
def book() -> AdviceBook:
    return load_advice()


def test_labels_are_the_crop_datasets_classes() -> None:
    # tests/data/crops holds one folder per class of each dataset (named as in ../shared/datasets/crops/*/train)
    plantvillage = sorted(p.name for p in (CROPS / "plantvillage").iterdir() if p.is_dir())
    ibean = sorted("Bean___" + p.name for p in (CROPS / "ibean").iterdir() if p.is_dir())
    assert len(plantvillage) == 12 and len(ibean) == 3
    assert sorted(CROP_LABELS) == sorted(plantvillage + ibean)
    assert sorted(CROP_LABELS) == sorted(load_bundle(MODELS / "crop_disease", verify=False).manifest.labels)


@pytest.mark.parametrize("lang", REQUIRED_LANGUAGES)
@pytest.mark.parametrize("label", [*CROP_LABELS, NOT_RECOGNISED])
def test_every_label_has_every_part_in_every_language(book: AdviceBook, lang: str, label: str) -> None:
    pack = book.packs[lang]
    advice = pack.labels[label]
    assert advice.name.strip() and advice.description.strip()
    assert advice.now and all(step.strip() for step in advice.now)
    assert advice.prevention and all(step.strip() for step in advice.prevention)
    crop = label.split("___", maxsplit=1)[0] if "___" in label else None
    if crop is not None:
        assert pack.crops[crop].strip()
    if lang != "en":  # really translated, not copied
        assert advice.now != book.packs["en"].labels[label].now


def test_disclaimer_names_the_extension_officer_in_every_language(book: AdviceBook) -> None:
    words = {
        "en": "extension officer",
        "sw": "afisa ugani",
        "fr": "conseiller agricole",
        "es": "extensionista",
        "hi": "कृषि विस्तार अधिकारी",
    }
    for lang, word in words.items():
        assert word in book.packs[lang].disclaimer


def test_language_choice_follows_the_request_and_falls_back_to_english(book: AdviceBook) -> None:
    assert book.pick_language("sw-KE") == "sw"
    assert book.pick_language("de-DE,fr;q=0.8") == "fr"
    assert book.pick_language("HI_in") == "hi"
    assert book.pick_language("zz") == "en" and book.pick_language(None) == "en"
    assert book.advice("Bean___bean_rust", "es") is not None
    assert book.advice("Tomato___mystery", "es") is None


def test_a_missing_label_is_reported_with_language_and_label(tmp_path: Path) -> None:
    for f in ADVICE.glob("*.yaml"):
        text = f.read_text(encoding="utf-8")
        if f.name == "fr.yaml":
            text = re.sub(r"\n  Bean___bean_rust:\n(    .*\n|      .*\n)+", "\n", text)
        (tmp_path / f.name).write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="fr: Bean___bean_rust"):
        load_advice(tmp_path)


def test_a_missing_language_is_reported(tmp_path: Path) -> None:
    for f in ADVICE.glob("*.yaml"):
        if f.name != "hi.yaml":
            (tmp_path / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(ConfigError, match="missing languages: hi"):
        load_advice(tmp_path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("language: en\n  bad: [indent", "invalid YAML"),
        ("- a list\n", "mapping"),
        (
            "language: en\nlanguage_name: E\ndisclaimer: d\ncrops: {}\nlabels:\n  X:\n    name: n\n",
            "labels.X.description",
        ),
        (
            "language: en\nlanguage_name: E\ndisclaimer: d\ncrops: {}\nlabels:\n  X:\n    name: n\n    description: d\n"
            "    now: [a]\n    prevention:\n      - Rotate: no pepper\n",
            "labels.X.prevention.0",
        ),
        ("language: en\nlanguage_name: E\ndisclaimer: d\ncrops: {}\nlabels: {}\nextra: 1\n", "extra"),
        ("!!python/object/apply:os.system ['true']\n", "invalid YAML"),
    ],
    ids=["syntax", "not a mapping", "missing field", "colon in a step", "unknown key", "python tag"],
)
def test_broken_advice_file_names_file_and_key(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        parse_language_pack(text, "advice/xx.yaml")
    assert str(info.value).startswith("advice/xx.yaml: ")


def _ui_keys(js: str) -> dict[str, set[str]]:
    blocks = re.split(r"\n  ([a-z]{2}): \{\n", js)[1:]
    return {blocks[i]: set(re.findall(r"^    (\w+):", blocks[i + 1], re.M)) for i in range(0, len(blocks), 2)}


def test_page_ui_strings_exist_in_every_language() -> None:
    keys = _ui_keys((STATIC / "i18n.js").read_text(encoding="utf-8"))
    assert set(keys) == set(REQUIRED_LANGUAGES)
    assert len(keys["en"]) > 25
    for lang, have in keys.items():
        assert have == keys["en"], (lang, keys["en"] ^ have)
    used = set(re.findall(r'data-t="(\w+)"', (STATIC / "index.html").read_text(encoding="utf-8")))
    used |= set(re.findall(r'\bt\("(\w+)"\)', (STATIC / "app.js").read_text(encoding="utf-8")))
    used |= set(re.findall(r'status\("(\w+)"', (STATIC / "app.js").read_text(encoding="utf-8")))
    assert used <= keys["en"], used - keys["en"]


def test_page_weight_is_under_100_kb_and_loads_nothing_from_elsewhere() -> None:
    files = sorted(p for p in STATIC.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    assert total < 100 * 1024, total
    for p in files:
        if p.suffix == ".png":  # the app icons
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size < 8 * 1024, p.name
            continue
        text = re.sub(r'xmlns="http://www\.w3\.org/[^"]*"', "", p.read_text(encoding="utf-8"))
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), p.name
        assert "@import" not in text and "fonts.googleapis" not in text
