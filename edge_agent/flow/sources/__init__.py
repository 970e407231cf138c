"""Where inputs come from: watched folders and cameras (HTTP uploads live in ``edge_agent.api``).

Every source is built with what it needs (its config, a ``submit`` callable into a pipeline, the
outbox journal, metrics) and offers ``start()``, ``stop(timeout)`` and ``health()``.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from edge_agent.flow.pipeline import InputItem, PipelineOutput

Submit = Callable[[InputItem], "Future[PipelineOutput]"]


class Source(Protocol):
    name: str

    def start(self) -> None: ...
    def stop(self, timeout: float = 5.0) -> bool: ...
    def health(self) -> dict[str, Any]: ...
