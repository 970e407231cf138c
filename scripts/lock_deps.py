"""Pin the container recipes' Python dependencies, with every file's sha256: `make lock`.

Writes two hash-locked requirement files from pyproject.toml (runtime dependencies, the `postgres` extra for
the coordinator's store, and the build backend so the image builds the project with --no-build-isolation):

- deploy/docker/requirements-arm64.txt: CPython 3.11 on linux/aarch64 (manylinux_2_28; Debian bookworm has
  glibc 2.36), as Dockerfile.arm64's python:3.11-slim-bookworm base and `make arm64-check` use it. The hashes
  cover every file of each pinned version on PyPI, so the same file installs on x86_64 too (the arm64 check's
  x86 reference does exactly that).
- deploy/docker/requirements-jetson.txt: CPython 3.10 on linux/aarch64 (JetPack 6 is Ubuntu 22.04, glibc 2.35),
  without `onnxruntime`: Dockerfile.jetson installs NVIDIA's onnxruntime-gpu wheel in its place.

The resolver is uv (from PyPI, pinned below, installed under build/tools/ on first use). Run again after a
dependency changes in pyproject.toml; tests/test_deploy.py fails while a lock no longer covers pyproject.toml.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
UV_VERSION = "0.13.9"
TOOLS = ROOT / "build" / "tools"

# (output file, python version, uv target platform, packages left out)
LOCKS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("deploy/docker/requirements-arm64.txt", "3.11", "aarch64-manylinux_2_28", ()),
    ("deploy/docker/requirements-jetson.txt", "3.10", "aarch64-manylinux_2_28", ("onnxruntime",)),
)
EXTRAS = ("postgres",)


def uv() -> Path:
    """The pinned uv, installed from PyPI into build/tools/uv-<version> when missing."""
    target = TOOLS / f"uv-{UV_VERSION}"
    exe = target / "bin" / "uv"
    if not exe.exists():
        subprocess.run(  # noqa: S603 - this interpreter's pip, an argument list
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), f"uv=={UV_VERSION}"],
            check=True,
            env=clean_pip_env(),
        )
    return exe


def clean_pip_env() -> dict[str, str]:
    """pip/uv environment without a machine's extra indexes and local wheel folders: uv's default index, PyPI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_FIND_LINKS", "PIP_EXTRA_INDEX", "UV_"))}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["UV_NO_CONFIG"] = "1"
    if "PIP_CERT" in os.environ:  # a machine-wide CA bundle (proxies) serves uv as well
        env["SSL_CERT_FILE"] = os.environ["PIP_CERT"]
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--upgrade", action="store_true", help="re-resolve to the newest allowed versions")
    args = ap.parse_args()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = [e for e in EXTRAS if e in pyproject["project"].get("optional-dependencies", {})]
    build_requires = "\n".join(pyproject["build-system"]["requires"]) + "\n"
    exe = uv()
    for out, python, platform, leave_out in LOCKS:
        cmd = [
            str(exe), "pip", "compile", "pyproject.toml", "-",
            "--python-version", python, "--python-platform", platform,
            "--generate-hashes", "--quiet",
            "--custom-compile-command", "make lock", "-o", out,
        ]
        for extra in extras:
            cmd += ["--extra", extra]
        for name in leave_out:
            cmd += ["--no-emit-package", name]
        if args.upgrade:
            cmd.append("--upgrade")
        subprocess.run(cmd, input=build_requires, text=True, check=True, cwd=ROOT, env=clean_pip_env())  # noqa: S603
        pins = sum(1 for line in (ROOT / out).read_text().splitlines() if line and line[0].isalnum())
        print(f"{out}: {pins} packages for CPython {python} on {platform}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
