"""Inference runtime: a one-method interface, the onnxruntime adapter, and an in-package fake.

This is the only module that imports onnxruntime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from edge_agent.errors import RuntimeBackendError

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]

DEFAULT_PROVIDERS: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
)
GraphOptimization = Literal["disable", "basic", "extended", "all"]


@dataclass(frozen=True)
class RuntimeOptions:
    """How to build an inference session."""

    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    """Execution providers in order of preference; missing ones are skipped with a logged reason."""
    intra_op_threads: int = 0
    """Threads inside one inference (0 = onnxruntime's default, one per core)."""
    inter_op_threads: int = 1
    graph_optimization: GraphOptimization = "all"
    allow_spinning: bool = True
    """Intra-op threads busy-wait between ops; turn off when several sessions share the cores."""
    memory_pattern: bool = False
    """onnxruntime memory-pattern planning: off saved ~23 MB on a 640 detector at no speed cost."""
    provider_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


class Runtime(Protocol):
    """Runs one model: named input arrays in, named output arrays out."""

    @property
    def input_names(self) -> tuple[str, ...]: ...

    @property
    def output_names(self) -> tuple[str, ...]: ...

    @property
    def provider(self) -> str: ...

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]: ...


def available_providers() -> list[str]:
    """Execution providers compiled into the installed onnxruntime."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def select_providers(preference: Sequence[str], available: Sequence[str]) -> tuple[list[str], list[str]]:
    """Pick the preferred providers that exist, CPU always last; returns (chosen, reasons for skips)."""
    chosen: list[str] = []
    skipped: list[str] = []
    for name in preference:
        if name in available:
            chosen.append(name)
        else:
            skipped.append(f"{name} not available in this onnxruntime build")
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen, skipped


class OrtRuntime:
    """onnxruntime InferenceSession behind the :class:`Runtime` interface. ``run`` is thread-safe."""

    def __init__(self, model_path: Path, options: RuntimeOptions = RuntimeOptions()) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[options.graph_optimization]
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.enable_mem_pattern = options.memory_pattern
        so.log_severity_level = 3
        if not options.allow_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        chosen, skipped = select_providers(options.providers, available_providers())
        for reason in skipped:
            log.info("execution provider skipped: %s", reason)
        provider_args: list[str | tuple[str, dict[str, str]]] = [
            (p, dict(options.provider_options[p])) if p in options.provider_options else p for p in chosen
        ]
        try:
            self._session = ort.InferenceSession(str(model_path), sess_options=so, providers=provider_args)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise RuntimeBackendError(f"{model_path.name}: cannot create inference session: {exc}") from exc
        active = self._session.get_providers()
        for p in chosen:
            if p not in active:
                log.warning("execution provider %s failed to initialise; falling back to %s", p, active[0])
        self._provider = str(active[0])
        self._inputs = tuple(i.name for i in self._session.get_inputs())
        self._outputs = tuple(o.name for o in self._session.get_outputs())
        self.input_shapes = {i.name: tuple(i.shape) for i in self._session.get_inputs()}

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._inputs

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def session(self) -> Any:
        """The onnxruntime InferenceSession (benchmarks time ``session.run`` alone against the loop)."""
        return self._session

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        try:
            outs = self._session.run(None, dict(feeds))
        except Exception as exc:
            raise RuntimeBackendError(f"inference failed: {exc}") from exc
        return dict(zip(self._outputs, outs, strict=True))


class FakeRuntime:
    """A runtime for tests: ``fn`` maps the feeds to the outputs."""

    def __init__(
        self,
        input_names: tuple[str, ...],
        output_names: tuple[str, ...],
        fn: Callable[[Mapping[str, Array]], dict[str, Array]],
    ) -> None:
        self._inputs = input_names
        self._outputs = output_names
        self._fn = fn
        self.calls = 0

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._inputs

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    @property
    def provider(self) -> str:
        return "FakeRuntime"

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        self.calls += 1
        out = self._fn(feeds)
        return {k: np.asarray(v) for k, v in out.items()}
