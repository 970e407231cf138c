"""deploy/: the hash-locked container recipes, the Jetson wheel pin, and the coordinator stack's compose file with
its broker and coordinator configs (the broker config run under a real Mosquitto; no Docker needed)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from edge_agent.coordinator.config import load_coordinator_config
from tests.support.broker import MOSQUITTO, MOSQUITTO_PASSWD, free_port, mqtt_ping
from tests.support.tls import make_tls
from tests.support.wait import wait_for

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (tomli is in the dev extra there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
LOCK_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a `uv pip compile --generate-hashes` file."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    for line in path.read_text().splitlines():
        m = LOCK_LINE.match(line)
        if m:
            current = canonicalize_name(m.group(1))
            pins[current] = (m.group(2), [])
        for digest in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            assert current is not None, f"{path.name}: a hash before any pin"
            pins[current][1].append(digest)
    return pins


def wanted(without: tuple[str, ...] = ()) -> list[Requirement]:
    """pyproject's runtime dependencies, the postgres extra and the build backend."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = [*project["project"]["dependencies"], *project["project"]["optional-dependencies"]["postgres"],
             *project["build-system"]["requires"]]
    reqs = [Requirement(r) for r in names]
    return [r for r in reqs if canonicalize_name(r.name) not in without]


@pytest.mark.parametrize(
    ("lock", "without"),
    [("requirements-arm64.txt", ()), ("requirements-jetson.txt", ("onnxruntime",))],
)
def test_lock_pins_every_dependency_with_hashes(lock: str, without: tuple[str, ...]) -> None:
    pins = read_lock(DOCKER / lock)
    stale = []
    for req in wanted(without):
        name = canonicalize_name(req.name)
        if name not in pins or not req.specifier.contains(pins[name][0], prereleases=True):
            stale.append(f"{req} (locked: {pins.get(name, ('none',))[0]})")
        for extra in req.extras:  # psycopg[binary] -> psycopg-binary, at the same version
            assert canonicalize_name(f"{req.name}-{extra}") in pins, f"{lock}: {req.name}[{extra}] not locked"
    assert not stale, f"{lock} no longer covers pyproject.toml, run `make lock`: {stale}"
    unhashed = [name for name, (_, hashes) in pins.items() if not hashes]
    assert not unhashed, f"{lock}: pins without a sha256: {unhashed}"
    for left_out in without:
        assert left_out not in pins, f"{lock} must leave {left_out} to the image's own wheel"


def test_jetson_lock_keeps_numpy_installable_on_jetpacks_python_3_10() -> None:
    # numpy 2.3+ needs Python 3.11: JetPack 6's Python 3.10 needs the 2.2 line, Debian bookworm's 3.11 may go on.
    jetson = read_lock(DOCKER / "requirements-jetson.txt")
    arm64 = read_lock(DOCKER / "requirements-arm64.txt")
    assert jetson["numpy"][0].startswith(("1.", "2.0.", "2.1.", "2.2."))
    assert "onnxruntime" in arm64


def pip_installs(dockerfile: Path) -> list[str]:
    """Each `pip install ...` command in a Dockerfile's RUN instructions (comments dropped, continuations joined)."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")]
    runs = [r for r in "\n".join(lines).replace("\\\n", " ").splitlines() if r.startswith("RUN ")]
    return [m.group(0).strip() for r in runs for m in re.finditer(r"pip install[^&]*", r)]


@pytest.mark.parametrize(("name", "lock"), [("Dockerfile.arm64", "requirements-arm64.txt"),
                                            ("Dockerfile.jetson", "requirements-jetson.txt")])
def test_dockerfiles_install_nothing_unpinned(name: str, lock: str) -> None:
    installs = pip_installs(DOCKER / name)
    assert installs, f"{name}: no pip install found"
    for cmd in installs:
        pinned = "--require-hashes" in cmd and "--only-binary=:all:" in cmd and "-r /tmp/requirements.txt" in cmd
        project = "--no-deps" in cmd and "--no-index" in cmd and "--no-build-isolation" in cmd and cmd.endswith(" .")
        verified_wheel = "--no-deps" in cmd and "${ORT_WHEEL}" in cmd
        assert pinned or project or verified_wheel, f"{name}: unpinned install: {cmd}"
    assert f"COPY deploy/docker/{lock} /tmp/requirements.txt" in (DOCKER / name).read_text()


def fake_wheel(directory: Path, dist: str, version: str) -> Path:
    path = directory / f"{dist.replace('-', '_')}-{version}-cp310-cp310-linux_aarch64.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist.replace('-', '_')}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        z.writestr("onnxruntime/__init__.py", "")
    return path


def verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(DOCKER / "verify-wheel.sh"), *args], capture_output=True, text=True,
                          check=False, timeout=30)


def test_jetson_wheel_pin_refuses_a_missing_or_malformed_sha256(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path, "onnxruntime-gpu", "1.20.2")
    missing = verify(str(wheel), "onnxruntime-gpu", "1.20.2", "")
    assert missing.returncode == 1 and "ORT_WHEEL_SHA256" in missing.stderr
    assert verify("--pin-only", wheel.name, "onnxruntime-gpu", "1.20.2", "").returncode == 1
    malformed = verify(str(wheel), "onnxruntime-gpu", "1.20.2", "ABC123")
    assert malformed.returncode == 1 and "64 lower-case hex" in malformed.stderr
    assert verify("--pin-only", wheel.name, "onnxruntime-gpu", "1.20.2", "0" * 64).returncode == 0
    assert verify(str(wheel), "onnxruntime-gpu", "1.20.2").returncode == 2


def test_jetson_wheel_pin_refuses_another_file_or_version(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path, "onnxruntime-gpu", "1.20.2")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    ok = verify(str(wheel), "onnxruntime-gpu", "1.20.2", digest)
    assert ok.returncode == 0, ok.stderr
    wrong_hash = verify(str(wheel), "onnxruntime-gpu", "1.20.2", "f" * 64)
    assert wrong_hash.returncode == 1 and f"sha256 is {digest}" in wrong_hash.stderr
    (tmp_path / "other").mkdir()
    other = fake_wheel(tmp_path / "other", "onnxruntime-gpu", "1.19.0")
    other_digest = hashlib.sha256(other.read_bytes()).hexdigest()
    wrong_version = verify(str(other), "onnxruntime-gpu", "1.20.2", other_digest)
    assert wrong_version.returncode == 1 and "onnxruntime-gpu 1.19.0" in wrong_version.stderr
    absent = verify(str(tmp_path / "nope.whl"), "onnxruntime-gpu", "1.20.2", digest)
    assert absent.returncode == 1 and "no such file" in absent.stderr


def test_jetson_dockerfile_pins_the_wheel_version_and_requires_its_sha256() -> None:
    text = (DOCKER / "Dockerfile.jetson").read_text()
    assert re.search(r"^ARG ORT_GPU_VERSION=\d+\.\d+\.\d+$", text, re.M)
    assert re.search(r"^ARG ORT_WHEEL_SHA256=$", text, re.M)  # no default: the build must be given one
    checks = re.findall(r'verify-wheel (--pin-only )?"[^"]+" onnxruntime-gpu "\$\{ORT_GPU_VERSION\}" '
                        r'"\$\{ORT_WHEEL_SHA256\}"', text)
    assert len(checks) == 2  # once before the long steps, once on the copied wheel before pip sees it
    assert text.index("verify-wheel --pin-only") < text.index("apt-get")
    assert text.index('verify-wheel "/tmp/') < text.index('pip install --no-deps "/tmp/${ORT_WHEEL}"')


# --- the coordinator stack: deploy/compose.yaml ---------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def compose_spec_schema() -> dict[str, Any]:
    """The Compose Specification's JSON Schema, as vendored by check-jsonschema (read, not imported)."""
    spec = importlib.util.find_spec("check_jsonschema")
    assert spec is not None and spec.submodule_search_locations, "check-jsonschema (dev extra) is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def bind(volume: str) -> tuple[str, str]:
    """(source, target) of a short-syntax volume, whose source may be a `${VAR:-default}` interpolation."""
    rest = volume[:-3] if volume.endswith((":ro", ":rw")) else volume
    source, target = rest.rsplit(":", 1)
    return source, target


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = compose_spec_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors
    broken = {**compose, "services": {**compose["services"], "mqtt": {**compose["services"]["mqtt"], "ports": 8883}}}
    assert list(validator.iter_errors(broken)), "the schema check must catch a wrong type"


def test_compose_stack_has_broker_database_and_coordinator_wired_by_name(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    assert set(services) == {"mqtt", "postgres", "coordinator"}
    coordinator = services["coordinator"]
    assert coordinator["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert (ROOT / "deploy" / coordinator["build"]["context"] / coordinator["build"]["dockerfile"]).is_file()
    mounted = {target: source for source, target in map(bind, coordinator["volumes"])}
    config_path = mounted[coordinator["command"][coordinator["command"].index("--config") + 1]]
    cfg = load_coordinator_config(DEPLOY / config_path)
    assert cfg.mqtt.host in services and cfg.mqtt.host == "mqtt"
    assert cfg.store.type == "postgres" and "host=postgres " in cfg.store.dsn
    assert cfg.mqtt.password_env is not None and cfg.mqtt.password_env in coordinator["environment"]
    assert "PGPASSWORD" in coordinator["environment"]
    assert cfg.ack_key is not None, "acks must be signed: the images' agent configs list mqtt.ack_keys"
    assert any(cfg.ack_key.parent == Path(target) for target in mounted), "ack_key is not in a mounted folder"
    monkeypatch.setenv(cfg.mqtt.password_env, "pw")
    assert cfg.password() == "pw"


def test_compose_mounts_files_that_exist_and_publishes_only_tls_and_a_loopback_dashboard(
    compose: dict[str, Any],
) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = bind(volume)[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name}: mounts {source}, which is not in deploy/"
    published = {name: service.get("ports", []) for name, service in compose["services"].items()}
    assert published == {"mqtt": ["8883:8883"], "postgres": [], "coordinator": ["127.0.0.1:8090:8090"]}
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key:  # secrets come from deploy/.env, and compose refuses to start without them
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), f"{name}: {key} is not a required variable"


def connack(port: int, user: str | None, password: str | None, ca: Path | None = None) -> int:
    """The CONNACK return code of an MQTT 3.1.1 CONNECT (0 = accepted, 4 = bad credentials, 5 = not authorised)."""

    def field(value: str) -> bytes:
        data = value.encode()
        return len(data).to_bytes(2, "big") + data

    flags = 0x02 | (0x80 if user is not None else 0) | (0x40 if password is not None else 0)
    body = field("MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big") + field("deploy-test")
    body += (field(user) if user is not None else b"") + (field(password) if password is not None else b"")
    assert len(body) < 128
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        sock = raw
        if ca is not None:
            sock = ssl.create_default_context(cafile=str(ca)).wrap_socket(raw, server_hostname="127.0.0.1")
        sock.sendall(bytes([0x10, len(body)]) + body)
        reply = sock.recv(4)
    assert reply[:2] == b"\x20\x02", reply
    return reply[3]


@pytest.fixture
def compose_broker(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """deploy/compose/mosquitto.conf under a real Mosquitto: its container paths and ports moved to a temp dir and
    free loopback ports, the ACL from deploy/mosquitto/acl, a password file made with mosquitto_passwd."""
    tls = make_tls(tmp_path / "tls")
    secrets, data = tmp_path / "secrets", tmp_path / "data"
    secrets.mkdir()
    data.mkdir()
    (secrets / "passwords").write_text("")
    for user, password in (("coordinator", "pw-c"), ("farm-01", "pw-f")):
        subprocess.run([MOSQUITTO_PASSWD, "-b", str(secrets / "passwords"), user, password], check=True,
                       capture_output=True, timeout=30)
    tls_port, plain_port = free_port(), free_port()
    text = (DEPLOY / "compose" / "mosquitto.conf").read_text()
    for old, new in (("/mosquitto/secrets/ca.pem", str(tls.ca)), ("/mosquitto/secrets/broker.pem", str(tls.cert)),
                     ("/mosquitto/secrets/broker.key", str(tls.key)), ("/mosquitto/secrets/", f"{secrets}/"),
                     ("/mosquitto/config/acl", str(DEPLOY / "mosquitto" / "acl")), ("/mosquitto/data/", f"{data}/"),
                     ("listener 8883", f"listener {tls_port} 127.0.0.1"),
                     ("listener 1883", f"listener {plain_port} 127.0.0.1"), ("log_dest stdout", "log_dest stderr")):
        assert old in text, f"compose/mosquitto.conf no longer has {old!r}"
        text = text.replace(old, new)
    if os.geteuid() == 0:
        text += "user root\n"  # else mosquitto drops to 'mosquitto', who cannot read pytest's temp dir
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text)
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        up = wait_for(lambda: proc.poll() is not None or (mqtt_ping(tls_port, 0.5, tls.ca) and mqtt_ping(plain_port)),
                      timeout=20)
        if proc.poll() is not None or not up:
            err = proc.stderr.read().decode() if proc.stderr and proc.poll() is not None else ""
            pytest.fail(f"mosquitto did not start with compose/mosquitto.conf: {err}")
        yield tls_port, plain_port, tls.ca
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 15)
            proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


def test_compose_broker_config_authenticates_both_listeners(compose_broker: tuple[int, int, Path]) -> None:
    tls_port, plain_port, ca = compose_broker
    assert connack(plain_port, "coordinator", "pw-c") == 0
    assert connack(tls_port, "farm-01", "pw-f", ca=ca) == 0
    assert connack(plain_port, None, None) == 5  # no anonymous access on the compose network either
    assert connack(tls_port, None, None, ca=ca) == 5
    assert connack(plain_port, "coordinator", "wrong") in (4, 5)
