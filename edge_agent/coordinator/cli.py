"""``edge-coordinator run --config FILE``: store results from many devices and acknowledge them."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edge_agent.coordinator.config import CoordinatorConfig, load_coordinator_config
from edge_agent.coordinator.monitor import FleetMonitor
from edge_agent.coordinator.retention import Retention
from edge_agent.coordinator.service import Coordinator, coordinator_will
from edge_agent.coordinator.store import SqliteStore, Store
from edge_agent.errors import ConfigError, EdgeAgentError, require_extra
from edge_agent.protocol.signing import CoordinatorAuth
from edge_agent.transport.base import MqttSettings
from edge_agent.transport.mqtt import PahoTransport

if TYPE_CHECKING:
    from edge_agent.coordinator.http import HttpServer

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


def build_http(cfg: CoordinatorConfig, coordinator: Coordinator, monitor: FleetMonitor | None) -> HttpServer:
    """The HTTP app (``create_app``) on uvicorn; ConfigError on a bad tokens file or a public bind without one."""
    from edge_agent.auth.tokens import TokenSet
    from edge_agent.coordinator.http import HttpContext, HttpServer, create_app

    http = cfg.http_settings()
    tokens = TokenSet.load(http.tokens_file) if http.tokens_file is not None else TokenSet()
    ctx = HttpContext(coordinator.store, coordinator.snapshot, tokens, monitor, dict(cfg.devices))
    return HttpServer(create_app(ctx), http.bind, http.port, tokens, max_connections=http.max_connections,
                      max_connections_per_client=http.max_connections_per_client,
                      header_timeout_s=http.header_timeout_s, keepalive_timeout_s=http.keepalive_timeout_s)


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
    monitor = FleetMonitor(coordinator.store, coordinator.transport, cfg.alerts, dict(cfg.devices),
                           ack_key=coordinator.auth.ack_key)
    coordinator.observers.append(monitor)
    server = None
    http = cfg.http_settings()
    if http.enabled:  # first: a bad tokens file stops the start, and /readyz answers before ingest begins
        try:
            server = build_http(cfg, coordinator, monitor)
            server.start()
        except EdgeAgentError as exc:
            typer.echo(f"error: {exc.message}", err=True)
            coordinator.store.close()
            raise typer.Exit(2) from exc
        log.info("HTTP API and dashboard on http://%s:%d/", http.bind, server.port)
    monitor.start()
    coordinator.start()
    retention = Retention(coordinator.store, cfg.store.retention)
    retention.start()
    log.info("coordinator running; broker %s:%d; store %s", cfg.mqtt.host, cfg.mqtt.port, cfg.store.type)
    done.wait()
    log.info("coordinator stopping")
    retention.stop()
    if server is not None:
        server.stop()
    coordinator.stop(5)
    monitor.stop()
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


def _names(values: list[str] | None) -> list[str]:
    return [n.strip() for v in values or [] for n in v.split(",") if n.strip()]


@app.command()
def rollout(
    update_file: Annotated[Path, typer.Argument(help="Signed update file (edge-agent models sign).", exists=True,
                                                dir_okay=False, show_default=False)],
    canary: Annotated[list[str], typer.Option("--canary", help="Canary device(s): repeat or comma-separate.",
                                              show_default=False)],
    device: Annotated[list[str] | None, typer.Option("--device", help="The rest of the fleet (repeat or comma-"
                      "separate). Default: every device the coordinator's store knows (--config).",
                      show_default=False)] = None,
    wave: Annotated[int, typer.Option("--wave", help="Devices per stage after the canaries (0: all at once).",
                                      min=0)] = 0,
    key: Annotated[Path | None, typer.Option("--key", help="The operator's Ed25519 private key (commands).",
                                             show_default=False)] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Coordinator YAML (mqtt, store).",
                                                show_default=False)] = None,
    bind: Annotated[str, typer.Option("--bind", help="Address the update file is served on: the coordinator's "
                                      "LAN address (0.0.0.0 needs --public-url).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port the update file is served on (0: any free one).",
                                      min=0, max=65535)] = 8765,
    public_url: Annotated[str | None, typer.Option("--public-url", help="Base URL agents reach the file server at "
                          "(default http://<bind>:<port>).", show_default=False)] = None,
    relative: Annotated[bool, typer.Option("--relative", help="Send only 'updates/<file>': agents resolve it "
                                           "against their updates.fetch_base_url.")] = False,
    soak: Annotated[float, typer.Option("--soak", help="Seconds to keep watching each stage after probation.",
                                        min=0)] = 0,
    answer_timeout: Annotated[float, typer.Option("--answer-timeout", min=1)] = 30,
    install_timeout: Annotated[float, typer.Option("--install-timeout", min=1)] = 600,
    probation_timeout: Annotated[float, typer.Option("--probation-timeout", min=1)] = 3600,
    ttl: Annotated[float, typer.Option("--ttl", help="Seconds each command stays valid.", min=1)] = 300,
) -> None:
    """Staged rollout: canaries first, then the fleet; halts on the first failure. Prints a JSON report;
    exit 0 when every device passed probation, 1 when halted, 2 on bad input."""
    import json

    from edge_agent.coordinator.files import FileServer
    from edge_agent.coordinator.operator import operator_settings
    from edge_agent.coordinator.rollout import Rollout, RolloutSettings, read_statement
    from edge_agent.updates.keys import load_private_key

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    canaries = _names(canary)
    if not canaries or (bind in ("0.0.0.0", "::") and public_url is None):  # noqa: S104 - the check itself
        typer.echo("error: --canary names no device" if not canaries else
                   "error: --bind 0.0.0.0 needs --public-url (the address agents reach)", err=True)
        raise typer.Exit(2)
    try:
        statement = read_statement(update_file)
        private = load_private_key(key) if key is not None else None
        cfg = load_coordinator_config(config) if config is not None else CoordinatorConfig()
        rest = _names(device)
        if not rest and config is not None:
            store = build_store(cfg)
            try:
                rest = [str(d["device"]) for d in store.devices()]
            finally:
                store.close()
        rest = [d for d in rest if d not in canaries]
        server = FileServer(bind, port)
    except (EdgeAgentError, OSError) as exc:
        typer.echo(f"error: {getattr(exc, 'code', 'os_error')}: {getattr(exc, 'message', exc)}", err=True)
        raise typer.Exit(2) from exc
    published = server.publish(update_file)
    base = (public_url or f"http://{bind}:{server.port}").rstrip("/")
    url = f"updates/{published.name}" if relative else f"{base}/updates/{published.name}"
    size = wave or len(rest) or 1
    stages = [canaries] + [rest[i:i + size] for i in range(0, len(rest), size)]
    job = Rollout(PahoTransport(operator_settings(mqtt_settings(cfg))), published, url, statement.name,
                  statement.version, private,
                  RolloutSettings(ttl_s=ttl, answer_timeout_s=answer_timeout, install_timeout_s=install_timeout,
                                  probation_timeout_s=probation_timeout, soak_s=soak))
    server.start()
    log.info("serving %s (%d bytes, sha256 %s) at %s", published.name, published.size, published.sha256, url)
    try:
        report = job.run(stages)
    finally:
        server.stop()
    typer.echo(json.dumps(report, indent=2))
    if not report["ok"]:
        raise typer.Exit(1)


def main() -> None:
    app()
