"""``edge-coordinator run --config FILE``: store results from many devices and acknowledge them."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from edge_agent.coordinator.config import CoordinatorConfig, load_coordinator_config
from edge_agent.coordinator.service import Coordinator, coordinator_will
from edge_agent.coordinator.store import SqliteStore, Store
from edge_agent.errors import ConfigError, EdgeAgentError, require_extra
from edge_agent.protocol.signing import CoordinatorAuth
from edge_agent.transport.base import MqttSettings
from edge_agent.transport.mqtt import PahoTransport

app = typer.Typer(add_completion=False, help="The edge coordinator: stores results and acknowledges them end to end.")
log = logging.getLogger("edge_agent.coordinator")


def build_store(config: CoordinatorConfig) -> Store:
    if config.store.type == "sqlite":
        return SqliteStore(config.store.path)
    require_extra("psycopg", "postgres", "the coordinator's PostgreSQL store (store.type: postgres)")
    from edge_agent.coordinator.store_pg import PostgresStore

    return PostgresStore(config.store.dsn)


def mqtt_settings(config: CoordinatorConfig) -> MqttSettings:
    m = config.mqtt
    return MqttSettings(
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
        reconnect_max_s=m.reconnect_max_s,
    )


def build(config: CoordinatorConfig) -> Coordinator:
    m = config.mqtt
    auth = build_auth(config)
    return Coordinator(
        build_store(config),
        PahoTransport(mqtt_settings(config), coordinator_will(m.client_id, auth.ack_key)),
        share_group=m.share_group,
        batch_max=config.batch_max,
        max_payload_bytes=config.max_payload_bytes,
        client_id=m.client_id,
        auth=auth,
    )


def build_auth(config: CoordinatorConfig) -> CoordinatorAuth:
    """Load the ack signing key and the devices' public keys (ConfigError naming the key on a bad file)."""
    from edge_agent.updates.keys import load_private_key, load_trusted_keys

    try:
        ack_key = load_private_key(config.ack_key) if config.ack_key is not None else None
    except ConfigError as exc:
        raise ConfigError(f"ack_key: {exc.message}") from exc
    devices = {}
    for device, path in config.device_keys.items():
        try:
            devices[device] = load_trusted_keys([path])
        except ConfigError as exc:
            raise ConfigError(f"device_keys.{device}: {exc.message}") from exc
    if ack_key is None:
        log.warning("coordinator: acks go out unsigned (no ack_key); agents with mqtt.ack_keys will refuse them")
    return CoordinatorAuth(
        ack_key=ack_key, ack_ttl_s=config.ack_ttl_s, device_keys=devices,
        require_device_keys=config.require_device_keys,
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
            lambda: {
                "devices": coordinator.store.devices(),
                "counters": coordinator.snapshot(),
                "dead_letters": coordinator.store.dead_letters(20),
            },
            metrics=coordinator.snapshot,
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


@app.command()
def command(
    device: Annotated[str, typer.Argument(help="Device id.", show_default=False)],
    name: Annotated[str, typer.Argument(help="Command: ping, heartbeat, republish, set_heartbeat_interval, "
                                        "set_thresholds, model_update, model_rollback.", show_default=False)],
    args: Annotated[str, typer.Option("--args", help='Arguments as a JSON object, e.g. \'{"seconds": 60}\'.')] = "{}",
    key: Annotated[Path | None, typer.Option("--key", help="The operator's Ed25519 private key (PEM); agents list "
                                             "its .pub under commands.trusted_keys. Without it: unsigned.",
                                             show_default=False)] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML with an mqtt section (the operator's "
                                                "broker user), as the coordinator's.", show_default=False)] = None,
    ttl: Annotated[float, typer.Option("--ttl", help="Seconds the command stays valid.", min=1, max=7 * 86400)] = 300,
    command_id: Annotated[str | None, typer.Option("--id", help="Command id (default: a fresh one).")] = None,
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for the device's answer (0: none).",
                                        min=0)] = 10,
    print_only: Annotated[bool, typer.Option("--print", help="Only print the (signed) payload; send nothing.")] = False,
) -> None:
    """Sign and send one command, print the device's command_result as JSON; exit 1 if refused or unanswered."""
    import json

    from edge_agent.coordinator.operator import build_command, operator_settings, send_command
    from edge_agent.updates.keys import load_private_key

    try:
        parsed = json.loads(args)
        if not isinstance(parsed, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        typer.echo(f"error: --args: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        private = load_private_key(key) if key is not None else None
        payload = build_command(device, name, parsed, key=private, ttl_s=ttl, command_id=command_id)
        if print_only:
            typer.echo(json.dumps(payload, separators=(",", ":")))
            return
        cfg = load_coordinator_config(config) if config is not None else CoordinatorConfig()
        transport = PahoTransport(operator_settings(mqtt_settings(cfg)))
    except EdgeAgentError as exc:
        typer.echo(f"error: {exc.code}: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    outcome = send_command(transport, device, name, payload, wait_s=wait)
    if not outcome["sent"]:
        typer.echo(f"error: could not publish to {cfg.mqtt.host}:{cfg.mqtt.port}", err=True)
        raise typer.Exit(1)
    if outcome["refused_by_broker"]:
        typer.echo(f"error: the broker refused the command: {outcome['refused_by_broker']}", err=True)
        raise typer.Exit(1)
    answer = outcome["answer"]
    if answer is None:
        if wait > 0:
            typer.echo(f"error: no command_result from {device} within {wait:g} s", err=True)
            raise typer.Exit(1)
        typer.echo(json.dumps({"id": payload["id"], "sent": True}))
        return
    typer.echo(json.dumps(answer))
    if not answer.get("ok"):
        raise typer.Exit(1)


def main() -> None:
    app()
