"""``edge-coordinator run --config FILE``: store results from many devices and acknowledge them."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from edge_agent.coordinator.config import CoordinatorConfig, load_coordinator_config
from edge_agent.coordinator.service import Coordinator
from edge_agent.coordinator.store import SqliteStore, Store
from edge_agent.errors import EdgeAgentError
from edge_agent.transport.base import MqttSettings
from edge_agent.transport.mqtt import PahoTransport

app = typer.Typer(add_completion=False, help="The edge coordinator: stores results and acknowledges them end to end.")
log = logging.getLogger("edge_agent.coordinator")


def build_store(config: CoordinatorConfig) -> Store:
    if config.store.type == "sqlite":
        return SqliteStore(config.store.path)
    from edge_agent.coordinator.store_pg import PostgresStore

    return PostgresStore(config.store.dsn)


def build(config: CoordinatorConfig) -> Coordinator:
    m = config.mqtt
    settings = MqttSettings(
        host=m.host,
        port=m.port,
        client_id=m.client_id,
        keepalive_s=m.keepalive_s,
        username=m.username,
        password=config.password(),
        tls=m.tls,
        ca_file=str(m.ca_file) if m.ca_file else None,
        cert_file=str(m.cert_file) if m.cert_file else None,
        key_file=str(m.key_file) if m.key_file else None,
        clean_start=False,
        session_expiry_s=m.session_expiry_s,
        manual_ack=True,
    )
    return Coordinator(
        build_store(config),
        PahoTransport(settings),
        share_group=m.share_group,
        batch_max=config.batch_max,
        max_payload_bytes=config.max_payload_bytes,
    )


@app.callback()
def _root() -> None:
    """edge-coordinator."""


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="Coordinator YAML config.")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run until SIGTERM/SIGINT."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_coordinator_config(config)
        coordinator = build(cfg)
    except EdgeAgentError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    coordinator.start()
    dashboard = None
    if cfg.dashboard.enabled:
        from edge_agent.coordinator.dashboard import Dashboard

        dashboard = Dashboard(
            cfg.dashboard.bind,
            cfg.dashboard.port,
            lambda: {"devices": coordinator.store.devices(), "counters": coordinator.snapshot()},
        )
        dashboard.start()
        log.info("dashboard on http://%s:%d/", cfg.dashboard.bind, dashboard.port)
    log.info("coordinator running; broker %s:%d; store %s", cfg.mqtt.host, cfg.mqtt.port, cfg.store.type)
    done.wait()
    log.info("coordinator stopping")
    if dashboard is not None:
        dashboard.stop()
    coordinator.stop(5)
    coordinator.store.close()


def main() -> None:
    app()
