"""The relay's work: consumer connections in, tunnelOpen out through the hub, device WebSockets in.

For each consumer connection on a route's port the relay mints a single-use token, asks the device
(direct method ``tunnelOpen`` through the hub) to connect back to ``<public_url>/v1/tunnels/<id>``,
accepts that WebSocket only with the token and ``TunnelConnectionSource: PnpDevice``, and bridges
the two. A refusal, an error answer or a timeout closes the consumer and says why in one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tunnel_agent.cloud.relay.bridge import ByteCounters, bridge
from tunnel_agent.cloud.relay.hub_service import HubServiceClient, MethodCallFailed
from tunnel_agent.cloud.relay.settings import RelayServerSettings, RouteSettings
from tunnel_agent.cloud.relay.tokens import TokenBook, Verdict
from tunnel_agent.config.base import split_host_port
from tunnel_agent.logs import SECRETS, EventLogger
from tunnel_agent.tunnel.contract import (
    CONNECTION_SOURCE_PNP_DEVICE,
    HEADER_CONNECTION_SOURCE,
    TUNNEL_OPEN_METHOD,
)

WS_HEARTBEAT_S = 30.0
HISTORY_SIZE = 100
PURGE_EVERY_S = 30.0


@dataclass(frozen=True)
class Route:
    """A consumer port and where its connections go."""

    id: str
    device_id: str
    local_port: int
    host: str
    port: int
    dynamic: bool

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "deviceId": self.device_id,
            "localPort": self.local_port,
            "address": f"{self.host}:{self.port}",
        }


@dataclass
class PendingTunnel:
    """One consumer connection waiting for, then joined to, its device WebSocket."""

    id: str
    route: Route
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    counters: ByteCounters = field(default_factory=ByteCounters)
    device_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str | None = None
    ws: web.WebSocketResponse | None = None
    open_rtt_ms: float | None = None


@dataclass(frozen=True)
class TunnelRecord:
    """A finished tunnel, kept briefly for status displays."""

    id: str
    route: str
    device_id: str
    open_rtt_ms: float
    bytes_to_device: int
    bytes_to_consumer: int
    duration_s: float
    reason: str | None


class RouteFull(Exception):
    """A limit on sessions or tunnels was reached."""


class Relay:
    def __init__(self, settings: RelayServerSettings, hub: HubServiceClient) -> None:
        self.settings = settings
        self.hub = hub
        self.tokens = TokenBook(settings.token_ttl)
        self.log = EventLogger("tunnel_agent.relay")
        self.routes: dict[str, Route] = {}
        self.pending: dict[str, PendingTunnel] = {}
        self._servers: dict[str, asyncio.Server] = {}
        self._consumers: set[asyncio.Task[None]] = set()
        self._per_device: Counter[str] = Counter()
        self._last_purge = time.monotonic()
        self.history: deque[TunnelRecord] = deque(maxlen=HISTORY_SIZE)

    # -- routes and sessions ------------------------------------------------------------------

    async def add_route(self, settings: RouteSettings) -> Route:
        host, port = split_host_port(settings.listen)
        return await self._listen(
            settings.name or f"route-{port}",
            settings.device_id,
            settings.local_port,
            host,
            port,
            dynamic=False,
        )

    async def open_session(self, device_id: str, local_port: int) -> Route:
        sessions = sum(1 for r in self.routes.values() if r.dynamic)
        if sessions >= self.settings.max_sessions:
            raise RouteFull(f"at most {self.settings.max_sessions} sessions")
        return await self._listen(
            secrets.token_hex(6), device_id, local_port, self.settings.session_host, 0, dynamic=True
        )

    async def _listen(
        self, route_id: str, device_id: str, local_port: int, host: str, port: int, *, dynamic: bool
    ) -> Route:
        route_box: list[Route] = []

        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.get_running_loop().create_task(
                self._consumer(route_box[0], reader, writer)
            )
            self._consumers.add(task)
            task.add_done_callback(self._consumers.discard)

        server = await asyncio.start_server(accept, host, port)
        bound = server.sockets[0].getsockname()[1]
        route = Route(route_id, device_id, local_port, host, int(bound), dynamic)
        route_box.append(route)
        self.routes[route.id] = route
        self._servers[route.id] = server
        self.log.info(
            "relay.route_open",
            route=route.id,
            device=device_id,
            local_port=local_port,
            address=f"{host}:{bound}",
        )
        return route

    async def close_route(self, route_id: str) -> bool:
        route = self.routes.pop(route_id, None)
        server = self._servers.pop(route_id, None)
        if route is None or server is None:
            return False
        server.close()
        for pending in [p for p in self.pending.values() if p.route.id == route_id]:
            pending.writer.close()
        self.log.info("relay.route_closed", route=route_id)
        return True

    async def close(self) -> None:
        for route_id in list(self.routes):
            await self.close_route(route_id)
        for task in list(self._consumers):
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        await self.hub.close()

    # -- a consumer connection ----------------------------------------------------------------

    async def _consumer(
        self, route: Route, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        device = route.device_id
        log = self.log.bind(route=route.id, device=device)
        if (
            len(self.pending) >= self.settings.max_tunnels
            or self._per_device[device] >= self.settings.max_tunnels_per_device
        ):
            log.warning(
                "relay.tunnel_refused", reason="tunnel limit reached", open=len(self.pending)
            )
            await _close_writer(writer)
            return
        now = time.monotonic()
        self._purge(now)
        tunnel_id, token = self.tokens.mint(now)
        pending = PendingTunnel(tunnel_id, route, reader, writer)
        self.pending[tunnel_id] = pending
        self._per_device[device] += 1
        log = log.bind(tunnel=tunnel_id)
        started = time.monotonic()
        try:
            await self._open(pending, token, log, started)
        finally:
            SECRETS.discard(token)
            self.pending.pop(tunnel_id, None)
            self.tokens.forget(tunnel_id)
            self._per_device[device] -= 1
            if pending.ws is not None and not pending.finished.is_set():
                await pending.ws.close()
            await _close_writer(writer)

    async def _open(
        self, pending: PendingTunnel, token: str, log: EventLogger, started: float
    ) -> None:
        route = pending.route
        payload = {
            "remoteEndpoint": f"{self.settings.public_url}/v1/tunnels/{pending.id}",
            "remoteAuthorizationToken": token,
            "localPort": route.local_port,
        }
        SECRETS.add(token)
        try:
            answer = await self.hub.invoke(
                route.device_id, TUNNEL_OPEN_METHOD, payload, self.settings.method_timeout
            )
        except MethodCallFailed as exc:
            log.warning(
                "relay.tunnel_failed",
                hub_status=exc.status,
                reason=exc.reason,
                took_ms=_ms(started),
            )
            return
        rtt_ms = _ms(started)
        if answer.status != 200:
            body = answer.payload if isinstance(answer.payload, dict) else {}
            log.warning(
                "relay.tunnel_refused",
                status=answer.status,
                code=body.get("code"),
                target=body.get("target"),
                message=body.get("message"),
                took_ms=rtt_ms,
            )
            return
        try:
            async with asyncio.timeout(self.settings.device_connect_timeout):
                await pending.device_arrived.wait()
        except TimeoutError:
            log.warning(
                "relay.tunnel_failed",
                reason="device answered 200 but never connected",
                took_ms=rtt_ms,
            )
            return
        pending.open_rtt_ms = rtt_ms
        log.info("relay.tunnel_open", local_port=route.local_port, open_rtt_ms=rtt_ms)
        await pending.finished.wait()
        record = TunnelRecord(
            pending.id,
            route.id,
            route.device_id,
            rtt_ms,
            pending.counters.to_device,
            pending.counters.to_consumer,
            round(time.monotonic() - started, 3),
            pending.reason,
        )
        self.history.append(record)
        log.info(
            "relay.tunnel_closed",
            bytes_to_device=record.bytes_to_device,
            bytes_to_consumer=record.bytes_to_consumer,
            duration_s=record.duration_s,
            reason=record.reason,
        )

    # -- the device's WebSocket -----------------------------------------------------------------

    async def accept_device(self, request: web.Request) -> web.StreamResponse:
        tunnel_id = request.match_info["tunnel_id"]
        log = self.log.bind(tunnel=tunnel_id, peer=request.remote)
        if request.headers.get(HEADER_CONNECTION_SOURCE) != CONNECTION_SOURCE_PNP_DEVICE:
            log.warning("relay.device_refused", status=403, reason="not a PnP device connection")
            return web.Response(status=403)
        authorization = request.headers.get("Authorization", "")
        token = authorization[7:] if authorization.startswith("Bearer ") else None
        verdict = self.tokens.redeem(tunnel_id, token, time.monotonic())
        pending = self.pending.get(tunnel_id)
        if verdict is not Verdict.ACCEPTED or pending is None:
            log.warning("relay.device_refused", status=401, reason=verdict.value)
            return web.Response(status=401)
        ws = web.WebSocketResponse(max_msg_size=0, heartbeat=WS_HEARTBEAT_S)
        await ws.prepare(request)
        pending.ws = ws
        pending.device_arrived.set()
        log.info("relay.device_connected", user_agent=request.headers.get("User-Agent", "")[:200])
        try:
            pending.reason = await bridge(ws, pending.reader, pending.writer, pending.counters)
        finally:
            pending.finished.set()
        return ws

    def _purge(self, now: float) -> None:
        if now - self._last_purge > PURGE_EVERY_S:
            self._last_purge = now
            self.tokens.purge(now)


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            await writer.wait_closed()


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
