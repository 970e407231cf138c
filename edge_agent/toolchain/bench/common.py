"""Types shared by the benchmark modules."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from edge_agent.types import Result

Stages = Mapping[str, float]
Step = Callable[[], Stages | None]
"""One timed call; may return per-stage milliseconds."""
ResultSink = Callable[[str, Result, dict[str, Any]], None]
"""(input_id, result, encoded document) -> None; e.g. an outbox write."""

PHOTO_SIZES: dict[str, tuple[int, int]] = {"1080p": (1920, 1080), "12mp": (4000, 3000)}
