"""Outbox + MQTT delivery and HTTP diagnose measurements (need B's publisher and D's API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_agent import bench
from edge_agent.bundle import Bundle


def measure(bundles: list[Bundle], inputs: bench.BenchInputs, *, quick: bool, tmp_root: Path) -> dict[str, Any]:
    return {}
