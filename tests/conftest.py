"""Shared fixtures and paths. The sample images live in tests/data (sources and licences in tests/data/LICENSES.md):
the suite needs nothing outside this repository."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
TEST_DATA = ROOT / "tests" / "data"
COCO_DEMO = TEST_DATA / "coco_demo"
CROPS = TEST_DATA / "crops"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS
