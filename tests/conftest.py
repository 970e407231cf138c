"""Shared fixtures. The shared datasets live beside the repo, in ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MODELS = ROOT / "models"
COCO_DEMO = SHARED / "datasets" / "livestock" / "coco_demo"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED.is_dir(), f"shared data expected at {SHARED}"
    return SHARED


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS
