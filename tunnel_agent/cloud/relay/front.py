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
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import aiofastnet
import picows
from aiohttp import web
from picows.picows import WSProtocol  # type: ignore[attr-defined]

from tunnel_agent.cloud.relay.refusals import RefusalLog
from tunnel_agent.cloud.relay.sources import source_key
from tunnel_agent.logs import EventLogger

MAX_HEAD_BYTES = 16 * 1024
# picows's read buffer: it keeps 256 bytes of it aside, doubles the rest when a read leaves it
# more than 90 % full (or 256 bytes from its end) and never shrinks it. A frame from our agents is
# one TLS record at most (pump.MAX_SEND_FRAME_BYTES: 16,384 bytes with its header) unless the
# tunnel moves bulk. Starting from 2,816 bytes (2,560 usable; an idle tunnel keeps that), the third
# doubling gives 20,480, whose 90 % holds such a frame and 2 KiB more: each read is bounded to what
# keeps the buffer under the growth threshold (normally one whole record), so a camera-rate
# tunnel's buffer stops at 20,480 whatever a burst brings. Only a frame that cannot fit under
# the threshold (a bulk frame) gets the whole buffer and makes picows double it.
PICOWS_READ_BUFFER_BYTES = 3328
PICOWS_SPARE_BYTES = 256
_PICOWS_GROW_PERCENT = 90

_TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_TOO_LARGE_ANSWER = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Connection: close\r\nContent-Length: 0\r\n\r\n"
)
_PICOWS_LOGGER = logging.getLogger("picows.relay")
_LOG = EventLogger("tunnel_agent.relay")
ACCEPT_RETRY_DELAY_S = 1.0

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
    """picows's server-side protocol, handed bounded reads, cut at once on a protocol error.

    picows 2.3 answers a frame over ``max_frame_size`` (or any protocol error) with a CLOSE
    (1009 for size) and disconnects 10 ms later, but reads on meanwhile and even delivers the
    frame: an oversize frame would still be held in memory and forwarded. Checked after each
    read, the connection is cut before the next one. A listener that wants to know is told
    through ``protocol_error()``.
    """

    __slots__ = ("_read_at", "buffer_bytes")

    def start_buffer(self) -> None:
        """Follow the size of picows's read buffer (its own rule; picows does not expose it)."""
        self.buffer_bytes = max(PICOWS_READ_BUFFER_BYTES, 2048) - PICOWS_SPARE_BYTES
        self._read_at = 0

    def get_buffer(self, size_hint: int) -> memoryview:
        buffer: memoryview = super().get_buffer(size_hint)
        free = len(buffer)
        size = self.buffer_bytes
        while free > size:  # never expected; keeps the bound sane if picows grew on its own
            size *= 2
        self.buffer_bytes = size
        position = self._read_at = size - free
        room = fill_limit(size) - position
        return buffer[:room] if room > 0 else buffer

    def buffer_updated(self, nbytes: int) -> None:
        end = self._read_at + nbytes
        size = self.buffer_bytes
        if end > fill_limit(size):
            self.buffer_bytes = size * 2  # as picows is about to
        super().buffer_updated(nbytes)
        transport = self.transport
        if transport is not None and transport.is_close_frame_sent:
            told = getattr(self.listener, "protocol_error", None)
            if told is not None:
                told()


def fill_limit(size: int) -> int:
    """How far picows's read buffer of ``size`` bytes may fill without being doubled."""
    return min((size * (_PICOWS_GROW_PERCENT + 1) - 1) // 100, size - PICOWS_SPARE_BYTES - 1)


def picows_server_protocol(route: WebSocketRoute, handshake_timeout_s: float) -> asyncio.Protocol:
    """A picows server-side protocol, as ``picows.ws_create_server`` makes one per connection."""
    protocol = ServerWebSocket(
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
    )
    protocol.start_buffer()
    return cast(asyncio.Protocol, protocol)


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
    """One connection until its request head is read; then it hands over and is gone.

    On the plain port it is counted in ``connection_made``; on the TLS port it was counted when
    :class:`TlsListener` accepted its socket, and ``connection_made`` comes after the handshake.
    """

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.source = ""
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._counted = False
        self._timer: asyncio.TimerHandle | None = None
        self._tls_task: asyncio.Task[None] | None = None

    def admitted(self, source: str) -> None:
        """Counted in by the door: the TLS handshake and the request head have one deadline."""
        self.source = source
        self._counted = True
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.door.header_timeout_s, self._too_slow)

    def start_tls(self, sock: socket.socket, tls: ssl.SSLContext) -> None:
        self._tls_task = asyncio.get_running_loop().create_task(self._handshake(sock, tls))

    async def _handshake(self, sock: socket.socket, tls: ssl.SSLContext) -> None:
        try:  # the front door's own timer fires before the handshake timeout
            await aiofastnet.connect_accepted_socket(
                asyncio.get_running_loop(),
                lambda: self,
                sock,
                ssl=tls,
                ssl_handshake_timeout=self.door.header_timeout_s + 1,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            self._leave()  # aiofastnet closed the socket (its transport owns it from the start)
        except asyncio.CancelledError:
            self._leave()
            raise

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        if self._tls_task is not None:  # the TLS port: admitted at the accept, handshake done
            if not self._counted:  # the door gave up on it meanwhile (see below for call_soon)
                asyncio.get_running_loop().call_soon(self._transport.abort)
            return
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if peer else ""
        refusal = self.door.admit(source)
        if refusal is not None:
            self.door.refusals.refused(refusal, source, listener="relay")
            # Not from inside connection_made: aiofastnet registers the socket's reader after
            # this returns, without checking whether the transport is already closed, and that
            # stale registration would break the next socket given the same descriptor.
            asyncio.get_running_loop().call_soon(self._transport.abort)
            return
        self.admitted(source)

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
        if self._tls_task is not None and not self._tls_task.done():
            self._tls_task.cancel()  # still in the handshake: aiofastnet closes the socket

    def _leave(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted:
            self._counted = False
            self.door.leave(self.source)


class Listener(Protocol):
    """What the relay keeps of a listening port: its sockets, and a way to stop accepting."""

    @property
    def sockets(self) -> Sequence[Any]: ...

    def close(self) -> None: ...


class TlsListener:
    """The TLS port's listening sockets, accepted here rather than by a server object.

    Each accepted socket is counted (or refused and closed) before it has a transport, so a
    refusal spends no TLS memory and leaves nothing registered with the loop. Admitted sockets
    go to aiofastnet with TLS straight on the socket (OpenSSL's socket BIO, as the agent's side
    runs): no memory BIOs (64 KiB each way, touched in full by one burst) in front of each tunnel.
    """

    def __init__(self, door: FrontDoor, sockets: list[socket.socket], backlog: int) -> None:
        assert door.tls is not None
        self.door = door
        self.tls = door.tls
        self._sockets = sockets
        self._backlog = backlog
        self._loop = asyncio.get_running_loop()
        self._accepting = False

    @property
    def sockets(self) -> Sequence[socket.socket]:
        return self._sockets

    def start(self) -> None:
        self._accepting = True
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        self._pause()
        self._accepting = False
        for sock in self._sockets:
            sock.close()

    def _pause(self) -> None:
        for sock in self._sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())

    def _resume(self) -> None:
        if self._accepting:
            self.start()

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(self._backlog):  # as asyncio: at most a backlog's worth per wake-up
            try:
                sock, peer = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of descriptors or buffers: wait a moment, as asyncio
                _LOG.warning("relay.accept_failed", error=type(exc).__name__, errno=exc.errno)
                self._pause()
                self._loop.call_later(ACCEPT_RETRY_DELAY_S, self._resume)
                return
            sock.setblocking(False)
            self._admit(sock, str(peer[0]) if peer else "")

    def _admit(self, sock: socket.socket, source: str) -> None:
        refusal = self.door.admit(source)
        if refusal is not None:
            self.door.refusals.refused(refusal, source, listener="relay")
            sock.close()  # no transport yet: nothing else holds it
            return
        front = FrontProtocol(self.door)
        front.admitted(source)
        front.start_tls(sock, self.tls)


async def serve(door: FrontDoor, host: str, port: int, backlog: int) -> Listener:
    """The door's listening port: asyncio's server for plain HTTP, :class:`TlsListener` for TLS."""
    loop = asyncio.get_running_loop()
    if door.tls is None:
        return await loop.create_server(door, host, port, backlog=backlog)
    door.tls._aiofastnet_force_socket_bio = True  # type: ignore[attr-defined]
    # aiofastnet's socket-BIO read drops what it read in the same call when it raises, so a peer
    # that ends TCP without TLS's close_notify would lose its last bytes with the error; its
    # WebSocket CLOSE frame (or HTTP's framing) says whether it ended on purpose.
    door.tls.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    listener = TlsListener(door, await _listening_sockets(host, port, backlog), backlog)
    listener.start()
    return listener


async def _listening_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address ``host`` names, as asyncio binds."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


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
