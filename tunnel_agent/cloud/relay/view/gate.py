"""A private loopback port that turns the relay's tunnel into an ``rtsp://`` URL PyAV can open.

FFmpeg's RTSP client makes its own TCP connection; it cannot read from a WebSocket. So a watched
session listens on ``127.0.0.1:<ephemeral>`` and hands every connection made to it to the relay
(``join``), which asks the device to open a tunnel and bridges the two as it does for any consumer.
Only the watch's own remuxer is told the port, and the listener closes with the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from urllib.parse import quote

TunnelJoin = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
CLOSE_TIMEOUT_S = 2.0


class TunnelUnavailable(Exception):
    """The relay could not open a tunnel; the message is for viewers (no secrets, no ids)."""


class LoopbackGate:
    def __init__(self, join: TunnelJoin) -> None:
        self._join = join
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.connections = 0
        self.failure: str | None = None  # why the last tunnel could not be opened

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def url(self, path: str, username: str | None = None, password: str | None = None) -> str:
        auth = ""
        if username:
            auth = quote(username, safe="")
            if password:
                auth += ":" + quote(password, safe="")
            auth += "@"
        return f"rtsp://{auth}127.0.0.1:{self.port}{path}"

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.get_running_loop().create_task(self._carry(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.failure = None
            await self._join(reader, writer)
        except TunnelUnavailable as exc:
            self.failure = str(exc)
        finally:
            self._writers.discard(writer)
            writer.close()

    def drop_connections(self) -> None:
        """Cut the remuxer's connection (and so the tunnel): unblocks a read that waits."""
        for writer in list(self._writers):
            transport = writer.transport
            transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop_connections()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.gather(*self._tasks, return_exceptions=True)
