"""What the HTTP API needs from the agent (contract 6), built by the service. No web framework here."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from edge_agent.config import HttpConfig
from edge_agent.delivery.interface import InputJournal, ResultReader
from edge_agent.flow.pipeline import InputItem, PipelineOutput
from edge_agent.sectors.advice import AdviceBook


class UploadJournal(InputJournal, ResultReader, Protocol):
    """The outbox roles the API uses: journal uploads, read results back (``delivery.interface``)."""


@dataclass(frozen=True)
class ApiContext:
    """Collaborators of :func:`edge_agent.api.create_app`.

    ``submit`` queues an input on the upload pipeline (``pipeline``); ``models`` lists the loaded
    models as dicts (name, version, task, labels, license...); ``is_ready`` is true once the models
    are warmed up; ``registry`` is the Prometheus registry served at ``/metrics`` (the API adds its
    own HTTP collectors to it); ``advice`` defaults to the files shipped with the package; ``feedback(id, kind,
    operator=, note=, via=)`` stores an operator's feedback on an inspected part (``delivery.feedback``), None where
    no pipeline keeps images for it.
    """

    settings: HttpConfig
    spool_dir: Path
    outbox: UploadJournal
    submit: Callable[[InputItem], Future[PipelineOutput]]
    models: Callable[[], Sequence[Mapping[str, Any]]]
    is_ready: Callable[[], bool]
    registry: CollectorRegistry | None = None
    pipeline: str = "crop"
    advice: AdviceBook | None = None
    source: str = "http"
    feedback: Callable[..., dict[str, Any]] | None = None
    line_trigger: Callable[..., Future[Any]] | None = None
    """``LineController.trigger`` (recipe, part_id, data=bytes, source=...) -> Future of a decision with
    ``to_dict()``; None where no line recipe is configured (the trigger route answers 404)."""
