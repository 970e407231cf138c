"""``edge-agent run [--config FILE]``: the on-device daemon. Thin: load config, configure logging, run the service.

Without ``--config`` it runs the embedded default: a bundled model from ``models/`` (the crop
classifier when there is one), state in ``./var/edge-agent``, a watched folder
``./var/edge-agent/inbox`` and MQTT on localhost:1883 (never waited for: results queue in the
outbox until a broker answers).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from edge_agent.config import AgentConfig, default_config, load_config
from edge_agent.errors import EdgeAgentError, StorageError

log = logging.getLogger(__name__)

EXIT_CONFIG = 2  # the config or a model bundle is wrong: a person must fix it (systemd does not restart it)
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: the state disk cannot hold the outbox right now (systemd restarts it)

Kind = Literal["crop", "inspection", "livestock", "plain"]


def pick_default_bundle(models_dir: Path) -> tuple[str, Kind]:
    """The bundle the embedded default runs: a crop classifier, else a detector that knows cows, else any."""
    from edge_agent.bundles.bundle import load_bundle, require_bundle_dirs

    found: list[tuple[int, str, Kind]] = []
    for d in require_bundle_dirs(models_dir):
        try:
            m = load_bundle(d, verify=False).manifest
        except EdgeAgentError:
            continue
        if m.task == "classification" and any("___" in label for label in m.labels):
            found.append((0, d.name, "crop"))
        elif m.task == "detection" and "cow" in m.labels:
            found.append((1, d.name, "livestock"))
        else:
            found.append((2, d.name, "plain"))
    if not found:
        raise EdgeAgentError(f"no valid model bundle in {models_dir}; pass --config with models_dir")
    _, name, kind = min(found)
    return name, kind


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level.upper())


def _describe(cfg: AgentConfig) -> None:
    from edge_agent.config import FolderSourceConfig

    for s in cfg.sources:
        if isinstance(s, FolderSourceConfig):
            typer.echo(f"watching {s.path} (pipeline {s.pipeline}); processed files go to {s.done_dir}", err=True)
    if cfg.mqtt.enabled:
        typer.echo(
            f"results on MQTT: mosquitto_sub -h {cfg.mqtt.host} -p {cfg.mqtt.port} -v -t 'edge/v1/{cfg.device_id}/#'",
            err=True,
        )


def run(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Agent YAML config; without it the embedded default runs.",
                     show_default=False),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="debug, info, warning or error (overrides the config).")
    ] = None,
    check: Annotated[
        bool,
        typer.Option("--check", help="Check everything run would refuse at start (config, bundles and models, "
                     "tokens, certificates, keys), then exit: 0 and 'ok', or 2 and one line naming file and key."),
    ] = False,
    schema: Annotated[
        bool, typer.Option("--schema", help="Print the config's JSON Schema (every key, documented) and exit.")
    ] = False,
) -> None:
    """Run the agent: sources -> pipelines -> durable outbox -> MQTT, until SIGTERM."""
    if schema:
        import json

        typer.echo(json.dumps(AgentConfig.model_json_schema(), indent=2))
        return
    source = str(config) if config is not None else "(default config)"
    try:
        if config is not None:
            cfg = load_config(config)
        else:
            from edge_agent.bundles.bundle import default_models_dir

            bundle, kind = pick_default_bundle(default_models_dir())
            cfg = default_config(bundle=bundle, kind=kind)
    except EdgeAgentError as exc:
        typer.echo(f"error [{exc.code}] {exc.message}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    from edge_agent.agent.preflight import preflight

    try:  # what the files the config names say (bundles, tokens, keys); --check also builds each model
        if check:
            from edge_agent.agent.service import onnx_model_factory

            preflight(cfg, load_model=onnx_model_factory)
        else:
            preflight(cfg)
    except EdgeAgentError as exc:
        typer.echo(f"error [{exc.code}] {source}: {exc.message}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    if check:
        typer.echo(f"{source}: ok")
        return
    _configure_logging(log_level or cfg.log_level)
    _describe(cfg)
    from edge_agent.agent.service import run_service

    try:
        code = run_service(cfg)
    except StorageError as exc:  # a full or failing state disk is not a config error: exit so that it is retried
        typer.echo(f"error [{exc.code}] {exc.message} (exit {EXIT_TEMPFAIL}: try again later)", err=True)
        raise typer.Exit(EXIT_TEMPFAIL) from None
    except EdgeAgentError as exc:
        typer.echo(f"error [{exc.code}] {exc.message}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    raise typer.Exit(code)
