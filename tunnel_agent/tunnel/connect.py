"""Opening both ends of a tunnel: TCP to the camera, then the WebSocket to the cloud.

Each step has its own deadline so that the tunnelOpen answer always lands well inside the
direct-method timeout, and every failure closes what was already opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import picows
from picows import WSParsedURL
from python_socks import ProxyTimeoutError
from python_socks.async_.asyncio import Proxy

from tunnel_agent.config.proxy import InvalidProxy, ProxyAddress
from tunnel_agent.logs import EventLogger
from tunnel_agent.tunnel import contract
from tunnel_agent.tunnel.camera_tunnel import Tunnel
from tunnel_agent.tunnel.errors import BAD_GATEWAY, TunnelError, camera_unreachable
from tunnel_agent.tunnel.failures import MSG_DNS, websocket_failure
from tunnel_agent.tunnel.proxy_choice import choose_proxy
from tunnel_agent.tunnel.pump import PumpLimits
from tunnel_agent.tunnel.request import TunnelRequest
from tunnel_agent.tunnel.targets import CameraTarget

MAX_FRAME_BYTES = 4 * 1024 * 1024
READ_BUFFER_INITIAL_BYTES = 4096
# What one read may hand picows: picows doubles its read buffer whenever a read fills it, and on
# OpenSSL's socket BIO one read drains as much as the kernel has, so without a bound a peer that
# sends faster than the camera reads grows it to megabytes, all of it forwarded after the pump
# paused reading. With the bound, at most this much waits beyond a write buffer's high-water mark.
READ_LIMIT_BYTES = 256 * 1024


@dataclass(frozen=True)
class ConnectOptions:
    """Everything connecting needs besides the request itself."""

    connect_timeout_s: float
    handshake_timeout_s: float
    ssl_context: ssl.SSLContext
    user_agent: Callable[[CameraTarget], str]
    limits: PumpLimits = field(default_factory=PumpLimits)
    proxy: ProxyAddress | None = None
    environ: Mapping[str, str] = field(default_factory=dict)


def tls_context(extra_ca_file: Path | None) -> ssl.SSLContext:
    """System trust store plus an optional extra CA bundle; verification is always on."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if extra_ca_file is not None:
        context.load_verify_locations(cafile=str(extra_ca_file))
    return context


def tunnel_tls_context(extra_ca_file: Path | None) -> ssl.SSLContext:
    """The agent's context for its WebSockets: TLS straight on the socket (OpenSSL's socket BIO).

    aiofastnet's default engine puts two 257 KiB memory BIOs in front of each connection, most of
    an idle wss tunnel's memory; on the socket BIO a tunnel costs about what a ws one does, at the
    same throughput. A TCP end without TLS's close_notify is taken as an end of stream, not an
    error: aiofastnet's socket-BIO read drops what it read in the same call when it raises, so the
    peer's last bytes (a handshake answer, the last frames) would be lost with the error. Nothing
    is truncated unseen: the WebSocket's own CLOSE frame says whether the peer ended on purpose.
    """
    context = tls_context(extra_ca_file)
    context._aiofastnet_force_socket_bio = True  # type: ignore[attr-defined]
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    return context


class BoundedReads(asyncio.BufferedProtocol):
    """picows's protocol, handed at most :data:`READ_LIMIT_BYTES` per read."""

    def __init__(
        self, inner: asyncio.BufferedProtocol, limit_bytes: int = READ_LIMIT_BYTES
    ) -> None:
        self._inner = inner
        self._limit_bytes = limit_bytes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        buffer = memoryview(self._inner.get_buffer(sizehint))
        return buffer[: self._limit_bytes] if len(buffer) > self._limit_bytes else buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._inner.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def bound_reads(ws: picows.WSTransport) -> None:
    transport = ws.underlying_transport
    protocol = transport.get_protocol()
    if isinstance(protocol, asyncio.BufferedProtocol) and not transport.is_closing():
        transport.set_protocol(BoundedReads(protocol))


class OpeningSockets:
    """The sockets a WebSocket opening connects (to the endpoint, or to the proxy).

    picows leaves its connection open while it waits for the upgrade answer, even when that wait
    is cancelled; keeping the sockets here lets a cancelled opening (agent shutdown) end them.
    """

    def __init__(self) -> None:
        self._sockets: list[socket.socket] = []
        self._through_proxy: socket.socket | None = None

    def through(self, sock: socket.socket) -> None:
        """A stream already opened through the proxy: what the next ``connect`` returns."""
        self._sockets.append(sock)
        self._through_proxy = sock

    async def connect(self, where: WSParsedURL) -> socket.socket:
        """picows's ``socket_factory``: connect to each address in turn, as asyncio would."""
        if self._through_proxy is not None:
            sock, self._through_proxy = self._through_proxy, None
            return sock
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(where.host, where.port, type=socket.SOCK_STREAM)
        failure: OSError = OSError(f"no address for {where.host}")
        for family, kind, protocol, _, address in infos:
            sock = socket.socket(family, kind, protocol)
            self._sockets.append(sock)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                failure = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise failure

    def shut(self) -> None:
        """End every connection; the transports holding them see the end and close them."""
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._through_proxy is not None:  # never handed to a transport
            self._through_proxy.close()


async def proxy_tunnel(
    proxy: ProxyAddress, host: str, port: int, timeout_s: float
) -> socket.socket:
    """A TCP stream to ``host:port`` through ``proxy`` (HTTP CONNECT, SOCKS4 or SOCKS5).

    Opened here rather than inside the WebSocket library so that a proxy that does not answer
    is told apart from an endpoint that does not: each has its own message.
    """
    sock: socket.socket = await Proxy.from_url(proxy.url()).connect(
        dest_host=host, dest_port=port, timeout=timeout_s
    )
    return sock


def request_headers(token: str, user_agent: str) -> list[tuple[str, str]]:
    return [
        ("Authorization", f"Bearer {token}"),
        (contract.HEADER_CONNECTION_SOURCE, contract.CONNECTION_SOURCE_PNP_DEVICE),
        ("User-Agent", user_agent),
    ]


def require_upgrade(tunnel: Tunnel) -> None:
    """Raise if the WebSocket never opened.

    picows hands back a closed transport, without calling ``on_ws_connected``, when the peer
    ends the connection before its upgrade answer; that is no tunnel.
    """
    if tunnel.remote.ws is None:
        raise ConnectionResetError("closed before the upgrade answer")


async def connect_tunnel(
    tunnel_id: str,
    request: TunnelRequest,
    target: CameraTarget,
    options: ConnectOptions,
    log: EventLogger,
) -> Tunnel:
    """Connect the camera, then the WebSocket, and start pumping; or raise TunnelError."""
    loop = asyncio.get_running_loop()
    endpoint = request.endpoint
    if endpoint.never_resolves:
        raise TunnelError(BAD_GATEWAY, endpoint.display, MSG_DNS)
    tunnel = Tunnel(tunnel_id, target, endpoint.display, options.limits, log)
    try:
        async with asyncio.timeout(options.connect_timeout_s):
            await loop.create_connection(lambda: tunnel.camera, target.host, target.port)
    except (OSError, TimeoutError):
        raise camera_unreachable(target.host, request.local_port) from None

    sockets = OpeningSockets()
    try:
        try:
            proxy = choose_proxy(endpoint.scheme, endpoint.host, options.proxy, options.environ)
        except InvalidProxy:
            raise TunnelError(
                BAD_GATEWAY, endpoint.display, "Proxy setting in the environment is invalid"
            ) from None
        in_proxy = False
        try:
            async with asyncio.timeout(options.handshake_timeout_s):
                if proxy is not None:
                    in_proxy = True
                    sockets.through(
                        await proxy_tunnel(
                            proxy, endpoint.host, endpoint.port, options.handshake_timeout_s
                        )
                    )
                    in_proxy = False
                ws, _ = await picows.ws_connect(
                    lambda: tunnel.remote,
                    endpoint.url,
                    ssl_context=options.ssl_context if endpoint.secure else None,
                    websocket_handshake_timeout=options.handshake_timeout_s,
                    enable_auto_ping=False,
                    max_frame_size=MAX_FRAME_BYTES,
                    extra_headers=request_headers(request.token, options.user_agent(target)),
                    max_redirects=0,
                    read_buffer_init_size=READ_BUFFER_INITIAL_BYTES,
                    logger_name="picows.tunnel",
                    socket_factory=sockets.connect,
                )
                require_upgrade(tunnel)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and in_proxy:
                exc = ProxyTimeoutError("no tunnel from the proxy in time")
            raise websocket_failure(exc, endpoint.display, via_proxy=in_proxy) from None
    except BaseException as exc:
        tunnel.abort("open cancelled" if isinstance(exc, asyncio.CancelledError) else "open failed")
        sockets.shut()
        raise
    bound_reads(ws)
    tunnel.start()
    return tunnel
