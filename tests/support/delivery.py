"""A minimal agent-side loop and coordinator wiring over a real broker, for the delivery tests.

The agent side is: accept input -> ``outbox.add_result`` with a tiny body -> ``Publisher``; it does
not depend on the inference pipelines, so fault tests exercise delivery alone.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from edge_agent.coordinator.service import Coordinator, coordinator_will
from edge_agent.coordinator.store import SqliteStore, Store
from edge_agent.delivery.outbox import Outbox, OutboxLimits
from edge_agent.delivery.publisher import CommandHandler, Publisher, PublisherSettings, availability_will
from edge_agent.protocol.commands import CommandPolicy
from edge_agent.protocol.signing import AgentAuth, CoordinatorAuth
from edge_agent.transport.base import MqttSettings
from edge_agent.transport.mqtt import PahoTransport

FAST = PublisherSettings(window=200, batch=100, ack_timeout_s=3.0, republish_per_s=2000, heartbeat_s=1.0)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> float:
    """Poll ``predicate`` until true; returns seconds waited; AssertionError naming ``what`` on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


@dataclass
class Agent:
    outbox: Outbox
    publisher: Publisher
    transport: PahoTransport
    device: str

    def accept(self, input_id: str, pipeline: str = "p") -> bool:
        """Accept one input and store its (tiny) result; False when the outbox refused it (full)."""
        from edge_agent.errors import StorageFullError

        try:
            if not self.outbox.accept_input(input_id, source="test", pipeline=pipeline, spool_path=None, meta={}):
                return True
        except StorageFullError:
            return False
        self.outbox.add_result(
            input_id, pipeline=pipeline, model="tiny", model_version="1", body={"predictions": [], "input": input_id}
        )
        return True

    def feed(self, ids: list[str], threads: int = 4) -> list[str]:
        """Accept ``ids`` concurrently; returns the ids that were accepted."""
        with ThreadPoolExecutor(threads) as pool:
            ok = list(pool.map(self.accept, ids))
        return [i for i, accepted in zip(ids, ok, strict=True) if accepted]

    def stop(self) -> None:
        self.publisher.stop(5)
        self.outbox.close()


def start_agent(
    state_dir: Path,
    port: int,
    device: str = "dev1",
    *,
    settings: PublisherSettings = FAST,
    limits: OutboxLimits | None = None,
    keepalive_s: int = 30,
    username: str | None = None,
    password: str | None = None,
    ca_file: Path | None = None,
    auth: AgentAuth | None = None,
    policy: CommandPolicy | None = None,
    handler: CommandHandler | None = None,
) -> Agent:
    outbox = Outbox(state_dir / "outbox.db", device, limits)
    mqtt = MqttSettings(
        port=port, client_id=device, keepalive_s=keepalive_s, username=username, password=password,
        reconnect_min_s=1, reconnect_max_s=2, connect_timeout_s=2,
        tls=ca_file is not None, ca_file=str(ca_file) if ca_file else None,
    )
    transport = PahoTransport(mqtt, availability_will(device))
    publisher = Publisher(
        outbox, transport, device, lambda: {"models": [{"name": "tiny", "version": "1"}]}, settings, handler,
        auth=auth, policy=policy,
    )
    publisher.start()
    return Agent(outbox, publisher, transport, device)


def start_coordinator(
    db: Path | str, port: int, client_id: str = "coord", *, share_group: str | None = None,
    username: str | None = None, password: str | None = None, keepalive_s: int = 30, ca_file: Path | None = None,
    auth: CoordinatorAuth | None = None,
) -> Coordinator:
    mqtt = MqttSettings(
        port=port, client_id=client_id, keepalive_s=keepalive_s, clean_start=False, session_expiry_s=3600,
        manual_ack=True, username=username, password=password, reconnect_min_s=1, reconnect_max_s=2,
        connect_timeout_s=2, tls=ca_file is not None, ca_file=str(ca_file) if ca_file else None,
    )
    store: Store
    if isinstance(db, str):  # a PostgreSQL DSN
        from edge_agent.coordinator.store_pg import PostgresStore

        store = PostgresStore(db)
    else:
        store = SqliteStore(db)
    coordinator = Coordinator(
        store, PahoTransport(mqtt, coordinator_will(client_id, auth.ack_key if auth else None)),
        share_group=share_group, client_id=client_id,
        auth=auth,
    )
    coordinator.start()
    return coordinator


def agent_main(argv: list[str]) -> None:
    """Agent process for kill tests: ``python -m tests.support.delivery STATE PORT COUNT [ACK_TIMEOUT_S]``.

    Recovers pending inputs (accepted, no result yet), then accepts ids ``i0..i<COUNT-1>`` (skipping
    known ones), prints ``fed`` and keeps publishing until killed. Each line ``N`` read from stdin then
    accepts ``i0..i<N-1>`` the same way and prints ``fed`` again. ``ACK_TIMEOUT_S`` (default: FAST's) is
    how long a result waits for its end-to-end ack before the publisher re-sends it on its own.
    """
    state, port, count = Path(argv[0]), int(argv[1]), int(argv[2])
    settings = FAST
    if len(argv) > 3:
        settings = PublisherSettings(
            window=FAST.window, batch=FAST.batch, ack_timeout_s=float(argv[3]), republish_per_s=FAST.republish_per_s,
            heartbeat_s=FAST.heartbeat_s,
        )
    agent = start_agent(state, port, settings=settings)
    for pending in agent.outbox.pending_inputs():
        agent.outbox.add_result(
            pending.input_id, pipeline="p", model="tiny", model_version="1", body={"input": pending.input_id}
        )
    for i in range(count):
        agent.accept(f"i{i}")
    print("fed", flush=True)
    for line in sys.stdin:
        for i in range(int(line)):
            agent.accept(f"i{i}")
        print("fed", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    agent_main(sys.argv[1:])
