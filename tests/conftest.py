"""Shared fixtures and paths. The sample images live in tests/data (sources and licences in tests/data/LICENSES.md):
the suite needs nothing outside this repository."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.coordinator.store import SqliteStore, Store
from edge_agent.coordinator.store_pg import PostgresStore
from tests.support.postgres import Postgres

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
TEST_DATA = ROOT / "tests" / "data"
COCO_DEMO = TEST_DATA / "coco_demo"
CROPS = TEST_DATA / "crops"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One private PostgreSQL server (initdb on a free loopback port) for the run; tests take a fresh database."""
    server = Postgres()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A coordinator store of each backend, so the same contract tests run against both."""
    s: Store
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "c.db")
    else:
        s = PostgresStore(request.getfixturevalue("postgres").new_database())
    yield s
    s.close()
