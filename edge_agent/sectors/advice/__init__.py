"""Crop advice for farmers: one YAML file per language next to this module (``en.yaml``,
``sw.yaml``, ...), editable by an agronomist, validated completely when loaded.

Each file holds ``language``, ``language_name``, ``disclaimer``, ``crops`` (crop id ->
display name) and ``labels`` (model label -> name, description, now, prevention). Every
language must cover every label the crop model knows plus ``not_recognised``.
:func:`parse_language_pack` is pure; :func:`load_advice` reads the files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.errors import ConfigError

_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
REQUIRED_LANGUAGES: tuple[str, ...] = ("en", "sw", "fr", "es", "hi")
DEFAULT_LANGUAGE = "en"
NOT_RECOGNISED = "not_recognised"
CROP_LABELS: tuple[str, ...] = (
    "Apple___Apple_scab",
    "Apple___Black_rot",
    "Apple___Cedar_apple_rust",
    "Apple___healthy",
    "Corn___Cercospora_leaf_spot_Gray_leaf_spot",
    "Corn___Common_rust",
    "Corn___Northern_Leaf_Blight",
    "Corn___healthy",
    "Pepper_bell___Bacterial_spot",
    "Pepper_bell___healthy",
    "Strawberry___Leaf_scorch",
    "Strawberry___healthy",
    "Bean___angular_leaf_spot",
    "Bean___bean_rust",
    "Bean___healthy",
)
"""The classes of the crop model (12 PlantVillage + 3 iBean); advice must cover each one."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Advice(_Strict):
    """What a farmer reads about one label, in one language."""

    name: str = Field(min_length=1, max_length=120, description="Display name of the diagnosis.")
    description: str = Field(min_length=1, max_length=600, description="What it is and how it looks.")
    now: tuple[str, ...] = Field(min_length=1, max_length=6, description="What to do now, one step per item.")
    prevention: tuple[str, ...] = Field(min_length=1, max_length=6, description="How to prevent it next time.")


class RetakeTexts(_Strict):
    """What a farmer reads when the photo failed a quality check (``edge_agent.sectors.retake``)."""

    title: str = Field(min_length=1, max_length=120, description="Heading, e.g. Please take the photo again.")
    too_dark: str = Field(min_length=1, max_length=300)
    too_bright: str = Field(min_length=1, max_length=300)
    blurry: str = Field(min_length=1, max_length=300)
    leaf_too_small: str = Field(min_length=1, max_length=300)


class LanguagePack(_Strict):
    """One advice file."""

    language: str = Field(pattern=r"^[a-z]{2,3}$", description="ISO 639 code, e.g. sw.")
    language_name: str = Field(min_length=1, description="The language's own name, e.g. Kiswahili.")
    disclaimer: str = Field(min_length=1, description="Guidance, not a substitute for an extension officer.")
    crops: dict[str, str] = Field(description="Crop id (the part of the label before ___) -> display name.")
    labels: dict[str, Advice] = Field(description="Model label -> advice.")
    retake: RetakeTexts | None = Field(default=None, description="Retake hints (missing: English is used).")


def parse_language_pack(text: str, source: str) -> LanguagePack:
    """Parse and validate one advice file's text (pure). Raises ConfigError naming file and key."""
    try:
        doc: Any = yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 - a SafeLoader (C version when available)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return LanguagePack.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ConfigError(f"{source}: {where}: {first['msg']}") from exc


def _crop_of(label: str) -> str | None:
    crop, sep, rest = label.partition("___")
    return crop if sep and crop and rest else None


@dataclass(frozen=True)
class AdviceBook:
    """All languages, checked complete for ``labels``."""

    packs: Mapping[str, LanguagePack]
    labels: tuple[str, ...]

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(self.packs)

    def pick_language(self, requested: str | None) -> str:
        """Best available language for ``requested`` (``"sw-KE"``, ``"fr"``, an Accept-Language value)."""
        for part in (requested or "").split(","):
            code = part.split(";")[0].strip().lower().replace("_", "-").split("-")[0]
            if code in self.packs:
                return code
        return DEFAULT_LANGUAGE if DEFAULT_LANGUAGE in self.packs else next(iter(self.packs))

    def pack(self, lang: str | None) -> LanguagePack:
        return self.packs[self.pick_language(lang)]

    def advice(self, label: str, lang: str | None) -> Advice | None:
        """Advice for ``label``; falls back to English, then None for an unknown label."""
        found = self.pack(lang).labels.get(label)
        if found is None and DEFAULT_LANGUAGE in self.packs:
            found = self.packs[DEFAULT_LANGUAGE].labels.get(label)
        return found

    def crop_name(self, crop: str | None, lang: str | None) -> str | None:
        if crop is None:
            return None
        return self.pack(lang).crops.get(crop) or crop.replace("_", " ")

    def retake(self, lang: str | None) -> RetakeTexts | None:
        """Retake hints in ``lang``, else English, else None."""
        found = self.pack(lang).retake
        if found is None and DEFAULT_LANGUAGE in self.packs:
            found = self.packs[DEFAULT_LANGUAGE].retake
        return found

    def missing(self, labels: Iterable[str]) -> list[str]:
        """``"<lang>: <label>"`` for every label (and its crop) that some language lacks."""
        out: list[str] = []
        for code, pack in self.packs.items():
            for label in labels:
                if label not in pack.labels:
                    out.append(f"{code}: {label}")
                crop = _crop_of(label)
                if crop is not None and crop not in pack.crops:
                    out.append(f"{code}: crop {crop}")
        return sorted(set(out))


def build_book(
    packs: Iterable[LanguagePack],
    labels: Iterable[str] = CROP_LABELS,
    languages: Iterable[str] = REQUIRED_LANGUAGES,
) -> AdviceBook:
    """Check that ``packs`` cover every required language and label (pure)."""
    by_code: dict[str, LanguagePack] = {}
    for pack in packs:
        if pack.language in by_code:
            raise ConfigError(f"advice: language {pack.language} defined twice")
        by_code[pack.language] = pack
    absent = [code for code in languages if code not in by_code]
    if absent:
        raise ConfigError(f"advice: missing languages: {', '.join(absent)}")
    wanted = (*dict.fromkeys([*labels, NOT_RECOGNISED]),)
    ordered = {code: by_code[code] for code in sorted(by_code, key=lambda c: (c != DEFAULT_LANGUAGE, c))}
    book = AdviceBook(packs=ordered, labels=wanted)
    gaps = book.missing(wanted)
    if gaps:
        raise ConfigError(f"advice: incomplete: {'; '.join(gaps[:10])}")
    return book


def load_advice(
    directory: Path | None = None,
    labels: Iterable[str] = CROP_LABELS,
    languages: Iterable[str] = REQUIRED_LANGUAGES,
) -> AdviceBook:
    """Read every ``*.yaml`` in ``directory`` (default: the files shipped with the package)."""
    packs: list[LanguagePack] = []
    if directory is None:
        root = resources.files(__name__)
        for entry in sorted(root.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".yaml"):
                packs.append(parse_language_pack(entry.read_text(encoding="utf-8"), f"advice/{entry.name}"))
    else:
        for path in sorted(directory.glob("*.yaml")):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}: unreadable: {exc}") from exc
            packs.append(parse_language_pack(text, str(path)))
    return build_book(packs, labels, languages)
