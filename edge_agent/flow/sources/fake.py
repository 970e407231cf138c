"""A source that submits what a test pushes into it: the fake beside the real folder and camera sources."""

from __future__ import annotations

import itertools
from concurrent.futures import Future
from typing import Any

from edge_agent.flow.pipeline import InputItem, PipelineOutput
from edge_agent.flow.sources import Submit
from edge_agent.types import Image


class FakeSource:
    """``push(data=...)`` or ``push(image=...)`` submits one input to ``pipeline`` and returns its future."""

    def __init__(self, name: str, pipeline: str, submit: Submit) -> None:
        self.name = name
        self.pipeline = pipeline
        self._submit = submit
        self._ids = itertools.count(1)
        self.started = False
        self.pushed = 0

    def start(self) -> None:
        self.started = True

    def stop(self, timeout: float = 5.0) -> bool:
        self.started = False
        return True

    def health(self) -> dict[str, Any]:
        return {"type": "fake", "state": "watching" if self.started else "stopped", "pushed": self.pushed}

    def push(
        self, *, data: bytes | None = None, image: Image | None = None, hints: dict[str, str] | None = None
    ) -> Future[PipelineOutput]:
        item = InputItem(
            input_id=f"{self.name}-{next(self._ids)}",
            pipeline=self.pipeline,
            source=self.name,
            data=data,
            image=image,
            hints=hints or {},
        )
        fut = self._submit(item)
        self.pushed += 1
        return fut
