"""Two asyncio protocols joined in memory, each as the other's transport.

The view reads RTSP from a tunnel the relay runs in the same process: joining the tunnel's near
end (a ``StreamEnd``) to the RTSP client this way hands each chunk the device sends straight to
the client's ``data_received``, without the loopback socket (a send, a receive and a wake-up of
the event loop per chunk) that a port in between would cost.

Writes are delivered at once, unless the reader has paused reading: then they wait, in order,
until it resumes. Closing either side tells both protocols, on the next loop iteration.
"""

from __future__ import annotations

import asyncio
from typing import Any

PEER_NAME = ("relay", 0)


class PipeTransport(asyncio.Transport):
    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self.peer: PipeTransport | None = None
        self._closing = False
        self._paused = False
        self._waiting: list[bytes] = []

    # -- what the protocol on this side calls ---------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing and self.peer is not None:
            self.peer._deliver(bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.call_soon(self._protocol.connection_lost, None)
        if self.peer is not None:
            self.peer._peer_closed()

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if self._waiting:
                self._loop.call_soon(self._flush)

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Nothing is buffered on the writing side: the reader takes each write at once."""

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return PEER_NAME if name in ("peername", "sockname") else default

    # -- from the other side --------------------------------------------------------------------

    def _deliver(self, data: bytes) -> None:
        if self._closing:
            return
        if self._paused or self._waiting:
            self._waiting.append(data)
        else:
            self._protocol.data_received(data)

    def _flush(self) -> None:
        while self._waiting and not self._paused and not self._closing:
            self._protocol.data_received(self._waiting.pop(0))

    def _peer_closed(self) -> None:
        if not self._closing:
            self._loop.call_soon(self._flush)
            self._loop.call_soon(self.close)


def join(first: asyncio.Protocol, second: asyncio.Protocol) -> tuple[PipeTransport, PipeTransport]:
    """Connect two protocols to each other (``connection_made`` on both, first one first)."""
    loop = asyncio.get_running_loop()
    one, two = PipeTransport(loop, first), PipeTransport(loop, second)
    one.peer, two.peer = two, one
    first.connection_made(one)
    second.connection_made(two)
    return one, two
