"""The fleet load test (benchmarks/fleet_load.py) at a tiny scale: simulated devices -> Mosquitto -> two
coordinator processes on a shared subscription -> one PostgreSQL; nothing lost, nothing stored twice, both
coordinators did part of the work."""

from __future__ import annotations

from pathlib import Path

from benchmarks.fleet_load import measure


def test_twenty_devices_through_two_coordinators_on_postgres(tmp_path: Path) -> None:
    doc = measure(devices=20, rate=10.0, duration=2.5, window=50, warmup_s=0.5, drain_s=30.0, tmp_root=tmp_path)
    assert doc["published"] >= 400, doc
    assert doc["drained"], doc
    assert (doc["lost"], doc["stored_twice"], doc["devices_with_gaps"], doc["watermarks_short"]) == (0, 0, 0, 0), doc
    assert doc["stored"] == doc["published"]
    inserted = [c["inserted"] for c in doc["coordinators"]]
    assert sum(inserted) == doc["published"] and min(inserted) > 0, doc  # the shared subscription split the work
    assert doc["ingest_to_ack_ms"]["p99"] is not None
    assert all(c["cpu_percent"] >= 0 and c["peak_rss_mb"] > 0 for c in doc["coordinators"])
