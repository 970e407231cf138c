"""Prometheus metrics of the agent, on a ``CollectorRegistry`` passed in (no globals).

The service builds one :class:`Metrics` and hands it to pipelines, sources and the publisher; they
call its small helpers. Gauges that mirror another component's state (outbox backlog, queue depth)
are read when Prometheus scrapes, through callables bound with :meth:`Metrics.bind_gauge`.

Names::

    edge_agent_stage_seconds{pipeline,stage}        histogram  decode|preprocess|inference|postprocess|sector|
                                                               outbox|total
    edge_agent_inputs_total{pipeline,outcome}       counter    ok|rejected|error
    edge_agent_queue_depth{pipeline}                gauge
    edge_agent_overloaded_total{pipeline}           counter    submits refused because the queue was full
    edge_agent_frames_total{source}                 counter    frames read from a camera
    edge_agent_frames_dropped_total{source,reason}  counter    latest-frame-wins replacements, overload
    edge_agent_source_up{source}                    gauge      1 when streaming / watching
    edge_agent_source_reconnects_total{source}      counter
    edge_agent_sink_errors_total{pipeline,sink}     counter    a failing sink never stops the others
    edge_agent_outbox_backlog                       gauge      unacknowledged results
    edge_agent_outbox_bytes                         gauge
    edge_agent_outbox_oldest_age_seconds            gauge
    edge_agent_published_total                      counter    results published (first time)
    edge_agent_republished_total                    counter    results published again (no e2e ack in time)
    edge_agent_publish_failures_total{reason}       counter    refused (broker said no, e.g. ACL) | error
    edge_agent_e2e_acked_total                      counter    results the coordinator acknowledged
    edge_agent_mqtt_connected                       gauge      1 when the publisher state is "connected"
    edge_agent_control_refused_total{code}          counter    acks and commands refused (ack_retained, ack_unsigned,
                                                               ack_expired, command_out_of_bounds...; docs/mqtt.md)
    edge_agent_model_updates_total{model,outcome}   counter    installed|rejected|rolled_back (model "unknown"
                                                               when refused before its statement was read)
    edge_agent_model_version{model,version}         gauge      1 for the version in force
    edge_agent_disk_free_bytes                      gauge      free bytes on the state disk (outbox, spool)
    edge_agent_disk_state{state}                    gauge      1 for the state in force: ok|low|full (low, full:
                                                               new inputs wait; see docs/agent.md)
    edge_agent_disk_reserve_held                    gauge      1 while the outbox's disk reserve is allocated
    edge_agent_alarms_total{alarm}                  counter    alarms raised (outbox_corrupt), kept in the outbox
    edge_agent_feedback_total{pipeline,kind}        counter    operator feedback stored: false_reject|missed_defect
    edge_agent_kept_images                          gauge      recent inspected images kept for feedback
    edge_agent_kept_images_bytes                    gauge
    edge_agent_kept_images_skipped_total{reason}    counter    not kept: busy (queue full) | space (disk short) |
                                                               error
    edge_agent_line_triggers_total{recipe,trigger}  counter    line triggers: http|mqtt|presence|api
    edge_agent_line_decisions_total{recipe,decision,cause}
                                                    counter    reject|pass by verdict|deadline|error|overloaded
    edge_agent_line_failsafe_total{recipe,cause}    counter    fail-safe signalled: deadline|error|overloaded
    edge_agent_line_late_verdicts_total{recipe}     counter    verdicts after the deadline (recorded, not signalled)
    edge_agent_line_signal_seconds{output}          histogram  trigger to the output's signal done
    edge_agent_line_signal_errors_total{output}     counter    an output that failed (after its bounded retries)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

STAGES = ("decode", "preprocess", "inference", "postprocess", "sector", "outbox", "total")
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """All collectors of one agent process, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.stage_seconds = Histogram(
            "edge_agent_stage_seconds", "Per-stage latency.", ["pipeline", "stage"], registry=r, buckets=_BUCKETS
        )
        self.inputs = Counter(
            "edge_agent_inputs_total", "Inputs processed by outcome.", ["pipeline", "outcome"], registry=r
        )
        self.queue_depth = Gauge(
            "edge_agent_queue_depth", "Inputs waiting in a pipeline queue.", ["pipeline"], registry=r
        )
        self.overloaded = Counter(
            "edge_agent_overloaded_total", "Submits refused because the queue was full.", ["pipeline"], registry=r
        )
        self.frames = Counter("edge_agent_frames_total", "Frames read from a camera.", ["source"], registry=r)
        self.frames_dropped = Counter(
            "edge_agent_frames_dropped_total", "Frames dropped by policy.", ["source", "reason"], registry=r
        )
        self.source_up = Gauge(
            "edge_agent_source_up", "1 when the source is streaming or watching.", ["source"], registry=r
        )
        self.source_reconnects = Counter(
            "edge_agent_source_reconnects_total", "Camera reconnect attempts.", ["source"], registry=r
        )
        self.sink_errors = Counter(
            "edge_agent_sink_errors_total", "Errors raised by result sinks.", ["pipeline", "sink"], registry=r
        )
        self.outbox_backlog = Gauge("edge_agent_outbox_backlog", "Unacknowledged results in the outbox.", registry=r)
        self.outbox_bytes = Gauge("edge_agent_outbox_bytes", "Bytes of unacknowledged results.", registry=r)
        self.outbox_oldest_age = Gauge(
            "edge_agent_outbox_oldest_age_seconds", "Age of the oldest unacknowledged result.", registry=r
        )
        self.model_updates = Counter(
            "edge_agent_model_updates_total", "Model updates by outcome.", ["model", "outcome"], registry=r
        )
        self.model_version = Gauge(
            "edge_agent_model_version", "1 for the model version in force.", ["model", "version"], registry=r
        )
        self.line_triggers = Counter(
            "edge_agent_line_triggers_total", "Line triggers.", ["recipe", "trigger"], registry=r
        )
        self.line_decisions = Counter(
            "edge_agent_line_decisions_total", "Line decisions signalled.", ["recipe", "decision", "cause"], registry=r
        )
        self.line_failsafe = Counter(
            "edge_agent_line_failsafe_total", "Fail-safe decisions signalled.", ["recipe", "cause"], registry=r
        )
        self.line_late = Counter(
            "edge_agent_line_late_verdicts_total", "Verdicts that came after their deadline.", ["recipe"], registry=r
        )
        self.line_signal_seconds = Histogram(
            "edge_agent_line_signal_seconds", "Trigger to signal done, per output.", ["output"], registry=r,
            buckets=_BUCKETS,
        )
        self.line_signal_errors = Counter(
            "edge_agent_line_signal_errors_total", "Failed signals per output.", ["output"], registry=r
        )
        self._versions: dict[str, str] = {}
        self._publisher: Callable[[], Mapping[str, Any]] | None = None
        self._storage: Callable[[], Mapping[str, Any]] | None = None
        self._feedback: Callable[[], Mapping[str, Any]] | None = None
        r.register(_PublisherCollector(self))
        r.register(_StorageCollector(self))
        r.register(_FeedbackCollector(self))

    # --- helpers called by the other components ------------------------------------------------------------------

    def observe_stages(self, pipeline: str, seconds: Mapping[str, float]) -> None:
        """Record one input's per-stage durations (seconds); unknown stage names are ignored."""
        for stage, value in seconds.items():
            if stage in STAGES:
                self.stage_seconds.labels(pipeline=pipeline, stage=stage).observe(max(value, 0.0))

    def input_done(self, pipeline: str, outcome: str) -> None:
        self.inputs.labels(pipeline=pipeline, outcome=outcome).inc()

    def submit_refused(self, pipeline: str) -> None:
        self.overloaded.labels(pipeline=pipeline).inc()

    def frame_read(self, source: str) -> None:
        self.frames.labels(source=source).inc()

    def frame_dropped(self, source: str, reason: str, count: int = 1) -> None:
        self.frames_dropped.labels(source=source, reason=reason).inc(count)

    def set_source_up(self, source: str, up: bool) -> None:
        self.source_up.labels(source=source).set(1 if up else 0)

    def source_reconnect(self, source: str) -> None:
        self.source_reconnects.labels(source=source).inc()

    def sink_error(self, pipeline: str, sink: str) -> None:
        self.sink_errors.labels(pipeline=pipeline, sink=sink).inc()

    def line_trigger(self, recipe: str, trigger: str) -> None:
        self.line_triggers.labels(recipe=recipe, trigger=trigger).inc()

    def line_decision(self, recipe: str, decision: str, cause: str) -> None:
        self.line_decisions.labels(recipe=recipe, decision=decision, cause=cause).inc()
        if cause != "verdict":
            self.line_failsafe.labels(recipe=recipe, cause=cause).inc()

    def line_late_verdict(self, recipe: str) -> None:
        self.line_late.labels(recipe=recipe).inc()

    def line_signal(self, output: str, seconds: float, ok: bool) -> None:
        if ok:
            self.line_signal_seconds.labels(output=output).observe(max(seconds, 0.0))
        else:
            self.line_signal_errors.labels(output=output).inc()

    def model_update(self, model: str, outcome: str) -> None:
        self.model_updates.labels(model=model, outcome=outcome).inc()

    def set_model_version(self, model: str, version: str) -> None:
        """The version in force for ``model`` (the previous version's series is removed)."""
        old = self._versions.get(model)
        if old is not None and old != version:
            self.model_version.remove(model, old)
        self._versions[model] = version
        self.model_version.labels(model=model, version=version).set(1)

    def bind_publisher(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        """Export the publisher's counters (``Publisher.snapshot``) at scrape time."""
        self._publisher = snapshot

    def bind_storage(self, read: Callable[[], Mapping[str, Any]]) -> None:
        """Export the disk state and alarms at scrape time: ``read()`` gives ``disk_free_bytes``,
        ``disk_state``, ``reserve_held`` and ``alarms`` (name -> count)."""
        self._storage = read

    def bind_feedback(self, read: Callable[[], Mapping[str, Any]]) -> None:
        """Export the inspection store's state at scrape time: ``read()`` gives ``images``, ``bytes``,
        ``dropped_busy``, ``skipped_space``, ``errors`` and ``totals`` ({pipeline: {kind: count}})."""
        self._feedback = read

    def set_outbox(self, backlog: int, size_bytes: int, oldest_age_s: float) -> None:
        self.outbox_backlog.set(backlog)
        self.outbox_bytes.set(size_bytes)
        self.outbox_oldest_age.set(oldest_age_s)

    def bind_queue_depth(self, pipeline: str, depth: Callable[[], float]) -> None:
        """Read a pipeline's queue depth at scrape time."""
        self.queue_depth.labels(pipeline=pipeline).set_function(depth)

    def bind_outbox(self, stats: Callable[[], tuple[int, int, float]]) -> None:
        """Read (backlog, bytes, oldest_age_s) from the outbox at scrape time; errors read as -1."""

        def part(i: int) -> Callable[[], float]:
            def read() -> float:
                try:
                    return float(stats()[i])
                except Exception:  # a scrape must never raise
                    log.debug("outbox stats unavailable", exc_info=True)
                    return -1.0

            return read

        self.outbox_backlog.set_function(part(0))
        self.outbox_bytes.set_function(part(1))
        self.outbox_oldest_age.set_function(part(2))


class _PublisherCollector:
    """Reads the publisher's own counters when Prometheus scrapes (the publisher keeps no metrics objects)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []  # names are fixed; nothing to pre-register (and describe must not call the publisher)

    def collect(self) -> Iterator[Any]:
        read = self._metrics._publisher
        if read is None:
            return
        try:
            snap = read()
        except Exception:  # a scrape must never raise
            log.debug("publisher snapshot unavailable", exc_info=True)
            return
        yield CounterMetricFamily(
            "edge_agent_published", "Results published (first time).", value=snap.get("published", 0)
        )
        yield CounterMetricFamily(
            "edge_agent_republished", "Results published again (no e2e ack in time).", value=snap.get("republished", 0)
        )
        failures = CounterMetricFamily("edge_agent_publish_failures", "Publishes refused or failed.", labels=["reason"])
        failures.add_metric(["refused"], snap.get("rejected", 0))
        failures.add_metric(["error"], snap.get("errors", 0))
        yield failures
        yield CounterMetricFamily(
            "edge_agent_e2e_acked", "Results acknowledged by the coordinator.", value=snap.get("acked", 0)
        )
        refused = CounterMetricFamily(
            "edge_agent_control_refused", "Acks and commands refused, by code.", labels=["code"]
        )
        for code, count in sorted(dict(snap.get("refusals") or {}).items()):
            refused.add_metric([code], count)
        yield refused
        connected = int(snap.get("state") == "connected")
        yield GaugeMetricFamily("edge_agent_mqtt_connected", "1 when the publisher is connected.", value=connected)


class _StorageCollector:
    """Disk state and alarms of the outbox, read when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        read = self._metrics._storage
        if read is None:
            return
        try:
            snap = read()
        except Exception:  # a scrape must never raise
            log.debug("storage state unavailable", exc_info=True)
            return
        yield GaugeMetricFamily(
            "edge_agent_disk_free_bytes", "Free bytes on the state disk.", value=snap.get("disk_free_bytes", -1)
        )
        state = GaugeMetricFamily("edge_agent_disk_state", "1 for the disk state in force.", labels=["state"])
        for name in ("ok", "low", "full"):
            state.add_metric([name], int(snap.get("disk_state") == name))
        yield state
        held = int(bool(snap.get("reserve_held")))
        yield GaugeMetricFamily("edge_agent_disk_reserve_held", "1 while the disk reserve is allocated.", value=held)
        alarms = CounterMetricFamily("edge_agent_alarms", "Alarms raised, by name.", labels=["alarm"])
        counts = dict(snap.get("alarms") or {})
        counts.setdefault("outbox_corrupt", 0)
        for name, count in sorted(counts.items()):
            alarms.add_metric([str(name)], int(count))
        yield alarms


class _FeedbackCollector:
    """Operator feedback and the recent images kept for it (``delivery.feedback``), read when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        read = self._metrics._feedback
        if read is None:
            return
        try:
            snap = read()
        except Exception:  # a scrape must never raise
            log.debug("feedback state unavailable", exc_info=True)
            return
        totals = CounterMetricFamily("edge_agent_feedback", "Operator feedback stored, by pipeline and kind.",
                                     labels=["pipeline", "kind"])
        for pipeline, kinds in sorted(dict(snap.get("totals") or {}).items()):
            for kind, count in sorted(dict(kinds).items()):
                totals.add_metric([str(pipeline), str(kind)], int(count))
        yield totals
        yield GaugeMetricFamily("edge_agent_kept_images", "Recent inspected images kept for feedback.",
                                value=snap.get("images", 0))
        yield GaugeMetricFamily("edge_agent_kept_images_bytes", "Bytes of the kept images.", value=snap.get("bytes", 0))
        skipped = CounterMetricFamily("edge_agent_kept_images_skipped", "Images not kept, by reason.",
                                      labels=["reason"])
        for reason, key in (("busy", "dropped_busy"), ("space", "skipped_space"), ("error", "errors")):
            skipped.add_metric([reason], int(snap.get(key, 0)))
        yield skipped
