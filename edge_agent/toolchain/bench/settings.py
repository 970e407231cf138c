"""What a benchmark run is given: its time budget and session settings, the cores it may use, a model's session."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from edge_agent.toolchain.bench.stats import QUICK, Budget
from edge_agent.vision.model import Model
from edge_agent.vision.runtime import RuntimeOptions


def session_of(model: Model) -> Any:
    """The onnxruntime session behind ``model`` (floor timings call ``session.run`` directly)."""
    session = getattr(model.runtime, "session", None)
    if session is None:
        raise TypeError(f"{model.name}: runtime {type(model.runtime).__name__} has no onnxruntime session")
    return session


@dataclass(frozen=True)
class BenchConfig:
    budget: Budget = QUICK
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    """Session settings of the latency measurements (floor, loop and naive share one session)."""
    photo_kinds: tuple[str, ...] = ("1080p", "12mp")
    naive: bool = True
    naive_kinds: tuple[str, ...] = ("frame", "1080p", "12mp")
    """Where to time the naive loop too (the 12 MP photo is the one with a target)."""
    pipelined_workers: int = 0
    """Worker threads of the pipelined run (0 = one per core; -1 = skip)."""
    pipelined_seconds: float = 2.0
    wait_for_write: bool = True
    """With a sink, also time ``loop_write_waited``: the loop blocking on each durable write before the next input
    (the headline ``loop`` overlaps the write with the next input on a commit thread, as the pipeline does)."""


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
