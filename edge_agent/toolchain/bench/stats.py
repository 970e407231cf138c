"""Statistics and sampling: percentiles of a series, interleaved rounds of timed steps within a time budget."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_agent.toolchain.bench.common import Stages, Step


# ------------------------------------------------------------------ statistics and sampling
@dataclass(frozen=True)
class Stats:
    """Percentiles of a series of milliseconds."""

    n: int
    p50: float
    p95: float
    p99: float
    mean: float
    min: float

    @staticmethod
    def of(samples: Sequence[float]) -> Stats:
        if not samples:
            return Stats(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        a = np.asarray(samples, dtype=np.float64)
        p50, p95, p99 = np.percentile(a, [50, 95, 99])
        return Stats(int(a.size), float(p50), float(p95), float(p99), float(a.mean()), float(a.min()))

    def to_dict(self) -> dict[str, float | int]:
        return {k: (v if isinstance(v, int) else round(v, 4)) for k, v in self.__dict__.items()}


@dataclass
class Series:
    """Samples of one measured step: wall time, process CPU time and optional stages (ms)."""

    total: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)

    def add(self, total_ms: float, stages: Stages | None, cpu_ms: float = math.nan) -> None:
        self.total.append(total_ms)
        self.cpu.append(cpu_ms)
        for k, v in (stages or {}).items():
            self.stages.setdefault(k, []).append(v)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": Stats.of(self.total).to_dict(),
            "cpu": Stats.of([c for c in self.cpu if not math.isnan(c)]).to_dict(),
            "stages": {k: Stats.of(v).to_dict() for k, v in self.stages.items()},
        }

    @property
    def p50(self) -> float:
        return Stats.of(self.total).p50


@dataclass(frozen=True)
class Budget:
    """How long to sample a group of steps: at least ``min_reps`` rounds, then until ``seconds`` are spent."""

    seconds: float = 2.0
    min_reps: int = 10
    max_reps: int = 5000
    warmup: int = 3


QUICK = Budget(seconds=0.3, min_reps=4, max_reps=500, warmup=2)
FULL = Budget(seconds=10.0, min_reps=15, max_reps=20000, warmup=5)


def sample_interleaved(steps: Mapping[str, Step], budget: Budget) -> dict[str, Series]:
    """Time the steps call by call in alternating rounds (A B C, C B A, ...) so that load changes on
    a shared machine hit every step alike; each call records wall time and process CPU time."""
    series = {name: Series() for name in steps}
    for fn in steps.values():
        for _ in range(budget.warmup):
            fn()
    names = list(steps)
    clock = time.perf_counter
    cpu = time.process_time
    start = clock()
    rounds = 0
    while rounds < budget.min_reps or (clock() - start < budget.seconds and rounds < budget.max_reps):
        for name in names if rounds % 2 == 0 else reversed(names):
            fn = steps[name]
            c0 = cpu()
            t0 = clock()
            stages = fn()
            t1 = clock()
            series[name].add((t1 - t0) * 1000.0, stages, (cpu() - c0) * 1000.0)
        rounds += 1
    return series


