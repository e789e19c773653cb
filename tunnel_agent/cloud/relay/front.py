"""The relay's one listening port: TLS, the request head, then picows or aiohttp takes over.

Two WebSocket paths carry tunnel bytes and must be as fast as the agent: devices
(``/v1/tunnels/<id>``) and consumers (``/v1/sessions/<id>/connect``). They go to picows, the
same WebSocket code the agent uses. Everything else (the session API, probes, pages) goes to
aiohttp, the home of the HTTP routes. The front door reads each connection's request head itself,
then hands the transport, with the bytes it has read, to the protocol that owns that path
(``transport.set_protocol``): one port, one certificate, no proxy in between.

It is also where the port defends itself. A connection is counted from the TCP accept, before
any TLS memory is spent on it: at most ``max_handshakes_per_source`` connections per source may
be in TLS or still sending their head, at most ``max_connections`` in all (those still in
front plus aiohttp's open ones; WebSocket connections are bounded by the tunnel limits), and
the TLS handshake plus the request head must arrive within ``header_timeout``. A slowloris
client therefore holds a few slots for a few seconds, not the port.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import aiofastnet
import picows
from aiohttp import web
from picows.picows import WSProtocol  # type: ignore[attr-defined]

from tunnel_agent.cloud.relay.refusals import RefusalLog
from tunnel_agent.cloud.relay.sources import source_key

MAX_HEAD_BYTES = 16 * 1024
PICOWS_READ_BUFFER_BYTES = 4096  # grows with the frames it must hold; idle tunnels stay small
# aiofastnet's memory BIOs per TLS connection. Its default (16 records, 257 KiB each way) is
# touched as far as one read reaches, and picows doubles its read buffer to hold what one read
# decrypts to: after one burst a tunnel kept ~0.5 MiB for good. Four records (64 KiB) a read or a
# write still fill a fast link in few system calls, and on aiofastnet's own socket transport (see
# :func:`serve`) each read is a C call, not a pass through asyncio's Python transport.
TLS_INCOMING_BIO_BYTES = 4 * (16 * 1024 + 64)
TLS_OUTGOING_BIO_BYTES = 4 * (16 * 1024 + 64)
_TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_TOO_LARGE_ANSWER = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Connection: close\r\nContent-Length: 0\r\n\r\n"
)
_PICOWS_LOGGER = logging.getLogger("picows.relay")

ListenerFactory = Callable[[picows.WSUpgradeRequest], Any]


@dataclass(frozen=True)
class RequestHead:
    """The first line of a request and whether it asks for a WebSocket."""

    method: bytes
    path: bytes  # without the query string
    websocket: bool


@dataclass(frozen=True)
class WebSocketRoute:
    """How one connection's WebSocket is served: who builds its listener, how big a frame may be."""

    listener_factory: ListenerFactory
    max_frame_bytes: int


Router = Callable[[RequestHead, str], WebSocketRoute | None]


class ServerWebSocket(WSProtocol):  # type: ignore[misc]
    """picows's server-side protocol, cut at once when picows finds a protocol error.

    picows 2.3 answers a frame over ``max_frame_size`` (or any protocol error) with a CLOSE
    (1009 for size) and disconnects 10 ms later, but reads on meanwhile and even delivers the
    frame: an oversize frame would still be held in memory and forwarded. Checked after each
    read, the connection is cut before the next one. A listener that wants to know is told
    through ``protocol_error()``.
    """

    def buffer_updated(self, nbytes: int) -> None:
        super().buffer_updated(nbytes)
        transport = self.transport
        if transport is not None and transport.is_close_frame_sent:
            told = getattr(self.listener, "protocol_error", None)
            if told is not None:
                told()


def picows_server_protocol(route: WebSocketRoute, handshake_timeout_s: float) -> asyncio.Protocol:
    """A picows server-side protocol, as ``picows.ws_create_server`` makes one per connection."""
    return cast(
        asyncio.Protocol,
        ServerWebSocket(
            None,  # host and port: client side only
            None,  # path: client side only
            False,  # server side
            route.listener_factory,
            _PICOWS_LOGGER,
            True,  # disconnect on an exception in a listener
            handshake_timeout_s,
            False,  # no auto-ping: the pump pings
            20.0,
            20.0,
            picows.WSAutoPingStrategy.PING_WHEN_IDLE,
            True,  # answer pings
            route.max_frame_bytes,
            None,  # extra headers: client side only
            PICOWS_READ_BUFFER_BYTES,
        ),
    )


def parse_head(head: bytes) -> RequestHead | None:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return None
    websocket = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and value.strip().lower() == b"websocket":
            websocket = True
    return RequestHead(parts[0], parts[1].split(b"?", 1)[0], websocket)


class FrontDoor:
    """The protocol factory for the relay's listening socket (``loop.create_server(door, ...)``)."""

    def __init__(
        self,
        router: Router,
        http_server: web.Server,
        refusals: RefusalLog,
        *,
        tls: ssl.SSLContext | None,
        header_timeout_s: float,
        max_connections: int,
        max_handshakes_per_source: int,
    ) -> None:
        self.router = router
        self.http_server = http_server
        self.refusals = refusals
        self.tls = tls
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.max_handshakes_per_source = max_handshakes_per_source
        self.in_front = 0
        self._in_front_by_source: dict[str, int] = {}

    def __call__(self) -> FrontProtocol:
        return FrontProtocol(self)

    def admit(self, source: str) -> str | None:
        """Count a new connection in, or say why not."""
        if self.in_front + len(self.http_server.connections) >= self.max_connections:
            return "listener connection cap"
        key = source_key(source)
        if self._in_front_by_source.get(key, 0) >= self.max_handshakes_per_source:
            return "too many handshakes from this source"
        self.in_front += 1
        self._in_front_by_source[key] = self._in_front_by_source.get(key, 0) + 1
        return None

    def leave(self, source: str) -> None:
        self.in_front -= 1
        key = source_key(source)
        left = self._in_front_by_source.get(key, 0) - 1
        if left > 0:
            self._in_front_by_source[key] = left
        else:
            self._in_front_by_source.pop(key, None)


class FrontProtocol(asyncio.Protocol):
    """One connection until its request head is read; then it hands over and is gone."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.source = ""
        self._raw: asyncio.Transport | None = None
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._counted = False
        self._timer: asyncio.TimerHandle | None = None
        self._tls_task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = cast(asyncio.Transport, transport)
        self._raw = raw
        peer = raw.get_extra_info("peername")
        self.source = str(peer[0]) if peer else ""
        refusal = self.door.admit(self.source)
        if refusal is not None:
            self.door.refusals.refused(refusal, self.source, listener="relay")
            # Not from inside connection_made: aiofastnet registers the socket's reader after
            # this returns, without checking whether the transport is already closed, and that
            # stale registration would break the next socket given the same descriptor.
            asyncio.get_running_loop().call_soon(raw.abort)
            return
        self._counted = True
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.door.header_timeout_s, self._too_slow)
        if self.door.tls is None:
            self._transport = raw
        else:
            self._tls_task = loop.create_task(self._start_tls(raw, self.door.tls))

    async def _start_tls(self, raw: asyncio.Transport, tls: ssl.SSLContext) -> None:
        try:  # the front door's own timer fires before the handshake timeout
            upgraded = await aiofastnet.start_tls(
                asyncio.get_running_loop(),
                raw,
                self,
                tls,
                server_side=True,
                ssl_handshake_timeout=self.door.header_timeout_s + 1,
                ssl_incoming_bio_size=TLS_INCOMING_BIO_BYTES,
                ssl_outgoing_bio_size=TLS_OUTGOING_BIO_BYTES,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            raw.abort()
            self._leave()
            return
        self._transport = upgraded
        if self._buffer:  # the request came with the end of the handshake, before we got here
            self._read_head()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._transport is not None:
            self._read_head()

    def _read_head(self) -> None:
        transport = self._transport
        assert transport is not None
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self._leave()
                self.door.refusals.refused("request head too large", self.source)
                transport.write(_TOO_LARGE_ANSWER)
                transport.close()
            return
        head = parse_head(bytes(self._buffer[:end]))
        self._leave()
        route = self.door.router(head, self.source) if head is not None else None
        protocol: asyncio.BaseProtocol
        if route is not None:
            protocol = picows_server_protocol(route, self.door.header_timeout_s)
        else:
            protocol = self.door.http_server()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        _feed(protocol, bytes(self._buffer))
        self._buffer = bytearray()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()
        if self._tls_task is not None and not self._tls_task.done():
            self._tls_task.cancel()

    def _too_slow(self) -> None:
        self._timer = None
        if not self._counted:
            return
        self._leave()
        self.door.refusals.refused("request head not received in time", self.source)
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(_TIMEOUT_ANSWER)
            transport.close()
        elif self._raw is not None:
            self._raw.abort()
        if self._tls_task is not None and not self._tls_task.done():
            self._tls_task.cancel()

    def _leave(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted:
            self._counted = False
            self.door.leave(self.source)


async def serve(door: FrontDoor, host: str, port: int, backlog: int) -> asyncio.Server:
    """The door's listening socket. A TLS door gets aiofastnet's socket transports: with bounded
    BIOs a burst takes several reads, each a C call there, not a pass through asyncio's Python
    transport."""
    loop = asyncio.get_running_loop()
    if door.tls is None:
        return await loop.create_server(door, host, port, backlog=backlog)
    return await aiofastnet.create_server(loop, door, host, port, backlog=backlog)


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Give the new protocol the bytes the front door already read, as its transport would."""
    if not data:
        return
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]
    else:
        cast(asyncio.Protocol, protocol).data_received(data)
