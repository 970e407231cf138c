"""Shared fixtures and paths. The sample images live in tests/data (sources and licences in tests/data/LICENSES.md):
the suite needs nothing outside this repository."""

from __future__ import annotations

import os
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
SHARED = Path(os.environ.get("EDGE_AGENT_SHARED") or ROOT.parent / "shared")
"""Data sets beside the repository (``../shared``; CI has them). Tests that read them are marked ``datasets``."""
DATASETS = SHARED / "datasets"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) the ``datasets`` tests when ../shared/datasets is missing, and say so once."""
    if DATASETS.is_dir():
        return
    needs = [item for item in items if item.get_closest_marker("datasets") is not None]
    if not needs:
        return
    items[:] = [item for item in items if item.get_closest_marker("datasets") is None]
    config.hook.pytest_deselected(items=needs)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    message = f"{len(needs)} dataset tests not run: ../shared/datasets not found ({DATASETS}; set EDGE_AGENT_SHARED)"
    if reporter is not None:
        reporter.write_line(message, yellow=True)


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
