"""The outbox's published interface: what every other part may ask of it, as roles, and the rows it hands out.

``delivery.outbox.Outbox`` (SQLite) implements all of it. Each consumer types its collaborator with the role it
uses, so a test can hand it a fake of that role alone:

=================  ===================================================  ==================================
role               calls                                                used by
=================  ===================================================  ==================================
``InputJournal``   check_capacity, accept_input, input_state,           folder source, HTTP upload
                   reject_input, pending_inputs
``ResultJournal``  add_result, reject_input                             pipeline
``ResultReader``   get_result, get_result_by_input, input_for_key       HTTP API (results, Idempotency-Key)
``OutboxInterface``  all three                                          the composition root
=================  ===================================================  ==================================

Pure: dataclasses and protocols, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class PendingInput:
    """An input accepted (journalled, bytes durable) that has no result or rejection yet."""

    input_id: str
    source: str
    pipeline: str
    spool_path: str | None
    meta: dict[str, Any]
    accepted_at: float


@dataclass(frozen=True)
class StoredResult:
    """A result row: durable, numbered per device (``seq``), deleted only by the coordinator's end-to-end ack."""

    result_id: str
    seq: int
    input_id: str
    pipeline: str
    model: str
    model_version: str
    created_at: float
    body: dict[str, Any]
    size: int = 0
    acked: bool = False


class InputJournal(Protocol):
    """Accept an input before working on it (its bytes already durable), so that nothing accepted is lost."""

    def check_capacity(self) -> None:
        """Raise StorageFullError when no new input may be taken (caps, or the disk short of space)."""
        ...

    def accept_input(
        self,
        input_id: str,
        *,
        source: str,
        pipeline: str,
        spool_path: str | None,
        meta: dict[str, Any],
        idempotency_key: str | None = None,
    ) -> bool:
        """Journal an input; False when ``input_id`` was already journalled (nothing changes then)."""
        ...

    def input_state(self, input_id: str) -> str | None:
        """``pending``, ``done``, ``rejected``, or None for an input never journalled."""
        ...

    def reject_input(self, input_id: str, code: str, message: str) -> None:
        """Settle an input that will never have a result, with an error code."""
        ...

    def pending_inputs(self) -> list[PendingInput]:
        """Accepted inputs without a result or rejection, oldest first."""
        ...


class ResultJournal(Protocol):
    """Store a result and settle its input in one transaction."""

    def add_result(
        self, input_id: str, *, pipeline: str, model: str, model_version: str, body: dict[str, Any]
    ) -> StoredResult: ...

    def reject_input(self, input_id: str, code: str, message: str) -> None: ...


class ResultReader(Protocol):
    """Read back what is stored (results kept until acknowledged, and for ``retention_s`` after)."""

    def get_result(self, result_id: str) -> StoredResult | None: ...

    def get_result_by_input(self, input_id: str) -> StoredResult | None: ...

    def input_for_key(self, idempotency_key: str) -> str | None:
        """The input an ``Idempotency-Key`` was first used for, or None."""
        ...


class OutboxInterface(InputJournal, ResultJournal, ResultReader, Protocol):
    """Everything the outbox offers the rest of the agent (the publisher also drains it: ``delivery.outbox``)."""
