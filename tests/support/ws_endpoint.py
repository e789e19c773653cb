"""A cloud-side WebSocket endpoint for tests: checks the agent's headers, bridges to a consumer.

A test opens a *session* (a token and a consumer TCP port), invokes tunnelOpen with the session's
URL, and connects a consumer (ffprobe, PyAV) to the session's port: the endpoint joins the consumer
to the device's WebSocket with a plain read/send bridge (aiohttp, not the project's pump, so that
the agent is checked against an independent peer) and counts the bytes. Other paths answer with
a fixed HTTP status or a redirect to a session, a raw listener accepts TCP and never answers
(a handshake that hangs), and a TLS one reads the upgrade request and hangs up without an
answer. A session can also hold its upgrade until the test releases it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

SessionHandler = Callable[[web.WebSocketResponse, "Session"], Awaitable[None]]
READ_SIZE_BYTES = 64 * 1024


@dataclass
class ByteCounters:
    to_device: int = 0
    to_consumer: int = 0


async def bridge(
    ws: web.WebSocketResponse,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    counters: ByteCounters,
) -> str:
    """Pump bytes both ways until either side ends; return why it ended."""

    async def consumer_to_device() -> str:
        while data := await reader.read(READ_SIZE_BYTES):
            await ws.send_bytes(data)
            counters.to_device += len(data)
        return "consumer closed"

    async def device_to_consumer() -> str:
        async for message in ws:
            if message.type != WSMsgType.BINARY:
                break
            writer.write(message.data)
            counters.to_consumer += len(message.data)
            await writer.drain()
        return f"device closed ({ws.close_code})"

    tasks = [asyncio.create_task(consumer_to_device()), asyncio.create_task(device_to_consumer())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        reason = first.result() if first.exception() is None else "error"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await ws.close()
        writer.close()
    return reason


@dataclass
class Session:
    id: str
    token: str
    handler: SessionHandler | None = None
    consumer_port: int = 0
    counters: ByteCounters = field(default_factory=ByteCounters)
    headers: dict[str, str] = field(default_factory=dict)
    connections: int = 0
    ended: str | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    consumer: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None
    server: asyncio.Server | None = None
    request: web.Request | None = None
    close_code: int | None = None
    autoping: bool = True
    pings: int = 0
    upgrade_requests: int = 0
    upgrade_requested: asyncio.Event = field(default_factory=asyncio.Event)
    release_upgrade: asyncio.Event | None = None


class TunnelEndpoint:
    """Runs on a ThreadLoop; all coroutines below run on that loop."""

    def __init__(
        self, tls: ssl.SSLContext | None, untrusted_tls: ssl.SSLContext | None = None
    ) -> None:
        self.tls = tls
        self.untrusted_tls = untrusted_tls
        self.sessions: dict[str, Session] = {}
        self.rejections: list[tuple[str, int]] = []
        self.ports: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        self._hang_server: asyncio.Server | None = None
        self._drop_server: asyncio.Server | None = None
        self._held: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/tunnel/{id}", self._tunnel)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/redirect/{id}", self._redirect)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2)
        await self._runner.setup()
        listeners = {"ws": None, "wss": self.tls, "wss_untrusted": self.untrusted_tls}
        for name, context in listeners.items():
            if name != "ws" and context is None:
                continue
            site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
            await site.start()
            server = site._server
            assert server is not None and server.sockets
            self.ports[name] = server.sockets[0].getsockname()[1]
        self._hang_server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.ports["hang"] = self._hang_server.sockets[0].getsockname()[1]
        if self.tls is not None:
            self._drop_server = await asyncio.start_server(self._drop, "127.0.0.1", 0, ssl=self.tls)
            self.ports["wss_drop"] = self._drop_server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for writer in self._held:
            writer.close()
        for server in (self._hang_server, self._drop_server):
            if server is not None:
                server.close()
        for session in self.sessions.values():
            if session.server is not None:
                session.server.close()
            if session.consumer is not None and not session.consumer.done():
                session.consumer.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str, scheme: str = "wss", *, listener: str | None = None) -> str:
        port = self.ports[listener or scheme]
        return f"{scheme}://127.0.0.1:{port}{path}"

    async def new_session(
        self,
        token: str | None = None,
        handler: SessionHandler | None = None,
        *,
        hold_upgrade: bool = False,
        autoping: bool = True,
    ) -> Session:
        """A session; with ``hold_upgrade`` its upgrade waits until ``release_upgrade`` is set.

        Without ``autoping`` the handler sees PING messages and must answer them itself.
        """
        session = Session(
            id=secrets.token_hex(4),
            token=token or secrets.token_urlsafe(24),
            handler=handler,
            release_upgrade=asyncio.Event() if hold_upgrade else None,
            autoping=autoping,
        )
        session.consumer = asyncio.get_running_loop().create_future()
        if handler is None:
            session.server = await asyncio.start_server(
                lambda r, w: self._consumer(session, r, w), "127.0.0.1", 0
            )
            session.consumer_port = session.server.sockets[0].getsockname()[1]
        self.sessions[session.id] = session
        return session

    async def _consumer(
        self, session: Session, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        assert session.consumer is not None
        if session.consumer.done():
            writer.close()
            return
        session.consumer.set_result((reader, writer))
        await session.finished.wait()

    async def _tunnel(self, request: web.Request) -> web.StreamResponse:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return self._reject(request, 404)
        session.upgrade_requests += 1
        session.upgrade_requested.set()
        session.headers = dict(request.headers)
        if request.headers.get("Authorization") != f"Bearer {session.token}":
            return self._reject(request, 401)
        if request.headers.get("TunnelConnectionSource") != "PnpDevice":
            return self._reject(request, 403)
        if not request.headers.get("User-Agent", "").startswith("tunnel-agent/"):
            return self._reject(request, 400)
        if session.release_upgrade is not None:
            await session.release_upgrade.wait()
        ws = web.WebSocketResponse(max_msg_size=0, autoping=session.autoping)
        await ws.prepare(request)
        session.connections += 1
        session.request = request
        session.connected.set()
        try:
            if session.handler is not None:
                await session.handler(ws, session)
                session.ended = "handler done"
            else:
                assert session.consumer is not None
                reader, writer = await asyncio.wait_for(asyncio.shield(session.consumer), 120)
                session.ended = await bridge(ws, reader, writer, session.counters)
        finally:
            session.close_code = ws.close_code
            session.finished.set()
        return ws

    def _reject(self, request: web.Request, status: int) -> web.Response:
        self.rejections.append((request.path, status))
        return web.Response(status=status)

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]))

    async def _redirect(self, request: web.Request) -> web.Response:
        """302 to the session's own URL: following it would hand the token to the target."""
        location = f"{request.scheme}://{request.host}/tunnel/{request.match_info['id']}"
        self.rejections.append((request.path, 302))
        return web.Response(status=302, headers={"Location": location.replace("http", "ws", 1)})

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.append(writer)
        with contextlib.suppress(Exception):
            await reader.read()

    async def _drop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        writer.close()


async def sink_handler(ws: web.WebSocketResponse, session: Session) -> None:
    """Count what the device sends until it closes."""
    async for message in ws:
        if isinstance(message.data, bytes):
            session.counters.to_consumer += len(message.data)


async def echo_handler(ws: web.WebSocketResponse, session: Session) -> None:
    """Send back what the device sends, until it closes."""
    async for message in ws:
        if isinstance(message.data, bytes):
            session.counters.to_consumer += len(message.data)
            await ws.send_bytes(message.data)
            session.counters.to_device += len(message.data)
