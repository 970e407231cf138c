"""The machine and the process: CPU, memory, load, and a child process's peak RSS and cold start per bundle."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson

from edge_agent.toolchain.bench.settings import cpu_count
from edge_agent.vision.model import Model


# ------------------------------------------------------------------ machine, memory, cold start
def machine_info() -> dict[str, Any]:
    """Machine, CPU, thread and library facts recorded with every report."""
    import platform
    import sys
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    have = set(value.split())
                    flags = sorted(have & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "neon", "asimd",
                                           "asimddp", "i8mm", "sve"})
    except OSError:
        pass
    versions: dict[str, str] = {}
    for dist in ("edge-agent", "onnxruntime", "numpy", "opencv-python-headless", "pillow", "orjson", "paho-mqtt"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    from edge_agent.vision.runtime import available_providers

    return {
        "hostname": platform.node(),
        "system": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": cpu_count(),
        "python": sys.version.split()[0],
        "versions": versions,
        "providers": available_providers(),
    }


_PROBE = (
    "import sys, time; t = time.time(); from edge_agent.toolchain.bench.machine import probe_child; "
    "probe_child(sys.argv[1:], t)"
)


def _vm_kb(field_name: str) -> int:
    """A ``/proc/self/status`` memory field in kB (VmHWM = peak RSS of this process image), 0 if unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # kB on Linux; may include the parent's


def probe_child(argv: Sequence[str], interpreter_ready: float) -> None:
    """Child side of :func:`probe_process`: load bundles, predict once each, print one JSON line."""
    import sys
    from pathlib import Path

    from edge_agent.bundles.bundle import load_bundle

    spawned_at = float(argv[0])
    photo = Path(argv[1]).read_bytes()
    rss_import = _vm_kb("VmHWM")
    t1 = time.perf_counter()
    imported_at = time.time()
    models = [Model.load(load_bundle(Path(d))) for d in argv[2:]]
    t2 = time.perf_counter()
    first = models[0].predict_bytes(photo) if models else None
    t3 = time.perf_counter()
    first_at = time.time()
    for m in models[1:]:
        m.predict_bytes(photo)
    doc = {
        "cold_start_s": round(first_at - spawned_at, 4),
        "models": [m.name for m in models],
        "first_result": first.to_dict()["model"] if first else None,
        "interpreter_s": round(interpreter_ready - spawned_at, 4),
        "import_s": round(imported_at - interpreter_ready, 4),
        "load_s": round(t2 - t1, 4),
        "first_predict_s": round(t3 - t2, 4),
        "rss_after_import_mb": round(rss_import / 1024, 1),
        "peak_rss_mb": round(_vm_kb("VmHWM") / 1024, 1),
        "rss_mb": round(_vm_kb("VmRSS") / 1024, 1),
    }
    sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    sys.stdout.flush()


def probe_process(bundle_dirs: Sequence[str], photo_path: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Peak RSS and cold start (process spawn to first result) of a fresh interpreter with these bundles."""
    import subprocess
    import sys

    t0 = time.perf_counter()
    proc = subprocess.run(  # noqa: S603 - our own interpreter and module, no shell
        [sys.executable, "-c", _PROBE, repr(time.time()), photo_path, *bundle_dirs],
        capture_output=True, timeout=timeout_s, check=False, text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"probe failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    doc: dict[str, Any] = orjson.loads(proc.stdout.strip().splitlines()[-1])
    doc["process_wall_s"] = round(wall, 4)
    return doc
