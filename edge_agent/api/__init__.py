"""The HTTP API and farmer page (contract 6): ``create_app(ctx: ApiContext) -> FastAPI``.

Importing this package imports FastAPI; the service imports it only when ``http.enabled``.
"""

from __future__ import annotations

from edge_agent.api.app import create_app
from edge_agent.api.context import ApiContext

__all__ = ["ApiContext", "create_app"]
