"""The built wheel works alone, as a new user installs it.

Given the wheel built from this checkout and a fresh venv with nothing but that wheel and the runtime dependencies it
declares (installed offline from the wheelhouse of ``tests/support/wheelhouse.py``, which ``pip download`` filled from
the package index), when its ``edge-agent`` runs from a folder outside the repo with PYTHONPATH unset, then:
``--version`` answers; ``models list`` shows the bundles the wheel carries, read from inside the venv; ``infer``
finds the cows and names the leaf's disease; ``run`` takes a photo from a watched folder to ``done/``; an empty
models folder, and a tool that needs an extra the runtime install lacks (onnx, matplotlib), each give one line saying
what to do (every such case is also tested in-process, in test_cli.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent import __version__

from .conftest import COCO_DEMO, CROPS, ROOT
from .support.wait import wait_for
from .support.wheelhouse import ensure_wheelhouse

pytestmark = pytest.mark.slow

SHIPPED = {"crop_disease", "tile_anomaly_int8", "yolox_nano"}  # pyproject.toml: package-data, bundles.shipped
COWS = COCO_DEMO / "images" / "000000573455.jpg"
LEAF = sorted((CROPS / "plantvillage" / "Corn___Common_rust").glob("*.jpg"))[0]


@dataclass(frozen=True)
class Installed:
    venv: Path
    outside: Path  # a folder outside the repo: the cwd of every command
    seconds: dict[str, float]

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env.pop("EDGE_AGENT_MODELS_DIR", None)
        return env

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / args[0]), *args[1:]], cwd=self.outside, env=self.env(),
                              capture_output=True, text=True, timeout=timeout, check=False)


def _copy_sources(dst: Path) -> None:
    """What the build reads, copied so that the build's own build/ and egg-info never land in the checkout."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "training")
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE", "NOTICE"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "edge_agent", dst / "edge_agent", ignore=skip)
    shutil.copytree(ROOT / "models", dst / "models", ignore=skip)


def _check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    wheelhouse = ensure_wheelhouse()
    seconds["wheelhouse"] = time.perf_counter() - t0
    base = tmp_path_factory.mktemp("wheel")
    src, dist, outside = base / "src", base / "dist", base / "outside"
    for d in (src, dist, outside):
        d.mkdir()
    assert ROOT not in outside.parents and outside != ROOT
    _copy_sources(src)
    t0 = time.perf_counter()
    _check(subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "--wheel-dir", str(dist), str(src)], capture_output=True, text=True, timeout=300,
                          check=False), "pip wheel")
    (wheel,) = dist.glob("edge_agent-*.whl")
    seconds["build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    venv = base / "venv"
    _check(subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=120,
                          check=False), "python -m venv")
    _check(subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile",
                           "--disable-pip-version-check", "--no-index", "--find-links", str(wheelhouse), str(wheel)],
                          capture_output=True, text=True, timeout=600, check=False), "pip install (offline)")
    seconds["venv+install"] = time.perf_counter() - t0
    yield Installed(venv, outside, seconds)
    sys.stderr.write(f"\nwheel test setup: {', '.join(f'{k} {v:.1f} s' for k, v in seconds.items())}\n")


def test_the_package_and_its_bundles_come_from_the_venv_not_the_checkout(installed: Installed) -> None:
    proc = installed.run("python", "-c", "import edge_agent, edge_agent.bundles.bundle as b; "
                         "print(edge_agent.__file__); print(b.default_models_dir())")
    _check(proc, "import edge_agent")
    module, models = (Path(line) for line in proc.stdout.split())
    assert installed.venv in module.parents and installed.venv in models.parents
    assert ROOT not in module.parents and ROOT not in models.parents


def test_version(installed: Installed) -> None:
    proc = installed.run("edge-agent", "--version")
    _check(proc, "--version")
    assert proc.stdout.strip() == f"edge-agent {__version__}"
    meta = installed.run("python", "-c", "import importlib.metadata as m; print(m.version('edge-agent'))")
    assert meta.stdout.strip() == __version__


def test_models_list_shows_the_bundles_the_wheel_carries(installed: Installed) -> None:
    proc = installed.run("edge-agent", "models", "list", "--json")
    _check(proc, "models list")
    rows = json.loads(proc.stdout)
    assert {r["name"] for r in rows} == SHIPPED
    assert all(r["ok"] for r in rows), rows  # every sha256 checked against its manifest
    assert all(installed.venv in Path(r["path"]).parents for r in rows)
    licences = {r["name"]: r["license"] for r in rows}
    assert "Magnetic-tile" in licences["tile_anomaly_int8"] and "CC-BY-SA-3.0" in licences["crop_disease"]


def test_infer_on_photos(installed: Installed) -> None:
    cows = installed.run("edge-agent", "infer", str(COWS), "--model", "yolox_nano", "--json")
    _check(cows, "infer yolox_nano")
    (doc,) = (json.loads(line) for line in cows.stdout.splitlines())
    assert sum(p["label"] == "cow" for p in doc["predictions"]) >= 5
    leaf = installed.run("edge-agent", "infer", str(LEAF), "--model", "crop_disease", "--json")
    _check(leaf, "infer crop_disease")
    (doc,) = (json.loads(line) for line in leaf.stdout.splitlines())
    assert doc["predictions"][0]["label"] == "Corn___Common_rust"


def test_run_takes_a_photo_from_the_watched_folder_to_done(installed: Installed) -> None:
    inbox = installed.outside / "inbox"
    inbox.mkdir()
    shutil.copyfile(LEAF, inbox / "leaf.jpg")
    config = installed.outside / "agent.yaml"
    config.write_text(
        "device_id: wheel-test\nstate_dir: state\n"
        "models: [{name: leaf, bundle: crop_disease, threads: 1}]\n"
        "pipelines: [{name: crop, kind: crop, model: leaf, workers: 1}]\n"
        "sources: [{type: folder, name: inbox, pipeline: crop, path: inbox, poll_interval_s: 0.1, settle_s: 0.1}]\n"
        "mqtt: {enabled: false}\nmetrics: {enabled: false}\n"
    )
    check = installed.run("edge-agent", "run", "--check")  # the embedded default finds its bundle in the wheel
    _check(check, "run --check (embedded default)")
    proc = subprocess.Popen([str(installed.bin / "edge-agent"), "run", "--config", str(config)], cwd=installed.outside,
                            env=installed.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        done = wait_for(lambda: (inbox / "done" / "leaf.jpg").is_file() or proc.poll() is not None, 90)
        assert done and proc.poll() is None, "the agent exited or the photo never reached done/"
        assert (inbox / "done" / "leaf.jpg").read_bytes() == LEAF.read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not (inbox / "rejected").exists() or not any((inbox / "rejected").iterdir())


def test_an_empty_models_dir_names_where_it_looked(installed: Installed) -> None:
    empty = installed.outside / "no-models"
    empty.mkdir()
    proc = installed.run("edge-agent", "models", "list", "--models-dir", str(empty))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model_not_found" in lines[0], proc.stderr
    assert f"no model bundles in {empty}" in lines[0] and "Traceback" not in proc.stderr


def test_tools_outside_the_runtime_install_name_their_extra(installed: Installed) -> None:
    probe = installed.run("python", "-c",
                          "import importlib.util as u; print(*map(u.find_spec, ['onnx', 'matplotlib']))")
    assert probe.stdout.split() == ["None", "None"], probe  # tooling only: not in the runtime set
    proc = installed.run("edge-agent", "quantize", "--model", "crop_disease", "--calib", str(CROPS), "--eval",
                         str(CROPS), "--out", "x")
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "dependency_missing" in lines[0], proc.stderr
    assert "pip install 'edge-agent[tools]'" in lines[0]
