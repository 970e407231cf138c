"""Coordinator configuration (YAML, validated strictly). Pure: parsing only, no I/O beyond reading the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.config import load_yaml
from edge_agent.coordinator.alerts import AlertsConfig, DeviceMeta
from edge_agent.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CoordinatorMqtt(_Strict):
    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port.")
    client_id: str = Field("edge-coordinator", min_length=1, max_length=64, description="MQTT client id; keep it "
                           "stable so the broker keeps this coordinator's persistent session.")
    username: str | None = Field(None, description="MQTT user name.")
    password_file: Path | None = Field(None, description="File holding the MQTT password (first line).")
    password_env: str | None = Field(None, description="Environment variable holding the MQTT password.")
    tls: bool = Field(False, description="Connect with TLS.")
    ca_file: Path | None = Field(None, description="CA bundle to verify the broker (TLS).")
    cert_file: Path | None = Field(None, description="Client certificate (TLS).")
    key_file: Path | None = Field(None, description="Client key (TLS).")
    keepalive_s: int = Field(30, ge=1, le=3600, description="MQTT keepalive in seconds.")
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0, description="How long the broker keeps our session and "
                                  "queues results for us while we are away.")
    reconnect_max_s: float = Field(5.0, ge=1.0, le=3600, description="Longest wait between broker reconnect "
                                   "attempts: it bounds how soon results flow again after a broker outage.")
    share_group: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Subscribe to results "
                                    "through $share/<group>/ so several coordinators split the load.")


class RetentionConfig(_Strict):
    """Keeps the store bounded: acknowledged results older than ``max_age_days``, then the oldest beyond
    ``max_results``, are deleted every ``interval_s`` (in batches of ``batch`` rows, short transactions).
    Unacknowledged results (above their device's watermark) are never deleted. Device events go the same way
    (``max_age_days``, then ``max_events``; at most 1,000,000 are kept in any case). Null: no bound of that kind."""

    max_age_days: float | None = Field(None, gt=0, description="Delete results received longer ago than this.")
    max_results: int | None = Field(None, ge=1, description="Keep at most this many results (the newest).")
    max_events: int | None = Field(None, ge=1, description="Keep at most this many device events (the newest).")
    interval_s: float = Field(300.0, ge=1, le=86_400, description="Seconds between retention passes.")
    batch: int = Field(5000, ge=1, le=1_000_000, description="Rows deleted per transaction at most.")


class SqliteStoreConfig(_Strict):
    type: Literal["sqlite"] = Field("sqlite", description="SQLite file (WAL); several coordinators on one host may "
                                    "share it.")
    path: Path = Field(Path("coordinator.db"), description="Database file.")
    retention: RetentionConfig = Field(default_factory=RetentionConfig, description="Age/size bound of results.")


class PostgresStoreConfig(_Strict):
    type: Literal["postgres"] = Field(description="PostgreSQL through psycopg.")
    dsn: str = Field(description="libpq connection string, e.g. 'host=127.0.0.1 dbname=edge user=edge'.")
    retention: RetentionConfig = Field(default_factory=RetentionConfig, description="Age/size bound of results.")


class CoordinatorHttp(_Strict):
    enabled: bool = Field(False, description="Serve the HTTP API, /metrics and the live dashboard.")
    bind: str = Field("127.0.0.1", description="Address to bind to (a non-loopback one needs tokens_file).")
    port: int = Field(8090, ge=0, le=65535, description="Port (0 = any free port).")
    tokens_file: Path | None = Field(None, description="Bearer tokens, one per line ('<token> [expiry]'); without "
                                     "it the API is open, which is allowed on a loopback bind only.")
    max_connections: int = Field(256, ge=1, le=65_535, description="Open HTTP connections at most (all clients); "
                                 "one over the cap is answered 503 too_many_connections and closed at once.")
    max_connections_per_client: int = Field(64, ge=1, le=65_535, description="Open HTTP connections at most from "
                                            "one client address (each dashboard tab holds one for its stream).")
    header_timeout_s: float = Field(10.0, gt=0, le=600, description="A connection whose request line and headers "
                                    "are not complete this long after it opened (or after its previous answer) is "
                                    "closed (slow or half-open clients).")
    keepalive_timeout_s: float = Field(5.0, gt=0, le=600, description="An idle keep-alive connection is closed "
                                       "after this long.")


class DashboardConfig(_Strict):
    """Deprecated: ``dashboard: {enabled, bind, port}`` is read as ``http`` when ``http`` is not enabled."""

    enabled: bool = Field(False, description="Deprecated alias of http.enabled.")
    bind: str = Field("127.0.0.1", description="Deprecated alias of http.bind.")
    port: int = Field(8090, ge=0, le=65535, description="Deprecated alias of http.port.")


class CoordinatorConfig(_Strict):
    mqtt: CoordinatorMqtt = Field(default_factory=CoordinatorMqtt, description="Broker connection.")
    store: Annotated[SqliteStoreConfig | PostgresStoreConfig, Field(discriminator="type")] = Field(
        default_factory=SqliteStoreConfig, description="Where results are stored."
    )
    batch_max: int = Field(1000, ge=1, le=100000, description="Messages committed per transaction at most.")
    max_payload_bytes: int = Field(1 << 20, ge=1024, description="Larger result payloads are refused and counted.")
    http: CoordinatorHttp = Field(default_factory=CoordinatorHttp, description="HTTP API and live dashboard.")
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig, description="Deprecated: see http.")
    alerts: AlertsConfig = Field(default_factory=AlertsConfig, description="Alert rules.")
    devices: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], DeviceMeta] = Field(
        default_factory=dict, description="Device id -> its site, coordinates, line or pen (alerts, dashboard).")
    ack_key: Path | None = Field(None, description="Ed25519 private key (PEM, `edge-agent models keygen`) that signs "
                                 "every ack; agents list its .pub under mqtt.ack_keys. Null: acks go unsigned.")
    ack_ttl_s: float = Field(300.0, gt=0, le=86_400, description="Each ack is valid this long (its exp field).")
    device_keys: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], Path] = Field(
        default_factory=dict, description="Device id -> its Ed25519 public key (PEM): results from a device listed "
        "here must be signed by that key (the agent's mqtt.result_key); others are dropped and counted as forged.")
    require_device_keys: bool = Field(False, description="Also drop results from devices not in device_keys.")

    def http_settings(self) -> CoordinatorHttp:
        """``http``, or the deprecated ``dashboard`` section when only that one is enabled."""
        if not self.http.enabled and self.dashboard.enabled:
            return CoordinatorHttp(enabled=True, bind=self.dashboard.bind, port=self.dashboard.port)
        return self.http

    def password(self) -> str | None:
        """The MQTT password from its file or environment variable (never logged)."""
        if self.mqtt.password_file is not None:
            try:
                return self.mqtt.password_file.read_text().splitlines()[0].strip()
            except (OSError, IndexError) as exc:
                raise ConfigError(f"mqtt.password_file: cannot read {self.mqtt.password_file}: {exc}") from exc
        if self.mqtt.password_env is not None:
            value = os.environ.get(self.mqtt.password_env)
            if value is None:
                raise ConfigError(f"mqtt.password_env: variable {self.mqtt.password_env} is not set")
            return value
        return None


def parse_coordinator_config(data: Any, source: str) -> CoordinatorConfig:
    try:
        return CoordinatorConfig.model_validate(data or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ConfigError(f"{source}: {key}: {first['msg']}") from exc


def load_coordinator_config(path: Path) -> CoordinatorConfig:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = load_yaml(text, str(path))  # refuses a key given twice, naming it and both lines
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML syntax error: {str(exc).splitlines()[0]}") from exc
    return parse_coordinator_config(data, str(path))
