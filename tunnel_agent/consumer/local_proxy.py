"""``tunnel-agent connect``'s work: a local TCP port, each connection one WebSocket to the relay.

Each accepted connection becomes one pump (the agent's, tunnel/pump.py): the local TCP
connection as its near end, a picows WebSocket client to the session's ``connectUrl`` as its far
end, with ``Authorization: Bearer <token>``, through the user's proxy when the environment names
one, TLS verified. The local connection reads nothing until its WebSocket is up; a relay that
refuses it (an expired session, a device that does not answer) closes it, and says why once.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import sys
from dataclasses import dataclass, field
from typing import TextIO

import picows
from picows import WSHandshakeError

from tunnel_agent.config.base import split_host_port
from tunnel_agent.config.proxy import ProxyAddress
from tunnel_agent.consumer.target import ConnectTarget
from tunnel_agent.logs import EventLogger
from tunnel_agent.tunnel.failures import websocket_failure
from tunnel_agent.tunnel.pump import Pump, PumpLimits, StreamEnd, WebSocketEnd

MAX_FRAME_BYTES = 4 * 1024 * 1024
READ_BUFFER_INITIAL_BYTES = 4096
MAX_REASON_CHARS = 120


class ConnectTunnel(Pump):
    """One local connection pumped to one WebSocket to the relay."""

    def __init__(
        self, number: int, peer: str, local: StreamEnd, limits: PumpLimits, log: EventLogger
    ) -> None:
        self.local = local
        self.relay = WebSocketEnd("relay")
        super().__init__(self.local, self.relay, limits, log)
        self.number = number
        self.peer = peer


@dataclass
class ConnectOptions:
    target: ConnectTarget
    tls: ssl.SSLContext
    user_agent: str
    proxy: ProxyAddress | None
    handshake_timeout_s: float
    limits: PumpLimits = field(default_factory=PumpLimits)


class LocalProxy:
    def __init__(self, options: ConnectOptions, out: TextIO = sys.stdout) -> None:
        self.options = options
        self.out = out
        self.log = EventLogger("tunnel_agent.connect", session=options.target.session_id)
        self.tunnels: set[ConnectTunnel] = set()
        self._numbers = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._opening: set[asyncio.Task[None]] = set()

    async def start(self, listen: str) -> tuple[str, int]:
        host, port = split_host_port(listen)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: StreamEnd("local", self._accepted), host, port, backlog=128
        )
        bound = int(self._server.sockets[0].getsockname()[1])
        return host, bound

    def _accepted(self, end: StreamEnd) -> None:
        transport = end.transport
        assert transport is not None
        peer_address = transport.get_extra_info("peername")
        peer = f"{peer_address[0]}:{peer_address[1]}" if peer_address else "?"
        number = next(self._numbers)
        log = self.log.bind(connection=number)
        tunnel = ConnectTunnel(number, peer, end, self.options.limits, log)
        self.tunnels.add(tunnel)
        tunnel.closed.add_done_callback(lambda _: self._closed(tunnel))
        task = asyncio.get_running_loop().create_task(self._open(tunnel))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _open(self, tunnel: ConnectTunnel) -> None:
        options = self.options
        target = options.target
        try:
            async with asyncio.timeout(options.handshake_timeout_s):
                await picows.ws_connect(
                    lambda: tunnel.relay,
                    target.url,
                    ssl_context=options.tls if target.secure else None,
                    websocket_handshake_timeout=options.handshake_timeout_s,
                    enable_auto_ping=False,
                    max_frame_size=MAX_FRAME_BYTES,
                    extra_headers=[
                        ("Authorization", f"Bearer {target.token}"),
                        ("User-Agent", options.user_agent),
                    ],
                    max_redirects=0,
                    proxy=options.proxy.url() if options.proxy is not None else None,
                    read_buffer_init_size=READ_BUFFER_INITIAL_BYTES,
                    logger_name="picows.connect",
                )
        except Exception as exc:
            why = refusal_reason(exc, target.display, via_proxy=options.proxy is not None)
            self._say(f"connection {tunnel.number} from {tunnel.peer}: refused ({why})")
            self.log.warning("connect.refused", peer=tunnel.peer, reason=why)
            tunnel.abort("refused")
            return
        tunnel.start()
        self._say(f"connection {tunnel.number} from {tunnel.peer}: open")

    def _closed(self, tunnel: ConnectTunnel) -> None:
        self.tunnels.discard(tunnel)
        if tunnel.started:
            ws = tunnel.relay.ws
            close = ws.close_handshake if ws is not None else None
            received = close.recv if close is not None else None
            message = received.reason if received is not None and received.reason else None
            self.log.info(
                "connect.closed",
                peer=tunnel.peer,
                bytes_to_relay=tunnel.relay.bytes_written,
                bytes_to_local=tunnel.local.bytes_written,
                duration_s=round(tunnel.duration_s, 3),
                reason=tunnel.close_reason,
                **({"relay_said": message[:MAX_REASON_CHARS]} if message else {}),
            )

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    async def close(self, timeout_s: float = 3.0) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._opening):
            task.cancel()
        await asyncio.gather(*self._opening, return_exceptions=True)
        tunnels = list(self.tunnels)
        for tunnel in tunnels:
            tunnel.go_away("connect stopping")
        if tunnels:
            await asyncio.wait([t.closed for t in tunnels], timeout=timeout_s)


def refusal_reason(exc: BaseException, target: str, *, via_proxy: bool) -> str:
    """A short reason for a failed WebSocket: the status and the relay's own words, if any."""
    failure = websocket_failure(exc, target, via_proxy=via_proxy)
    if isinstance(exc, WSHandshakeError) and exc.response is not None:
        said = (exc.raw_body or b"").decode("utf-8", "replace").strip()
        said = "".join(c for c in said if c.isprintable())[:MAX_REASON_CHARS]
        return f"{failure.status}: {said}" if said else f"{failure.status} {failure.message}"
    return failure.message
