"""R14 soak (``make soak``, not in CI): mixed load with periodic kills and partitions.

Runs for ``SOAK_SECONDS`` (default 600). Every ``SOAK_PERIOD`` seconds one fault from the cycle
(broker SIGKILL, half-open link, connection resets, coordinator restart, slow link) is injected
while inputs keep arriving. Passes when nothing is missing at the end and memory and file
descriptors stayed flat.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from edge_agent.delivery.outbox import OutboxLimits
from tests.support.broker import Broker
from tests.support.delivery import start_agent, start_coordinator, wait_until
from tests.support.faultproxy import FaultProxy
from tests.test_reliability import Feeder


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.soak
def test_r14_soak(tmp_path: Path) -> None:
    duration = float(os.environ.get("SOAK_SECONDS", "600"))
    period = float(os.environ.get("SOAK_PERIOD", "15"))
    rng = random.Random(14)
    broker = Broker(tmp_path / "broker", max_queued_messages=200)
    broker.start()
    proxy = FaultProxy(broker.port)
    coordinator = start_coordinator(tmp_path / "c.db", broker.port, keepalive_s=5)
    agent = start_agent(tmp_path / "agent", proxy.port, keepalive_s=3, limits=OutboxLimits(min_free_bytes=0))
    feeder = Feeder(agent, pause=0.005)
    feeder.start()
    try:
        wait_until(lambda: coordinator.store.count_results("dev1") > 100, 30, "warm-up")
        base_rss, base_fds = rss_kib(), fds()
        faults = ["broker_kill", "blackhole", "reset", "coordinator_restart", "slow", "none"]
        t_end = time.monotonic() + duration
        n = 0
        while time.monotonic() < t_end:
            fault = faults[n % len(faults)]
            n += 1
            print(f"soak: t={duration - (t_end - time.monotonic()):.0f}s fault={fault} accepted={feeder.accepted} "
                  f"stored={coordinator.store.count_results('dev1')} rss={rss_kib()} KiB fds={fds()}", flush=True)
            if fault == "broker_kill":
                broker.kill()
                broker.start()
            elif fault == "blackhole":
                proxy.set("blackhole")
                time.sleep(rng.uniform(3, 8))  # soak: hold the partition for a while
                proxy.set("pass")
            elif fault == "reset":
                proxy.reset()
            elif fault == "coordinator_restart":
                coordinator.stop()
                coordinator.store.close()
                coordinator = start_coordinator(tmp_path / "c.db", broker.port, keepalive_s=5)
            elif fault == "slow":
                proxy.set("pass", delay_s=0.2, bandwidth_bps=64 * 1024)
                time.sleep(period / 2)  # soak: keep the link slow for half a period
                proxy.set("pass")
            time.sleep(period)  # soak: steady load between faults
        accepted = feeder.stop()
        wait_until(
            lambda: coordinator.store.count_results("dev1") >= accepted and agent.outbox.stats().backlog == 0,
            180,
            "drain after the soak",
        )
        assert coordinator.store.count_results("dev1") == accepted
        assert feeder.refused == 0
        grow_mib = (rss_kib() - base_rss) / 1024
        print(f"soak: {accepted} results, RSS growth {grow_mib:.1f} MiB, fds {base_fds} -> {fds()}")
        assert grow_mib < 64
        assert fds() <= base_fds + 16
    finally:
        feeder.halt.set()
        agent.stop()
        coordinator.stop()
        proxy.close()
        broker.close()
