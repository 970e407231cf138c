"""``edge-agent run`` as a real process for tests: config written, started, waited for, ended by PID."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.api_harness import free_port, wait_for
from tests.support.onnx_models import classifier_manifest, tiny_classifier, write_bundle

ROOT = Path(__file__).resolve().parent.parent.parent


def tiny_crop_models(root: Path, labels: list[str]) -> Path:
    """``root/models`` holding the bundle ``tiny_crop``: a tiny ONNX classifier over ``labels``."""
    bundle = root / "models" / "tiny_crop"
    bundle.mkdir(parents=True, exist_ok=True)
    onnx_path = tiny_classifier(bundle / "model.onnx", n_classes=len(labels), size=32, seed=3)
    write_bundle(bundle, classifier_manifest(onnx_path, labels, size=32, name="tiny_crop", thresholds={"ood": 50.0}))
    return root / "models"


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    base: str
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self, field: str) -> int:
        """A ``/proc/<pid>/status`` field in kB (VmRSS, VmHWM...)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(10)


def raise_nofile(soft: int, pid: int = 0) -> int:
    """Raise the soft limit of open files of ``pid`` (0: this process) to ``soft`` (at most the hard limit)."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < soft:
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, soft))  # root (CI) may raise the hard limit too
            return soft
        except (PermissionError, ValueError):
            soft = hard
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    return soft


@contextmanager
def agent_process(workdir: Path, body: str, *, port: int | None = None, nofile: int | None = None,
                  ready_timeout: float = 90.0) -> Iterator[AgentProcess]:
    """Start ``edge-agent run`` with ``body`` (YAML; ``{port}`` is replaced by the HTTP port) in ``workdir``;
    yield once ``/readyz`` answers 200; end it by PID. ``nofile``: the agent's soft limit of open files."""
    port = port or free_port()
    config = workdir / "agent.yaml"
    config.write_text(body.replace("{port}", str(port)))
    log = workdir / "agent.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    if nofile:
        raise_nofile(nofile, proc.pid)  # before it has imported anything, let alone served
    agent = AgentProcess(proc, f"http://127.0.0.1:{port}", port, log)

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"{agent.base}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, timeout=ready_timeout, what="the agent to be ready")
        yield agent
    finally:
        agent.stop()
