"""What the agent says about itself: ``ok``, ``degraded`` (broker, camera or disk trouble) or not ready, with the
models, pipelines, sources and alarms behind it. Heartbeats, ``/healthz`` and ``/readyz`` all read this."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_agent.bundles.bundle import Bundle
from edge_agent.delivery.outbox import Outbox
from edge_agent.flow.pipeline import Pipeline
from edge_agent.flow.sources import Source


def models_info(bundles: Mapping[str, Bundle], installed_from: Mapping[str, str]) -> list[dict[str, Any]]:
    """The loaded models, by config name: name, version, task, labels, licence, and ``config`` or ``update``."""
    return [
        {
            "name": b.manifest.name,
            "version": b.manifest.version,
            "task": b.manifest.task,
            "labels": list(b.manifest.labels),
            "license": b.manifest.license,
            "config_name": name,
            "installed_from": installed_from.get(name, "config"),
        }
        for name, b in bundles.items()
    ]


def agent_health(
    *,
    ready: bool,
    state: str,
    device: str,
    sources: Mapping[str, Source],
    publisher: str,
    outbox: Outbox | None,
    state_dir: Path,
    min_free_bytes: int,
    models: list[dict[str, Any]],
    updates: dict[str, Any] | None,
    pipelines: Mapping[str, Pipeline],
    line: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``publisher``: the publisher's state, or ``disabled``; ``state``: the service's own (starting, stopping...)."""
    source_health = {name: s.health() for name, s in sources.items()}
    problems = [f"source {n}: {h.get('state')}" for n, h in source_health.items()
                if h.get("state") not in ("watching", "streaming")]
    if publisher not in ("connected", "disabled"):
        problems.append(f"mqtt: {publisher}")
    alarms: list[str] = []
    if outbox is not None:
        st = outbox.stats()
        alarms = list(st.alarms)
        if st.disk_state != "ok":
            problems.append(f"disk {st.disk_state}: {st.disk_free_bytes} bytes free under {state_dir} "
                            f"(min_free_bytes {min_free_bytes}); new inputs wait")
    for name, out in (line or {}).get("outputs", {}).items():
        if out.get("last_error"):
            problems.append(f"line output {name}: failing ({out['last_error']})")
    overall = "ok" if ready and not problems else ("degraded" if ready else state)
    return {
        "state": overall,
        "ready": ready,
        "device": device,
        "problems": problems,
        "models": [{"name": m["name"], "version": m["version"], "installed_from": m["installed_from"]}
                   for m in models],
        "updates": updates,
        "pipelines": {
            name: {"kind": p.kind, "depth": p.depth, "in_flight": p.in_flight, "processed": p.processed,
                   "failed": p.failed}
            for name, p in pipelines.items()
        },
        "sources": source_health,
        "mqtt": publisher,
        "alarms": alarms,
        **({"line": line} if line is not None else {}),
    }
