"""``edge-agent run --check``: everything ``run`` would refuse at start, found without starting anything.

``load_config`` already refuses what the file alone says is wrong (unknown keys, bad values, duplicate
YAML keys, bundle paths with ``..``, ``http.bind`` off loopback without a tokens file, missing
certificates, unwritable folders, unreadable secrets). :func:`preflight` adds what needs the files the
config points at: each model bundle (inside ``models_dir``, manifest valid, sha256 right, and with
``load_model`` the ONNX session built and warmed up as ``run`` does), one folder per model name, the
HTTP tokens file, the MQTT TLS certificates and key, every key file (updates, acks, commands, results), and what
the line's outputs need (pymodbus, gpiod and its chip, a webhook's token variable).

Every refusal is an :class:`EdgeAgentError` of the code ``run`` would give, its message
``<key.path>: <what is wrong>`` (the CLI puts the file name in front). Nothing is written, no port is
bound, the state directory is not locked (an agent may be running with it).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.bundles.bundle import Bundle
from edge_agent.config import AgentConfig, ModelConfig
from edge_agent.errors import ConfigError, EdgeAgentError, MissingDependencyError

ModelLoader = Callable[[Bundle, ModelConfig], Any]


def _keyed(key: str, exc: EdgeAgentError) -> EdgeAgentError:
    """The same error (same class, same code), its message prefixed with the config key it is about."""
    message = exc.message
    if message.startswith(f"{key}: "):
        message = message[len(key) + 2:]
    out = type(exc).__new__(type(exc))
    EdgeAgentError.__init__(out, f"{key}: {message}")
    return out


def preflight(cfg: AgentConfig, *, load_model: ModelLoader | None = None) -> None:
    """Raise the first EdgeAgentError ``run`` would raise at start for ``cfg`` (a finalized config).

    ``load_model``: build the model as ``run`` does (default: no session is built, only the bundle checked)."""
    from edge_agent.updates.manager import configured_bundle

    folders: dict[str, Path] = {}
    used = {p.model for p in cfg.pipelines}
    used |= {p.inspection.classify.model for p in cfg.pipelines if p.inspection and p.inspection.classify}
    used |= {r.classify.model for r in cfg.line.recipes if r.classify is not None}
    for i, mcfg in enumerate(cfg.models):
        key = f"models.{i}.bundle"
        try:
            bundle = configured_bundle(cfg, mcfg)
        except EdgeAgentError as exc:
            raise _keyed(key, exc) from exc
        name = bundle.manifest.name
        first = folders.setdefault(name, bundle.directory.resolve())
        if first != bundle.directory.resolve():
            raise ConfigError(f"{key}: model {name!r} is already loaded from {first}; one bundle folder per "
                              "model name (updates are installed by name)")
        if load_model is not None and mcfg.name in used:
            try:
                load_model(bundle, mcfg)
            except EdgeAgentError as exc:
                raise _keyed(f"models.{i}", exc) from exc
    _check_http(cfg)
    _check_tls(cfg)
    _check_keys(cfg)
    _check_line(cfg)


def _check_line(cfg: AgentConfig) -> None:
    """What a line output needs beyond its config: its library (pymodbus, gpiod), its GPIO chip, its token."""
    import importlib.util
    import os

    for i, out in enumerate(cfg.line.outputs):
        key = f"line.outputs.{i}"
        if out.type == "modbus" and importlib.util.find_spec("pymodbus") is None:
            raise MissingDependencyError(f"{key}: a modbus output needs pymodbus: pip install 'edge-agent[modbus]'")
        if out.type == "gpio":
            if importlib.util.find_spec("gpiod") is None:
                raise MissingDependencyError(f"{key}: a gpio output needs libgpiod 2's bindings: pip install gpiod")
            if not Path(out.chip).exists():
                raise ConfigError(f"{key}.chip: no GPIO chip at {out.chip}")
        if out.type == "webhook" and out.token_env is not None and out.token_env not in os.environ:
            raise ConfigError(f"{key}.token_env: environment variable {out.token_env!r} is not set")


def _check_http(cfg: AgentConfig) -> None:
    h = cfg.http
    if not h.enabled or h.tokens_file is None:
        return
    from edge_agent.auth.tokens import TokenSet

    try:
        TokenSet.load(h.tokens_file)
    except ConfigError as exc:
        raise _keyed("http.tokens_file", exc) from exc


def _check_tls(cfg: AgentConfig) -> None:
    m = cfg.mqtt
    if not (m.enabled and m.tls.enabled):
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if m.tls.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(m.tls.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"mqtt.tls.ca_file: cannot load {m.tls.ca_file}: {exc}") from exc
    if m.tls.cert_file is not None:
        try:
            context.load_cert_chain(str(m.tls.cert_file), str(m.tls.key_file) if m.tls.key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"mqtt.tls.cert_file: cannot load the certificate and key: {exc}") from exc


def _check_keys(cfg: AgentConfig) -> None:
    """Every key file ``run`` loads at start: update keys (when updates are on), and with MQTT on the
    coordinators' ack keys, the operators' command keys and this device's result-signing key."""
    from edge_agent.updates.keys import load_private_key, load_public_key

    public: list[tuple[str, tuple[Path, ...]]] = []
    if cfg.updates.enabled:
        public.append(("updates.trusted_keys", cfg.updates.trusted_keys))
    if cfg.mqtt.enabled:
        public += [("mqtt.ack_keys", cfg.mqtt.ack_keys), ("commands.trusted_keys", cfg.commands.trusted_keys)]
    for key, paths in public:
        for i, path in enumerate(paths):
            try:
                load_public_key(path)
            except EdgeAgentError as exc:
                raise _keyed(f"{key}.{i}", exc) from exc
    if cfg.mqtt.enabled and cfg.mqtt.result_key is not None:
        try:
            load_private_key(cfg.mqtt.result_key)
        except EdgeAgentError as exc:
            raise _keyed("mqtt.result_key", exc) from exc
