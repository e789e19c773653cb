"""The relay's work: consumers in, ``tunnelOpen`` out through the hub, device WebSockets in.

A consumer reaches a device through a *route* (a fixed TCP port from the configuration) or a
*session* (made through the API: a TCP port of its own and a WebSocket URL, both behind the
session's token and allowed sources). Whatever the way in, the consumer is checked first (its
source, its rate, the tunnel limits, its token): a refused consumer never causes a
``tunnelOpen``. Then the relay mints a single-use tunnel token, asks the device (direct method
``tunnelOpen`` through the hub) to connect back to ``<public_url>/v1/tunnels/<id>``, accepts that
WebSocket only with the token and ``TunnelConnectionSource: PnpDevice``, and the pump joins the
two. A refusal, an error answer or a timeout closes the consumer and says why in one log line.

Relay code that needs a tunnel of its own (the browser view) asks :meth:`Relay.open_tunnel`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import picows
from picows import WSCloseCode

from tunnel_agent.cloud.relay.front import RequestHead, WebSocketRoute
from tunnel_agent.cloud.relay.hub_service import HubServiceClient, MethodCallFailed
from tunnel_agent.cloud.relay.refusals import RefusalLog
from tunnel_agent.cloud.relay.sessions import (
    Session,
    SessionBook,
    SessionRequest,
    Verdict,
)
from tunnel_agent.cloud.relay.settings import RelayServerSettings, RouteSettings
from tunnel_agent.cloud.relay.sources import (
    ConnectionLimits,
    FailureLimits,
    is_allowed,
)
from tunnel_agent.cloud.relay.tokens import TokenBook, bearer_token
from tunnel_agent.cloud.relay.tokens import Verdict as TunnelVerdict
from tunnel_agent.cloud.relay.tunnels import Entry, RelayTunnel, Route
from tunnel_agent.config.base import split_host_port
from tunnel_agent.logs import SECRETS, EventLogger
from tunnel_agent.tunnel.contract import (
    CONNECTION_SOURCE_PNP_DEVICE,
    HEADER_CONNECTION_SOURCE,
    TUNNEL_OPEN_METHOD,
)
from tunnel_agent.tunnel.pump import End, PumpLimits, StreamEnd, WebSocketEnd

HISTORY_SIZE = 100
PURGE_EVERY_S = 30.0
CLOSE_TIMEOUT_S = 2.0
_TUNNEL_PATH = re.compile(rb"^/v1/tunnels/([^/]{1,64})$")
_CONNECT_PATH = re.compile(rb"^/v1/sessions/([^/]{1,64})/connect$")


@dataclass(frozen=True)
class TunnelRecord:
    """A finished tunnel, kept briefly for status displays and tests."""

    id: str
    route: str
    device_id: str
    open_rtt_ms: float | None
    bytes_to_device: int
    bytes_to_consumer: int
    duration_s: float
    reason: str | None


@dataclass
class RelayTotals:
    """What finished tunnels carried; live tunnels' counters are read from the tunnels."""

    bytes_to_device: int = 0
    bytes_to_consumer: int = 0
    closed: int = 0


class RelayObserver(Protocol):
    """Told once per tunnel what its tunnelOpen came to (metrics)."""

    def tunnel_open_result(
        self, hub_status: int, device_status: int | None, seconds: float
    ) -> None: ...


class Relay:
    def __init__(self, settings: RelayServerSettings, hub: HubServiceClient) -> None:
        self.settings = settings
        self.hub = hub
        self.log = EventLogger("tunnel_agent.relay")
        self.refusals = RefusalLog(self.log)
        self.device_tokens = TokenBook(settings.token_ttl)
        self.sessions = SessionBook(settings.max_sessions)
        self.routes: dict[str, Route] = {}
        self.tunnels: dict[str, RelayTunnel] = {}  # opening or open
        self.history: deque[TunnelRecord] = deque(maxlen=HISTORY_SIZE)
        self.totals = RelayTotals()
        self.observers: list[RelayObserver] = []
        self.connection_limits = ConnectionLimits(
            settings.max_connections_per_source,
            settings.new_connections_burst,
            settings.new_connections_per_second,
        )
        self.auth_failures = FailureLimits(
            settings.auth_failures_burst, settings.auth_failures_per_second
        )
        self.consumer_limits = PumpLimits(
            ping_interval_s=settings.ping_interval,
            ping_timeout_s=settings.ping_timeout,
            idle_timeout_s=settings.consumer_idle_timeout,
            max_lifetime_s=settings.consumer_max_lifetime,
            close_timeout_s=CLOSE_TIMEOUT_S,
        )
        self._listeners: dict[str, asyncio.Server] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._opening: set[asyncio.Task[None]] = set()
        self._per_device: Counter[str] = Counter()
        self._last_purge = time.monotonic()

    # -- routes and sessions ------------------------------------------------------------------

    async def add_route(self, settings: RouteSettings) -> Route:
        host, port = split_host_port(settings.listen)
        name = settings.name or f"route-{port}"
        route = Route(
            name,
            settings.device_id,
            settings.local_port,
            settings.protocol,
            tuple(settings.allowed_sources),
            host,
            port,
        )
        server = await self._listen(lambda: route, host, port)
        route.port = _bound_port(server)
        self.routes[route.id] = route
        self._listeners[route.id] = server
        self.log.info(
            "relay.route_open",
            route=route.id,
            device=route.device_id,
            local_port=route.local_port,
            address=f"{host}:{route.port}",
            protocol=route.protocol,
            allowed_sources=",".join(str(n) for n in route.allowed_sources),
        )
        return route

    async def create_session(self, request: SessionRequest, caller: str) -> tuple[Session, str]:
        """A session with its own listener, and its token (returned once, never kept)."""
        session, token = self.sessions.create(request, caller, time.time(), time.monotonic())
        try:
            server = await self._listen(lambda: session, self.settings.session_host, 0)
        except OSError:
            self.sessions.sessions.pop(session.id, None)
            raise
        session.host = self.settings.session_address_host
        session.port = _bound_port(server)
        self._listeners[session.id] = server
        loop = asyncio.get_running_loop()
        self._expiry[session.id] = loop.call_at(
            loop.time() + request.ttl_s, self.end_session, session.id, Verdict.EXPIRED
        )
        self.log.info(
            "relay.session_created",
            session=session.id,
            device=session.device_id,
            local_port=session.local_port,
            protocol=session.protocol,
            ttl_s=request.ttl_s,
            allowed_sources=",".join(str(n) for n in session.allowed_sources),
            caller=caller,
        )
        return session, token

    def end_session(self, session_id: str, why: Verdict) -> bool:
        """Expire or revoke a session: its token stops working and its tunnels close."""
        session = self.sessions.end(session_id, why, time.monotonic())
        if session is None:
            return False
        timer = self._expiry.pop(session_id, None)
        if timer is not None:
            timer.cancel()
        server = self._listeners.pop(session_id, None)
        if server is not None:
            server.close()
        tunnels = [t for t in self.tunnels.values() if t.entry is session]
        for tunnel in tunnels:
            tunnel.close(why.reason, WSCloseCode.POLICY_VIOLATION, why.reason)
        self.log.info(
            "relay.session_ended", session=session_id, reason=why.reason, tunnels=len(tunnels)
        )
        return True

    async def _listen(self, entry: Callable[[], Entry], host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: StreamEnd("consumer", lambda end: self._consumer_connected(entry(), end)),
            host,
            port,
            backlog=1024,
        )

    async def close(self) -> None:
        for server in self._listeners.values():
            server.close()
        self._listeners.clear()
        for timer in self._expiry.values():
            timer.cancel()
        tunnels = list(self.tunnels.values())
        for tunnel in tunnels:
            tunnel.go_away("relay stopping")
        if tunnels:
            await asyncio.wait([t.closed for t in tunnels], timeout=CLOSE_TIMEOUT_S + 1)
        for task in list(self._opening):
            task.cancel()
        await asyncio.gather(*self._opening, return_exceptions=True)
        await self.hub.close()

    # -- admission ----------------------------------------------------------------------------

    def _consumer_connected(self, entry: Entry, end: StreamEnd) -> None:
        transport = end.transport
        assert transport is not None
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if peer else ""
        where = {entry.kind: entry.id}
        if entry.kind == "session" and entry.id not in self.sessions.sessions:
            transport.close()  # ended a moment ago; its listener is closing
            return
        if not is_allowed(source, entry.allowed_sources):
            self.refusals.refused("source not allowed", source, **where)
            transport.close()
            return
        refusal = self._admit(entry, source)
        if refusal is not None:
            self.refusals.refused(refusal, source, **where)
            transport.close()
            return
        self._start_tunnel(entry, end, source, counted=True)

    def _capacity(self, entry: Entry) -> str | None:
        if len(self.tunnels) >= self.settings.max_tunnels:
            return "tunnel limit reached"
        if self._per_device[entry.device_id] >= self.settings.max_tunnels_per_device:
            return "device tunnel limit reached"
        return None

    def _admit(self, entry: Entry, source: str) -> str | None:
        """Room for one more tunnel, and this source within its limits (then it is counted)."""
        return self._capacity(entry) or self.connection_limits.admit(source, time.monotonic())

    # -- a tunnel -------------------------------------------------------------------------------

    def _start_tunnel(
        self, entry: Entry, consumer: End, source: str, *, counted: bool
    ) -> RelayTunnel:
        now = time.monotonic()
        self._purge(now)
        tunnel_id, token = self.device_tokens.mint(now)
        log = self.log.bind(tunnel=tunnel_id, **{entry.kind: entry.id}, device=entry.device_id)
        tunnel = RelayTunnel(
            tunnel_id, entry, consumer, source, limits=self.consumer_limits, log=log
        )
        self.tunnels[tunnel_id] = tunnel
        self._per_device[entry.device_id] += 1
        SECRETS.add(token)
        task = asyncio.get_running_loop().create_task(self._open(tunnel, token))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)
        tunnel.closed.add_done_callback(lambda _: self._closed(tunnel, task, token, counted))
        return tunnel

    async def _open(self, tunnel: RelayTunnel, token: str) -> None:
        entry = tunnel.entry
        payload = {
            "remoteEndpoint": f"{self.settings.public_url}/v1/tunnels/{tunnel.id}",
            "remoteAuthorizationToken": token,
            "localPort": entry.local_port,
        }
        started = time.monotonic()
        try:
            answer = await self.hub.invoke(
                entry.device_id, TUNNEL_OPEN_METHOD, payload, self.settings.method_timeout
            )
        except MethodCallFailed as exc:
            self._observe(exc.status, None, started)
            self._fail(
                tunnel,
                "relay.tunnel_failed",
                "device not reachable through the hub",
                hub_status=exc.status,
                reason=exc.reason,
                took_ms=_ms(started),
            )
            return
        rtt_ms = _ms(started)
        self._observe(200, answer.status, started)
        if answer.status != 200:
            body = answer.payload if isinstance(answer.payload, dict) else {}
            message = str(body.get("message", ""))[:200]
            self._fail(
                tunnel,
                "relay.tunnel_refused",
                f"device answered {answer.status}: {message}" if message else "device refused",
                status=answer.status,
                code=body.get("code"),
                target=body.get("target"),
                message=message,
                took_ms=rtt_ms,
            )
            return
        try:
            async with asyncio.timeout(self.settings.device_connect_timeout):
                await asyncio.shield(tunnel.device_arrived)
        except TimeoutError:
            self._fail(
                tunnel,
                "relay.tunnel_failed",
                "device did not connect",
                reason="device answered 200 but never connected",
                took_ms=rtt_ms,
            )
            return
        tunnel.open_rtt_ms = rtt_ms
        tunnel.log.info(
            "relay.tunnel_open",
            local_port=entry.local_port,
            open_rtt_ms=rtt_ms,
            source=tunnel.source,
            protocol=entry.protocol,
        )

    def _fail(self, tunnel: RelayTunnel, event: str, public: str, **fields: Any) -> None:
        tunnel.failed = True
        tunnel.log.warning(event, **fields)
        tunnel.close(public, WSCloseCode.BAD_GATEWAY, public)

    def _observe(self, hub_status: int, device_status: int | None, started: float) -> None:
        seconds = time.monotonic() - started
        for observer in self.observers:
            observer.tunnel_open_result(hub_status, device_status, seconds)

    def _closed(
        self, tunnel: RelayTunnel, task: asyncio.Task[None], token: str, counted: bool
    ) -> None:
        if not task.done():
            task.cancel()
        SECRETS.discard(token)  # its entry stays until purged: a replay is "already used"
        self.tunnels.pop(tunnel.id, None)
        self._per_device[tunnel.entry.device_id] -= 1
        if self._per_device[tunnel.entry.device_id] <= 0:
            del self._per_device[tunnel.entry.device_id]
        if counted:
            self.connection_limits.release(tunnel.source)
        self.totals.bytes_to_device += tunnel.bytes_to_device
        self.totals.bytes_to_consumer += tunnel.bytes_to_consumer
        self.totals.closed += 1
        record = TunnelRecord(
            tunnel.id,
            tunnel.entry.id,
            tunnel.entry.device_id,
            tunnel.open_rtt_ms,
            tunnel.bytes_to_device,
            tunnel.bytes_to_consumer,
            round(time.monotonic() - tunnel.requested_at, 3),
            tunnel.close_reason,
        )
        self.history.append(record)
        if not tunnel.failed:
            steering = tunnel.steering
            extra = {"setups_refused": steering.setups_refused} if steering is not None else {}
            tunnel.log.info(
                "relay.tunnel_closed",
                bytes_to_device=record.bytes_to_device,
                bytes_to_consumer=record.bytes_to_consumer,
                duration_s=record.duration_s,
                reason=record.reason,
                **extra,
            )

    def _purge(self, now: float) -> None:
        if now - self._last_purge > PURGE_EVERY_S:
            self._last_purge = now
            self.device_tokens.purge(now)

    # -- WebSockets (called by the front door, synchronously, with the request head) -----------

    def route_websocket(self, head: RequestHead, source: str) -> WebSocketRoute | None:
        """Which WebSocket this request is, if it is one of the two the pump serves."""
        if not head.websocket or head.method != b"GET":
            return None
        size = self.settings.max_message_bytes
        match = _TUNNEL_PATH.match(head.path)
        if match is not None:
            tunnel_id = match.group(1).decode("latin-1")
            return WebSocketRoute(lambda r: self.device_websocket(r, tunnel_id, source), size)
        match = _CONNECT_PATH.match(head.path)
        if match is not None:
            session_id = match.group(1).decode("latin-1")
            return WebSocketRoute(lambda r: self.consumer_websocket(r, session_id, source), size)
        return None

    def device_websocket(
        self, request: picows.WSUpgradeRequest, tunnel_id: str, source: str
    ) -> picows.WSListener | picows.WSUpgradeResponseWithListener:
        if request.headers.get(HEADER_CONNECTION_SOURCE) != CONNECTION_SOURCE_PNP_DEVICE:
            self.refusals.refused("device: not a PnP device connection", source, tunnel=tunnel_id)
            return refusal(403, "Forbidden")
        token = bearer_token(request.headers.get("Authorization"))
        verdict = self.device_tokens.redeem(tunnel_id, token, time.monotonic())
        tunnel = self.tunnels.get(tunnel_id)
        if verdict is not TunnelVerdict.ACCEPTED or tunnel is None or tunnel.close_reason:
            reason = verdict.value if verdict is not TunnelVerdict.ACCEPTED else "tunnel closed"
            self.refusals.refused(f"device: {reason}", source, tunnel=tunnel_id)
            return refusal(401, "Unauthorized")
        tunnel.log.info(
            "relay.device_connected",
            peer=source,
            user_agent=request.headers.get("User-Agent", "")[:200],
        )
        return tunnel.device

    def consumer_websocket(
        self, request: picows.WSUpgradeRequest, session_id: str, source: str
    ) -> picows.WSListener | picows.WSUpgradeResponseWithListener:
        now = time.monotonic()
        if self.auth_failures.blocked(source, now):
            self.refusals.refused("too many failed attempts", source, session=session_id)
            return refusal(429, "too many failed attempts")
        token = bearer_token(request.headers.get("Authorization"))
        verdict, session = self.check_session(session_id, token, source)
        if verdict is not Verdict.ACCEPTED or session is None:
            return refusal(verdict.status, verdict.reason)
        full = self._capacity(session)
        if full is not None:
            self.refusals.refused(full, source, session=session_id)
            return refusal(503, full)
        limited = self.connection_limits.admit(source, now)
        if limited is not None:
            self.refusals.refused(limited, source, session=session_id)
            return refusal(429, limited)
        end = WebSocketEnd("consumer")
        self._start_tunnel(session, end, source, counted=True)
        return end

    def check_session(
        self, session_id: str, token: str | None, source: str
    ) -> tuple[Verdict, Session | None]:
        """The one check of a consumer token (WebSocket, session look-up, the browser view):
        refusals are logged once, counted, and count against the source's failed attempts."""
        now = time.monotonic()
        verdict, session = self.sessions.check(session_id, token, source, now)
        if verdict is not Verdict.ACCEPTED:
            if verdict in (Verdict.WRONG_TOKEN, Verdict.UNKNOWN):
                self.auth_failures.failed(source, now)
            self.refusals.refused(f"consumer: {verdict.reason}", source, session=session_id)
        return verdict, session

    # -- tunnels for relay code ---------------------------------------------------------------

    def open_tunnel(self, entry: Entry, near: StreamEnd) -> RelayTunnel:
        """A new tunnel to ``entry``'s camera whose near end is ``near``, joined in this process.

        For relay code that reads the camera itself (the browser view joins its RTSP client to
        ``near`` in memory, one tunnel per watched session). The tunnel counts against the tunnel
        limits, not against any consumer's source limits; ``ConnectionRefusedError`` says which
        limit is full.
        """
        trouble = self._capacity(entry)
        if trouble is not None:
            self.refusals.refused(trouble, "relay", **{entry.kind: entry.id})
            raise ConnectionRefusedError(trouble)
        return self._start_tunnel(entry, near, "relay", counted=False)

    # -- figures --------------------------------------------------------------------------------

    @property
    def open_tunnels(self) -> list[RelayTunnel]:
        return [t for t in self.tunnels.values() if t.started and t.close_reason is None]


def refusal(status: int, reason: str) -> picows.WSUpgradeResponseWithListener:
    """An HTTP refusal of a WebSocket upgrade, with a short reason as its body."""
    response = picows.WSUpgradeResponse.create_error_response(status, reason.encode())
    return picows.WSUpgradeResponseWithListener(response, None)


def _bound_port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
