"""Outbox + MQTT delivery measurements on loopback, with a real Mosquitto and coordinator.

- ``acked_per_s``: a backlog of results (bodies like a real detection result) drained by the
  agent's Publisher (QoS 1) to a Coordinator that stores them and sends the end-to-end ack; rate
  = results / time until the outbox has every row acknowledged end to end;
- ``fill_and_ack_per_s``: the same while 4 threads write the results into the outbox (group
  commit) at full speed, i.e. durable write + publish + e2e ack together;
- ``publish_p99_ms_under_load``: publish-to-PUBACK latency of each result (the Publisher's
  ``transport.publish()`` call to paho's PUBACK callback) while one worker per core runs the detector
  flat out and writes its results to the outbox (GIL starvation check);
- ``commit_to_puback_p99_ms_under_load``: what a user waits for once the result is durable: from the
  commit of the result's outbox transaction (the outbox's listener call right after that commit) to
  the PUBACK. ``publish_*`` alone misses the time a committed row waits before ``publish()`` is called,
  which was the larger part before the Publisher stopped blocking on the outbox's fsync of
  acknowledged-row deletions;
- ``result_to_puback_p99_ms_under_load``: from the result's ``created_at`` (stamped inside its outbox
  transaction, so this adds that transaction's group commit and fsync) to the PUBACK.

Reuses the test harness's Mosquitto runner (started on a free port, stopped by PID). The coordinator
runs in its own process, as it would on a server: on the same cores here, but not sharing the agent's
GIL (in-process it also stole the agent's GIL for its commits and acks).
"""

from __future__ import annotations

import bisect
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from edge_agent.bundles.bundle import Bundle
from edge_agent.toolchain import bench
from edge_agent.transport.base import InboundMessage, Transport, TransportListener
from edge_agent.vision.model import Model
from edge_agent.vision.runtime import RuntimeOptions

log = logging.getLogger("benchmarks.delivery")


class TimedTransport:
    """Wraps a Transport; records publish-to-PUBACK and result-created-to-PUBACK latency of result publishes."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.listener: TransportListener | None = None
        self.latencies_ms: list[float] = []
        self.recording = False
        self._sent: dict[int, tuple[float, bytes]] = {}
        self._early: dict[int, tuple[float, float]] = {}
        self._acked: list[tuple[bytes, float]] = []  # (payload, PUBACK wall-clock time): parsed after the run
        self._commits: list[float] = []  # wall-clock times of the outbox commits that stored results
        self._lock = threading.Lock()

    def note_commit(self) -> None:
        """An outbox listener: called on the outbox writer right after each commit that stored results."""
        self._commits.append(time.time())

    def result_latencies_ms(self) -> tuple[list[float], list[float]]:
        """Per timed result, in ms: PUBACK minus its ``created_at``, and PUBACK minus its commit.

        A row's ``created_at`` is stamped inside its transaction and transactions run one after another on
        the writer, so its commit is the first commit noted at or after ``created_at``."""
        with self._lock:
            acked = list(self._acked)
        commits = sorted(self._commits)
        created, committed = [], []
        for payload, t in acked:
            c = float(orjson.loads(payload)["created_at"])
            created.append((t - c) * 1000.0)
            i = bisect.bisect_left(commits, c)
            if i < len(commits):
                committed.append((t - commits[i]) * 1000.0)
        return created, committed

    @property
    def connected(self) -> bool:
        return self.inner.connected

    def start(self, listener: TransportListener) -> None:
        self.listener = listener
        self.inner.start(self)

    def stop(self, timeout: float = 5.0) -> None:
        self.inner.stop(timeout)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        t0 = time.perf_counter()
        token = self.inner.publish(topic, payload, qos=qos, retain=retain)
        if token is not None and "/results/" in topic and self.recording:
            with self._lock:
                early = self._early.pop(token, None)
                if early is not None:  # the PUBACK callback ran before publish() returned
                    self.latencies_ms.append((early[0] - t0) * 1000.0)
                    self._acked.append((payload, early[1]))
                else:
                    self._sent[token] = (t0, payload)
        return token

    def subscribe(self, filters: Sequence[str], qos: int = 1) -> None:
        self.inner.subscribe(filters, qos)

    def ack(self, message: InboundMessage) -> None:
        self.inner.ack(message)

    def on_connected(self, session_present: bool) -> None:
        assert self.listener is not None
        self.listener.on_connected(session_present)

    def on_disconnected(self, reason: str) -> None:
        assert self.listener is not None
        self.listener.on_disconnected(reason)

    def on_message(self, message: InboundMessage) -> None:
        assert self.listener is not None
        self.listener.on_message(message)

    def on_published(self, token: int, ok: bool, reason: str) -> None:
        now, wall = time.perf_counter(), time.time()
        if self.recording:
            with self._lock:
                sent = self._sent.pop(token, None)
                if sent is not None:
                    self.latencies_ms.append((now - sent[0]) * 1000.0)
                    self._acked.append((sent[1], wall))
                else:
                    self._early[token] = (now, wall)
        assert self.listener is not None
        self.listener.on_published(token, ok, reason)


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)  # polling a condition with a deadline
    return True


def _sample_body(bundles: list[Bundle], inputs: bench.BenchInputs) -> dict[str, Any]:
    det = next((b for b in bundles if b.manifest.task == "detection"), bundles[0])
    m = Model.load(det, RuntimeOptions(intra_op_threads=1, allow_spinning=False))
    return m.predict_bytes(inputs.photos["1080p"]).to_dict()


def measure_mqtt(bundles: list[Bundle], inputs: bench.BenchInputs, *, quick: bool, tmp_root: Path) -> dict[str, Any]:
    from tests.support.broker import Broker

    n = 1000 if quick else 10000
    body = _sample_body(bundles, inputs)
    out: dict[str, Any] = {"body_bytes": len(orjson.dumps(body)), "results": n, "qos": 1}
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        work = Path(tmp)
        broker = Broker(work / "broker")
        broker.start()
        coordinator = CoordinatorProcess(work / "coord.db", broker.port)
        try:
            phases = ("drain", "idle", "load") if quick else (
                "drain", "fill", "idle", "load", "load_other_processes", "load_switch_1ms", "load_nice",
                "load_io_priority", "load_headroom")
            for phase in phases:
                out.update(_phase(phase, work, broker.port, n, body, bundles, inputs, quick, broker.pid))
        finally:
            coordinator.stop(5)
            broker.close()
    return out


_COORDINATOR = (
    "import sys; from pathlib import Path; from tests.support.delivery import start_coordinator; "
    "c = start_coordinator(Path(sys.argv[1]), int(sys.argv[2])); ok = c.connected.wait(30); "
    "print('up' if ok else 'down', flush=True); sys.stdin.read(); c.stop(5)"
)


class CoordinatorProcess:
    """The test harness's coordinator (SQLite store) in a child process; stops when its stdin closes."""

    def __init__(self, db: Path, port: int) -> None:
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen([sys.executable, "-c", _COORDINATOR, str(db), str(port)], cwd=root,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != b"up":
            self.stop(5)
            raise RuntimeError(f"benchmark coordinator did not connect ({line!r})")

    def stop(self, timeout: float) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout + 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _phase(
    phase: str, work: Path, port: int, n: int, body: dict[str, Any], bundles: list[Bundle],
    inputs: bench.BenchInputs, quick: bool, broker_pid: int,
) -> dict[str, Any]:
    """One agent (outbox + publisher) against the broker and coordinator; returns this phase's figures."""
    from edge_agent.delivery.outbox import Outbox
    from edge_agent.delivery.publisher import Publisher, availability_will
    from edge_agent.transport.base import MqttSettings
    from edge_agent.transport.mqtt import PahoTransport

    device = f"bench-{phase.replace('_', '-')}"
    outbox = Outbox(work / f"{phase}.db", device)
    if phase == "drain":
        _fill(outbox, n, body, threads=4)
    timed = TimedTransport(PahoTransport(MqttSettings(port=port, client_id=device), availability_will(device)))
    outbox.add_listener(timed.note_commit)
    publisher = Publisher(outbox, timed, device, lambda: {"models": []})
    publisher.start()
    try:
        if not _wait(lambda: publisher.state == "connected", 10):
            raise RuntimeError("publisher did not connect to the benchmark broker")
        t0 = time.perf_counter()
        if phase == "drain":
            ok = _wait(lambda: outbox.stats().backlog == 0, 120)
            return {"acked_per_s": round(n / (time.perf_counter() - t0), 1) if ok else 0.0}
        if phase == "fill":
            _fill(outbox, n, body, threads=4)
            ok = _wait(lambda: outbox.stats().backlog == 0, 120)
            return {"fill_and_ack_per_s": round(n / (time.perf_counter() - t0), 1) if ok else 0.0}
        before = sys.getswitchinterval()
        if phase == "load_switch_1ms":
            sys.setswitchinterval(0.001)
        if phase == "load_io_priority":
            _renice_io_threads(-10)
            os.setpriority(os.PRIO_PROCESS, broker_pid, -10)  # the broker is on the same CPUs here
        try:
            workers = {"idle": 0, "load_other_processes": 0, "load_headroom": max(1, bench.cpu_count() - 1)}.get(
                phase, -1)
            burners = _burn_processes(bundles, work, inputs.stream[0]) if phase == "load_other_processes" else []
            try:
                res = _under_load(bundles, inputs, outbox, timed, quick, workers=workers,
                                  nice=10 if phase == "load_nice" else 0)
            finally:
                for proc in burners:
                    proc.terminate()
                    proc.wait(10)
        finally:
            sys.setswitchinterval(before)
            os.setpriority(os.PRIO_PROCESS, broker_pid, 0)
        _wait(lambda: outbox.stats().backlog == 0, 30)
        suffix = {"idle": "_idle", "load": "_under_load", "load_switch_1ms": "_under_load_switch_1ms",
                  "load_nice": "_under_load_nice10", "load_io_priority": "_under_load_io_nice_minus10",
                  "load_headroom": "_under_load_one_core_free",
                  "load_other_processes": "_under_same_load_in_other_processes"}[phase]
        return {k.replace("_under_load", suffix): v for k, v in res.items()}
    finally:
        publisher.stop(5)
        outbox.close()


def _renice_io_threads(nice: int) -> None:
    """Give paho's network thread, the publisher and the outbox writer a higher CPU priority (needs root or
    CAP_SYS_NICE); a test of what an agent could do, not something the agent does today."""
    for t in threading.enumerate():
        if t.native_id and (t.name.startswith("paho") or t.name in ("publisher", "outbox-writer")):
            try:
                os.setpriority(os.PRIO_PROCESS, t.native_id, nice)
            except PermissionError:
                log.warning("cannot renice %s (not root)", t.name)


_BURN = (
    "import sys, pathlib; from edge_agent.bundles.bundle import load_bundle; "
    "from edge_agent.vision.model import Model; "
    "from edge_agent.vision.runtime import RuntimeOptions; "
    "m = Model.load(load_bundle(pathlib.Path(sys.argv[1])), RuntimeOptions(intra_op_threads=1, allow_spinning=False)); "
    "data = pathlib.Path(sys.argv[2]).read_bytes()\nwhile True: m.predict_bytes(data)"
)


def _burn_processes(bundles: list[Bundle], work: Path, jpeg: bytes) -> list[subprocess.Popen[bytes]]:
    """The same detector loop, one per core, in separate processes: equal CPU load without sharing our GIL."""
    det = next((b for b in bundles if b.manifest.task == "detection"), bundles[0])
    photo = work / "burn.jpg"
    photo.write_bytes(jpeg)
    return [
        subprocess.Popen([sys.executable, "-c", _BURN, str(det.directory), str(photo)])
        for _ in range(bench.cpu_count())
    ]


def _fill(outbox: Any, n: int, body: dict[str, Any], threads: int) -> None:
    def one(i: int) -> None:
        outbox.add_result(f"in-{i}", pipeline="bench", model=body["model"], model_version="1", body=body)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))


def _under_load(
    bundles: list[Bundle], inputs: bench.BenchInputs, outbox: Any, timed: TimedTransport, quick: bool, workers: int,
    nice: int = 0,
) -> dict[str, Any]:
    """Detector flat out on ``workers`` threads (-1 = one per core; 1-thread sessions), results into the outbox."""
    det = next((b for b in bundles if b.manifest.task == "detection"), bundles[0])
    workers = bench.cpu_count() if workers < 0 else workers
    models = [Model.load(det, RuntimeOptions(intra_op_threads=1, allow_spinning=False)) for _ in range(workers)]
    stop = threading.Event()
    counts = [0] * workers

    def work(i: int) -> None:
        if nice:  # Linux: per-thread niceness; the network and outbox threads then win the CPU when they wake
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        k = 0
        while not stop.is_set():
            r = models[i].predict_bytes(inputs.stream[k % len(inputs.stream)])
            outbox.add_result(f"load-{i}-{k}", pipeline="bench", model=r.model, model_version=r.model_version,
                              body=r.to_dict())
            counts[i] += 1
            k += 1

    # a light side stream of small results so that there are enough publishes to take a p99 of
    def side() -> None:
        k = 0
        while not stop.wait(0.01):
            outbox.add_result(f"side-{k}", pipeline="bench", model="side", model_version="1", body={"k": k})
            k += 1

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(workers)]
    threads.append(threading.Thread(target=side, daemon=True))
    seconds = 3.0 if quick else 15.0
    for t in threads:
        t.start()
    stop.wait(1.0)
    timed.recording = True
    t0 = time.perf_counter()
    stop.wait(seconds)
    timed.recording = False
    frames, elapsed = sum(counts), time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join(30)
    lat = np.asarray(timed.latencies_ms) if timed.latencies_ms else np.asarray([np.nan])
    created, committed = timed.result_latencies_ms()
    e2e, c2p = np.asarray(created or [np.nan]), np.asarray(committed or [np.nan])
    return {
        "load_model_under_load": det.name,
        "load_workers_under_load": workers,
        "load_fps_under_load": round(frames / elapsed, 2),
        "loadavg_1m_under_load": round(os.getloadavg()[0], 2),
        "publishes_timed_under_load": len(timed.latencies_ms),
        "publish_p50_ms_under_load": round(float(np.percentile(lat, 50)), 3),
        "publish_p99_ms_under_load": round(float(np.percentile(lat, 99)), 3),
        "publish_max_ms_under_load": round(float(lat.max()), 3),
        "commit_to_puback_p50_ms_under_load": round(float(np.percentile(c2p, 50)), 3),
        "commit_to_puback_p99_ms_under_load": round(float(np.percentile(c2p, 99)), 3),
        "commit_to_puback_max_ms_under_load": round(float(c2p.max()), 3),
        "result_to_puback_p50_ms_under_load": round(float(np.percentile(e2e, 50)), 3),
        "result_to_puback_p99_ms_under_load": round(float(np.percentile(e2e, 99)), 3),
        "result_to_puback_max_ms_under_load": round(float(e2e.max()), 3),
    }


def measure(bundles: list[Bundle], inputs: bench.BenchInputs, *, quick: bool, tmp_root: Path) -> dict[str, Any]:
    """Delivery and HTTP sections of the report; a section that cannot run says why."""
    out: dict[str, Any] = {}
    try:
        out["delivery"] = measure_mqtt(bundles, inputs, quick=quick, tmp_root=tmp_root)
    except Exception as exc:  # a missing broker or module must not lose the rest of the report
        log.exception("delivery benchmark failed")
        out["delivery"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        out["http"] = measure_http(bundles, inputs, quick=quick, tmp_root=tmp_root)
    except Exception as exc:
        log.exception("HTTP benchmark failed")
        out["http"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _crop_model(bundles: list[Bundle], workers: int) -> tuple[list[Any], str]:
    """Real crop classifier sessions when a crop bundle exists, else the API harness's fake-runtime model."""
    crop = [b for b in bundles if b.manifest.task == "classification" and any(
        w in b.name.lower() for w in ("crop", "plant", "leaf", "bean"))]
    crop.sort(key=lambda b: (not bench.is_quantized(b), b.name))
    if crop:
        opts = RuntimeOptions(intra_op_threads=1, allow_spinning=False)
        models = [Model.load(crop[0], opts) for _ in range(workers)]
        for m in models:
            m.warmup(1)
        return models, crop[0].name
    from tests.support.api_harness import fake_crop_model

    return [fake_crop_model() for _ in range(workers)], "fake_crop (FakeRuntime: HTTP, spool, pipeline, outbox only)"


def measure_http(bundles: list[Bundle], inputs: bench.BenchInputs, *, quick: bool, tmp_root: Path) -> dict[str, Any]:
    """POST /v1/diagnose with 1024 px JPEG photos from concurrent clients against a real uvicorn server."""
    import httpx

    from edge_agent.config import HttpConfig
    from edge_agent.flow.pipeline import Pipeline
    from edge_agent.sectors.crop import crop_verdict
    from tests.support import api_harness

    sources = [bench.compose([inputs.frame[:, :, ::-1]], (1024, 768), 1, 0.0, 0)]
    photo = bench.encode_jpeg(np.ascontiguousarray(sources[0]), quality=90)
    workers = bench.cpu_count()
    models, model_name = _crop_model(bundles, workers)
    clients = 4
    seconds = 3.0 if quick else 15.0
    settings = HttpConfig(rate_limit_per_minute=1_000_000, rate_limit_burst=100_000)
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        holder: list[Pipeline] = []
        harness = api_harness.build(Path(tmp), settings, submit=lambda item: holder[0].submit(item))  # noqa: PLW0108 - late-bound
        pipeline = Pipeline("crop", models, harness.outbox, kind="crop",
                            sector=lambda result, item: crop_verdict(result, item.hints), queue_size=64)
        pipeline.start()
        holder.append(pipeline)
        stop = threading.Event()
        codes: dict[int, int] = {}
        lat: list[float] = []
        lock = threading.Lock()

        def client(port: int) -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    r = c.post("/v1/diagnose", files={"image": ("leaf.jpg", photo, "image/jpeg")})
                    with lock:
                        codes[r.status_code] = codes.get(r.status_code, 0) + 1
                        if r.status_code == 200:
                            lat.append((time.perf_counter() - t0) * 1000.0)

        with api_harness.serve(harness.app) as port:
            threads = [threading.Thread(target=client, args=(port,), daemon=True) for _ in range(clients)]
            for t in threads:
                t.start()
            stop.wait(1.0)
            with lock:
                n0 = len(lat)
            t0 = time.perf_counter()
            stop.wait(seconds)
            with lock:
                n1 = len(lat)
            elapsed = time.perf_counter() - t0
            stop.set()
            for t in threads:
                t.join(30)
        pipeline.stop(10)
        harness.close()
    arr = np.asarray(lat or [np.nan])
    return {
        "photo": "1024x768 JPEG",
        "photo_bytes": len(photo),
        "model": model_name,
        "pipeline_workers": workers,
        "clients": clients,
        "requests_per_s": round((n1 - n0) / elapsed, 2),
        "latency_p50_ms": round(float(np.percentile(arr, 50)), 2),
        "latency_p99_ms": round(float(np.percentile(arr, 99)), 2),
        "status_codes": {str(k): v for k, v in sorted(codes.items())},
    }
