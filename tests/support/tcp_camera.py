"""A bare TCP listener standing in for a camera when only the socket's fate matters."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class Connection:
    writer: asyncio.StreamWriter
    received: bytearray = field(default_factory=bytearray)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    reading: asyncio.Event = field(default_factory=asyncio.Event)


class TcpCamera:
    """Accepts connections, records what arrives and notices when the peer closes.

    With ``hold_reading`` a connection reads nothing until its ``reading`` event is set.
    """

    def __init__(self, *, hold_reading: bool = False) -> None:
        self.hold_reading = hold_reading
        self.connections: list[Connection] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = Connection(writer)
        if not self.hold_reading:
            connection.reading.set()
        self.connections.append(connection)
        try:
            await connection.reading.wait()
            while data := await reader.read(65536):
                connection.received += data
        except OSError:
            pass
        finally:
            connection.closed.set()
            writer.close()

    async def all_closed(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                for connection in list(self.connections):
                    await connection.closed.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in self.connections:
            connection.writer.close()
