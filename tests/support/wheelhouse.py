"""The wheelhouse for the wheel test: the runtime dependencies of edge-agent, as downloaded wheels.

``pip download`` resolves ``[project] dependencies`` of pyproject.toml from the package index exactly as
``pip install edge-agent`` would, and keeps the wheels; the wheel test then installs the built wheel into a fresh
venv with ``--no-index --find-links`` this folder, offline: whatever the wheel needs and does not declare is missing
there, and nothing of the development venv leaks in. ``make venv`` fills it (``python -m tests.support.wheelhouse``)
right after installing, when pip's cache is warm; the test fills it itself if it is missing or stale. It lives in the
running venv (``<sys.prefix>/wheelhouse``) unless ``EDGE_AGENT_WHEELHOUSE`` names another folder.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
STAMP = ".requirements"


def runtime_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """``[project] dependencies``: what ``pip install edge-agent`` installs, extras aside."""
    with pyproject.open("rb") as f:
        deps: list[str] = tomllib.load(f)["project"]["dependencies"]
    return deps


def wheelhouse_dir() -> Path:
    return Path(os.environ.get("EDGE_AGENT_WHEELHOUSE") or Path(sys.prefix) / "wheelhouse")


def ensure_wheelhouse(folder: Path | None = None) -> Path:
    """The wheelhouse, downloaded again when pyproject.toml's runtime dependencies changed since the last fill."""
    folder = folder or wheelhouse_dir()
    reqs = runtime_requirements()
    key = hashlib.sha256("\n".join([sys.version, *reqs]).encode()).hexdigest()
    stamp = folder / STAMP
    if stamp.is_file() and stamp.read_text().strip() == key:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    req_file = folder / "requirements.txt"
    req_file.write_text("\n".join(reqs) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--dest", str(folder),
         "--requirement", str(req_file)],
        capture_output=True, text=True, timeout=900, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"pip download into {folder} failed:\n{proc.stdout}\n{proc.stderr}")
    stamp.write_text(key + "\n")
    return folder


if __name__ == "__main__":
    print(f"wheelhouse: {ensure_wheelhouse()}")
