"""What the HTTP API needs from the agent (contract 6), built by the service. No web framework here."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from edge_agent.config import HttpConfig
from edge_agent.flow.pipeline import InputItem, PipelineOutput
from edge_agent.sectors.advice import AdviceBook


class UploadStore(Protocol):
    """The outbox calls the API makes (``edge_agent.delivery.outbox.Outbox`` fits)."""

    def check_capacity(self) -> None: ...
    def accept_input(
        self,
        input_id: str,
        *,
        source: str,
        pipeline: str,
        spool_path: str | None,
        meta: dict[str, Any],
        idempotency_key: str | None = None,
    ) -> bool: ...
    def input_for_key(self, idempotency_key: str) -> str | None: ...
    def reject_input(self, input_id: str, code: str, message: str) -> None: ...
    def get_result(self, result_id: str) -> Any: ...
    def get_result_by_input(self, input_id: str) -> Any: ...
    def input_state(self, input_id: str) -> str | None: ...


@dataclass(frozen=True)
class ApiContext:
    """Collaborators of :func:`edge_agent.api.create_app`.

    ``submit`` queues an input on the upload pipeline (``pipeline``); ``models`` lists the loaded
    models as dicts (name, version, task, labels, license...); ``is_ready`` is true once the models
    are warmed up; ``registry`` is the Prometheus registry served at ``/metrics`` (the API adds its
    own HTTP collectors to it); ``advice`` defaults to the files shipped with the package.
    """

    settings: HttpConfig
    spool_dir: Path
    outbox: UploadStore
    submit: Callable[[InputItem], Future[PipelineOutput]]
    models: Callable[[], Sequence[Mapping[str, Any]]]
    is_ready: Callable[[], bool]
    registry: CollectorRegistry | None = None
    pipeline: str = "crop"
    advice: AdviceBook | None = None
    source: str = "http"
