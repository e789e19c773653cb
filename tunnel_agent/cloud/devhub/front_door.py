"""The devhub's MQTT endpoint: authenticates each CONNECT, then relays packets to mosquitto.

mosquitto cannot check SAS tokens and has no per-client topic namespaces; IoT Hub's device
topics carry no device id. So devices never reach mosquitto directly: each client connection
here (TLS, or MQTT over WebSockets) is authenticated from its CONNECT (see access.py), then gets
its own connection to mosquitto on a private unix socket, and every topic it names is moved into
its own namespace on the way in and back out on the way out. mosquitto still does the broker's
work: sessions, QoS 1 delivery, persistence.

One connection is a :class:`DoorSession` (the MQTT logic, transport-neutral) between a client
transport and an :class:`_Upstream` protocol on the unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tunnel_agent.cloud.devhub import mqtt_codec as mqtt
from tunnel_agent.cloud.devhub.access import (
    CONNACK_REFUSED_PROTOCOL,
    CONNACK_SERVER_UNAVAILABLE,
    PeerCertificate,
    Principal,
    Refused,
    SubscribePlan,
    plan_subscribe,
)
from tunnel_agent.cloud.devhub.tls_memory import MemoryTls, TlsClosed
from tunnel_agent.logs import EventLogger

CONNECT_TIMEOUT_S = 10.0
UPSTREAM_TIMEOUT_S = 10.0
UPSTREAM_ATTEMPTS = 5
UPSTREAM_RETRY_S = 0.1
UPSTREAM_OPENING_LIMIT = 32  # broker connections being opened at once
MAX_PACKET_BYTES = 270_000  # IoT Hub's 256 KiB messages plus headers
WRITE_HIGH_BYTES = 256 * 1024

Authenticate = Callable[[mqtt.Connect, PeerCertificate | None], Principal]


class DoorEvents(Protocol):
    """What the hub learns from the front door (connection state, subscriptions, activity)."""

    def session_opened(self, principal: Principal, session_present: bool) -> None: ...

    def session_closed(self, principal: Principal) -> None: ...

    def subscribed(self, principal: Principal, filters: list[str]) -> None: ...

    def activity(self, principal: Principal) -> None: ...


class ClientLink(Protocol):
    """The client side of a session: bytes out, close, flow control."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


@dataclass
class DoorConfig:
    broker_socket: str
    events: DoorEvents
    log: EventLogger


class FrontDoor:
    """Keeps the sessions of every listener, so the hub can close a device's sessions."""

    def __init__(self, config: DoorConfig) -> None:
        self.config = config
        self.sessions: dict[tuple[str, str], set[DoorSession]] = {}
        self.opening = asyncio.Semaphore(UPSTREAM_OPENING_LIMIT)
        self._servers: list[asyncio.Server] = []

    async def listen_tls(
        self, host: str, port: int, context: ssl.SSLContext, authenticate: Authenticate
    ) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _TlsClient(self, context, authenticate), host, port, reuse_address=True
        )
        self._servers.append(server)

    def session(
        self,
        client: ClientLink,
        peer: Callable[[], bytes | None],
        authenticate: Authenticate,
        transport: str,
    ) -> DoorSession:
        return DoorSession(self, client, peer, authenticate, transport)

    def disconnect(self, kind: str, name: str) -> int:
        """Close every session of a device (disabled, deleted) or registration; how many."""
        sessions = list(self.sessions.get((kind, name), ()))
        for session in sessions:
            session.close(f"{kind} closed by the hub")
        return len(sessions)

    def count(self, kind: str, name: str) -> int:
        return len(self.sessions.get((kind, name), ()))

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for sessions in list(self.sessions.values()):
            for session in list(sessions):
                session.close("hub stopping")
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()

    def _opened(self, session: DoorSession) -> None:
        principal = session.principal
        assert principal is not None
        self.sessions.setdefault((principal.kind, principal.name), set()).add(session)

    def _closed(self, session: DoorSession) -> None:
        principal = session.principal
        if principal is None:
            return
        key = (principal.kind, principal.name)
        group = self.sessions.get(key)
        if group is not None:
            group.discard(session)
            if not group:
                del self.sessions[key]


class DoorSession:
    """One client's MQTT session through the door: CONNECT, then relaying both ways."""

    def __init__(
        self,
        door: FrontDoor,
        client: ClientLink,
        peer: Callable[[], bytes | None],
        authenticate: Authenticate,
        transport: str,
    ) -> None:
        self.door = door
        self.client = client
        self.peer = peer
        self.authenticate = authenticate
        self.transport = transport  # "tls" or "websocket"
        self.principal: Principal | None = None
        self._reader = mqtt.PacketReader(MAX_PACKET_BYTES)
        self._upstream: _Upstream | None = None
        self._held: list[bytes] = []  # client packets that arrive before the broker's CONNACK
        self._subscribes: dict[int, SubscribePlan] = {}
        self._opening: asyncio.Task[None] | None = None  # held: a task nobody holds can vanish
        self._closed = False
        self._open = False
        loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = loop.call_later(
            CONNECT_TIMEOUT_S, self.close, "no CONNECT in time"
        )

    @property
    def log(self) -> EventLogger:
        return self.door.config.log

    # -- from the client ---------------------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            packets = self._reader.feed(data)
            for packet in packets:
                self._from_client(packet)
                if self._closed:
                    return
        except mqtt.ProtocolError as exc:
            self.close(f"protocol error: {exc}")
        if self.principal is not None and self._open:
            self.door.config.events.activity(self.principal)

    def _from_client(self, packet: mqtt.Packet) -> None:
        if self.principal is None:
            if packet.kind != mqtt.CONNECT:
                raise mqtt.ProtocolError("the first packet must be CONNECT")
            self._connect(packet.body)
            return
        principal = self.principal
        if packet.kind == mqtt.CONNECT:
            raise mqtt.ProtocolError("second CONNECT")
        if packet.kind == mqtt.PUBLISH:
            publish = mqtt.parse_publish(packet.flags, packet.body)
            if publish.qos > 1:
                raise mqtt.ProtocolError("QoS 2 is not supported")
            topic = principal.inbound_topic(publish.topic)
            if topic is None:
                self.close(f"publish to a topic it may not use ({publish.topic[:80]})")
                return
            self._to_broker(mqtt.with_topic(packet.flags, packet.body, topic))
        elif packet.kind == mqtt.SUBSCRIBE:
            packet_id, filters = mqtt.parse_subscribe(packet.body)
            plan = plan_subscribe(principal, filters)
            if plan.refused_at:
                self.log.warning(
                    "devhub.subscribe_refused",
                    client=principal.name,
                    topics=",".join(filters[i][0][:80] for i in plan.refused_at),
                )
            if not plan.forwarded:
                self.client.write(mqtt.encode_suback(packet_id, plan.merge([])))
                return
            self._subscribes[packet_id] = plan
            self._to_broker(mqtt.encode_subscribe(packet_id, plan.forwarded))
        elif packet.kind == mqtt.UNSUBSCRIBE:
            packet_id, topics = mqtt.parse_unsubscribe(packet.body)
            mapped = [m[0] for t in topics if (m := principal.subscription(t, 0)) is not None]
            if not mapped:
                self.client.write(mqtt.encode_unsuback(packet_id))
                return
            self._to_broker(mqtt.encode_unsubscribe(packet_id, mapped))
        elif packet.kind in (mqtt.PUBACK, mqtt.PINGREQ):
            self._to_broker(packet.encode())
        elif packet.kind == mqtt.DISCONNECT:
            self._to_broker(packet.encode())
            self.close(None)
        else:
            raise mqtt.ProtocolError(f"packet type {packet.kind} from a client")

    def _connect(self, body: bytes) -> None:
        try:
            connect = mqtt.parse_connect(body)
        except mqtt.UnsupportedProtocol as exc:
            self._refuse(CONNACK_REFUSED_PROTOCOL, str(exc), None)
            return
        certificate = self.peer()
        peer = PeerCertificate.from_der(certificate) if certificate else None
        try:
            principal = self.authenticate(connect, peer)
        except Refused as exc:
            self._refuse(exc.code, str(exc), connect.client_id)
            return
        self.principal = principal
        upstream_connect = mqtt.Connect(
            f"{principal.namespace}", connect.clean_session, connect.keepalive_s
        )
        self._opening = asyncio.get_running_loop().create_task(
            self._open_upstream(mqtt.encode_connect(upstream_connect))
        )

    def _refuse(self, code: int, reason: str, client_id: str | None) -> None:
        self.log.warning(
            "devhub.connect_refused", client=(client_id or "")[:128], code=code, reason=reason
        )
        self.client.write(mqtt.encode_connack(False, code))
        self.close(None)

    async def _open_upstream(self, connect: bytes) -> None:
        """Connect to the broker and send the session's CONNECT; the CONNACK goes to the client.

        A burst of devices (a thousand reconnecting at once) can overflow the unix socket's
        backlog: a connection the broker never accepted is lost before its CONNACK, so openings
        are limited in number and retried.
        """
        loop = asyncio.get_running_loop()
        failure = "no attempt"
        async with self.door.opening:
            for attempt in range(UPSTREAM_ATTEMPTS):
                if self._closed:
                    return
                upstream = self._upstream = _Upstream(self)
                try:
                    async with asyncio.timeout(UPSTREAM_TIMEOUT_S):
                        path = self.door.config.broker_socket
                        await loop.create_unix_connection(functools.partial(_same, upstream), path)
                        upstream.write(connect)
                        connack = await upstream.connack
                except (OSError, TimeoutError) as exc:
                    upstream.close()
                    failure = str(exc) or type(exc).__name__
                    await asyncio.sleep(UPSTREAM_RETRY_S * (attempt + 1))
                    continue
                if not self._closed:
                    self._connack(connack)
                return
        if not self._closed:
            self.log.error("devhub.broker_unreachable", error=failure)
            self.client.write(mqtt.encode_connack(False, CONNACK_SERVER_UNAVAILABLE))
            self.close(None)

    # -- from the broker ---------------------------------------------------------------------

    def broker_packet(self, packet: mqtt.Packet) -> None:
        principal = self.principal
        assert principal is not None
        if packet.kind == mqtt.PUBLISH:
            topic = principal.outbound_topic(mqtt.publish_topic(packet.body))
            if topic is not None:
                self.client.write(mqtt.with_topic(packet.flags, packet.body, topic))
        elif packet.kind == mqtt.SUBACK:
            packet_id, codes = mqtt.parse_suback(packet.body)
            plan = self._subscribes.pop(packet_id, None)
            if plan is None:
                self.client.write(mqtt.encode_suback(packet_id, codes))
                return
            # The subscription exists from here on, not from the client's SUBSCRIBE.
            self.door.config.events.subscribed(principal, plan.granted(codes))
            self.client.write(mqtt.encode_suback(packet_id, plan.merge(codes)))
        else:
            self.client.write(packet.encode())

    def _connack(self, body: bytes) -> None:
        principal = self.principal
        assert principal is not None
        session_present, code = mqtt.parse_connack(body)
        self.client.write(mqtt.encode_connack(session_present, code))
        if code != 0:
            self.close(f"broker refused the session ({code})")
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if principal.expires_at is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(
                max(0.0, principal.expires_at - time.time()), self.close, "SAS expired"
            )
        self._open = True
        self.door._opened(self)
        self.door.config.events.session_opened(principal, session_present)
        self.log.info(
            "devhub.client_connected",
            kind=principal.kind,
            client=principal.name,
            transport=self.transport,
            session_present=session_present,
        )
        held, self._held = self._held, []
        for data in held:
            self._upstream_write(data)

    def _to_broker(self, data: bytes) -> None:
        if self._open:
            self._upstream_write(data)
        else:
            self._held.append(data)

    def _upstream_write(self, data: bytes) -> None:
        if self._upstream is not None:
            self._upstream.write(data)

    # -- both --------------------------------------------------------------------------------

    def close(self, reason: str | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._upstream is not None:
            self._upstream.close()
        self.client.close()
        principal = self.principal
        if principal is not None and self._open:
            self.door._closed(self)
            self.door.config.events.session_closed(principal)
            self.log.info(
                "devhub.client_disconnected",
                kind=principal.kind,
                client=principal.name,
                reason=reason or "client left",
            )
        elif reason is not None and principal is not None:
            self.log.info("devhub.client_closed", client=principal.name, reason=reason)

    def pause_broker(self) -> None:
        """The client reads slowly: stop reading from the broker until it catches up."""
        if self._upstream is not None:
            self._upstream.pause_reading()

    def resume_broker(self) -> None:
        if self._upstream is not None:
            self._upstream.resume_reading()

    def broker_lost(self) -> None:
        self.close("broker connection lost")

    def client_lost(self) -> None:
        self.close(None)


def _same(protocol: _Upstream) -> _Upstream:
    """A protocol factory that hands out one given protocol."""
    return protocol


class _Upstream(asyncio.Protocol):
    """The session's own connection to mosquitto (unix socket)."""

    def __init__(self, session: DoorSession) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._reader = mqtt.PacketReader(MAX_PACKET_BYTES)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            for packet in self._reader.feed(data):
                if self.connack.done():
                    self.session.broker_packet(packet)
                elif packet.kind == mqtt.CONNACK:
                    self.connack.set_result(packet.body)
                else:
                    self.session.close(f"broker sent packet type {packet.kind} before CONNACK")
                    return
        except mqtt.ProtocolError as exc:
            self.session.close(f"broker protocol error: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.connack.done():
            self.session.broker_lost()
        else:
            self.connack.set_exception(ConnectionResetError("broker closed before CONNACK"))

    def pause_writing(self) -> None:
        self.session.client.pause_reading()

    def resume_writing(self) -> None:
        self.session.client.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()


class _TlsClient(asyncio.Protocol):
    """A TCP client speaking TLS (memory BIOs, see tls_memory.py) with MQTT inside."""

    def __init__(
        self, door: FrontDoor, context: ssl.SSLContext, authenticate: Authenticate
    ) -> None:
        self.door = door
        self.authenticate = authenticate
        self.transport: asyncio.Transport | None = None
        self.tls = MemoryTls(context)
        self.session: DoorSession | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_BYTES)
        self.session = self.door.session(self, self.tls.peer_certificate, self.authenticate, "tls")

    def data_received(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        try:
            plaintext = self.tls.receive(data)
        except TlsClosed:
            self._flush()
            session.client_lost()
            return
        except ssl.SSLError as exc:
            self.door.config.log.info("devhub.tls_failed", reason=exc.reason or str(exc))
            self._flush()
            session.client_lost()
            return
        self._flush()
        if plaintext:
            session.client_data(plaintext)

    def _flush(self) -> None:
        pending = self.tls.outgoing()
        if pending and self.transport is not None:
            self.transport.write(pending)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.session is not None:
            self.session.client_lost()

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_broker()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_broker()

    # ClientLink
    def write(self, data: bytes) -> None:
        if self.transport is None:
            return
        self.tls.send(data)
        self._flush()

    def close(self) -> None:
        transport = self.transport
        if transport is None:
            return
        with contextlib.suppress(ssl.SSLError):
            closing = self.tls.close_notify() if self.tls.handshake_done else b""
            if closing:
                transport.write(closing)
        transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()
