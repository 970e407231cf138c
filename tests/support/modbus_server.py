"""A real Modbus TCP server (pymodbus's own) on a free loopback port, in a thread, for tests and benchmarks.

It records every write request it receives (time, kind, address, value) so a test can wait for a write and a
benchmark can time it; clients read coils and registers back over Modbus like from any PLC.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pymodbus.client import ModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from tests.support.api_harness import free_port


@dataclass(frozen=True)
class Write:
    at: float
    """``time.monotonic()`` when the server received the request."""
    kind: str
    """``coil`` or ``register``."""
    address: int
    value: int


@dataclass
class ModbusServer:
    port: int
    device_id: int = 1
    writes: list[Write] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def record(self, sending: bool, pdu: Any) -> Any:
        if not sending:
            name = type(pdu).__name__
            kind = "coil" if name.startswith("WriteSingleCoil") else (
                "register" if name.startswith("WriteSingleRegister") else None)
            if kind is not None:
                value = int(pdu.bits[0]) if kind == "coil" else int(pdu.registers[0])
                with self._cond:
                    self.writes.append(Write(time.monotonic(), kind, int(pdu.address), value))
                    self._cond.notify_all()
        return pdu

    def wait_writes(self, n: int, timeout: float = 10.0) -> list[Write]:
        """The first ``n`` writes, once they have arrived (AssertionError after ``timeout`` seconds)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.writes) >= n, timeout):
                raise AssertionError(f"timed out waiting for {n} Modbus writes; got {self.writes}")
            return list(self.writes[:n])

    def client(self) -> Any:
        """A connected pymodbus client (its methods are untyped: Any)."""
        client: Any = ModbusTcpClient("127.0.0.1", port=self.port, timeout=2, retries=0)
        assert client.connect(), "cannot connect to the test Modbus server"
        return client

    def coils(self, address: int = 0, count: int = 8) -> list[bool]:
        client = self.client()
        try:
            return list(client.read_coils(address, count=count, device_id=self.device_id).bits[:count])
        finally:
            client.close()

    def registers(self, address: int = 0, count: int = 8) -> list[int]:
        client = self.client()
        try:
            return list(client.read_holding_registers(address, count=count, device_id=self.device_id).registers)
        finally:
            client.close()


@contextmanager
def modbus_server(device_id: int = 1, size: int = 64, port: int | None = None) -> Iterator[ModbusServer]:
    """Start pymodbus's TCP server with ``size`` coils and holding registers (all 0) on ``port`` of loopback
    (default: a free one)."""
    server = ModbusServer(port or free_port(), device_id)
    bits = [SimData(0, count=size, datatype=DataType.BITS)]
    regs = [SimData(0, count=size, datatype=DataType.REGISTERS)]
    device = SimDevice(device_id, simdata=(bits, list(bits), regs, list(regs)))
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def main() -> None:
            srv = ModbusTcpServer(device, address=("127.0.0.1", server.port), trace_pdu=server.record)
            holder["server"] = srv
            await srv.serve_forever(background=True)
            started.set()
            await srv.serving

        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # reported to the waiting test
            holder["error"] = exc
            started.set()

    thread = threading.Thread(target=run, name="modbus-server", daemon=True)
    thread.start()
    assert started.wait(10), "the Modbus server did not start"
    if "error" in holder:
        raise holder["error"]
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(holder["server"].shutdown(), loop).result(10)
        thread.join(10)
