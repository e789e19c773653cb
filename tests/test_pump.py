"""The pump's rules, watched from inside: closing, errors, backpressure, keep-alive, limits."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from aiohttp import WSMsgType, web

from tests.support.inprocess import open_via, service_for
from tests.support.tcp_camera import TcpCamera
from tests.support.threadloop import ThreadLoop
from tests.support.waiting import until
from tests.support.ws_endpoint import Session, TunnelEndpoint, sink_handler
from tunnel_agent.cloud.devhub.certs import LocalCA
from tunnel_agent.tunnel.connect import READ_LIMIT_BYTES, BoundedReads
from tunnel_agent.tunnel.pump import MAX_SEND_FRAME_BYTES

CLOSE_BOUND_S = 2.5
# The README: a side's write buffer passing 256 KiB stops the other side's reading, so at most
# one read's worth waits beyond it; asyncio reads up to 256 KiB from a socket at a time.
HIGH_WATER_BYTES = 256 * 1024
ONE_READ_BYTES = 256 * 1024
WAITING_BOUND_BYTES = HIGH_WATER_BYTES + ONE_READ_BYTES
# Generous deadlines for events that are due well before them, on a loaded machine too.
EVENT_DEADLINE_S = 15.0


async def test_camera_eof_closes_the_websocket_with_1000_after_the_data(
    ca: LocalCA, endpoint: TunnelEndpoint, servers: ThreadLoop, stub: TcpCamera
) -> None:
    service = service_for(ca, stub.port)
    session = await servers.call(endpoint.new_session(handler=sink_handler))
    tunnel = await open_via(service, endpoint, session, stub.port)
    await until(lambda: stub.connections)
    payload = b"x" * 1_000_000

    stub.connections[0].writer.write(payload)
    stub.connections[0].writer.close()

    await asyncio.wait_for(asyncio.shield(tunnel.closed), CLOSE_BOUND_S)
    await servers.call(asyncio.wait_for(session.finished.wait(), CLOSE_BOUND_S))
    assert session.close_code == 1000
    assert session.counters.to_consumer == tunnel.bytes_to_remote == len(payload)
    assert tunnel.close_reason == "camera closed"


async def test_websocket_close_closes_the_camera_socket_after_the_data(
    ca: LocalCA, endpoint: TunnelEndpoint, servers: ThreadLoop, stub: TcpCamera
) -> None:
    async def send_then_close(ws: web.WebSocketResponse, session: Session) -> None:
        for _ in range(10):
            await ws.send_bytes(b"y" * 100_000)
        await ws.close(code=1000)

    service = service_for(ca, stub.port)
    session = await servers.call(endpoint.new_session(handler=send_then_close))
    tunnel = await open_via(service, endpoint, session, stub.port)

    await asyncio.wait_for(asyncio.shield(tunnel.closed), CLOSE_BOUND_S)
    await asyncio.wait_for(stub.connections[0].closed.wait(), CLOSE_BOUND_S)
    assert len(stub.connections[0].received) == 1_000_000
    assert tunnel.close_reason == "remote closed (1000)"


async def test_websocket_dropped_closes_the_camera_within_the_bound(
    ca: LocalCA, endpoint: TunnelEndpoint, servers: ThreadLoop, stub: TcpCamera
) -> None:
    async def drop(ws: web.WebSocketResponse, session: Session) -> None:
        assert session.request is not None and session.request.transport is not None
        session.request.transport.abort()

    service = service_for(ca, stub.port)
    session = await servers.call(endpoint.new_session(handler=drop))
    tunnel = await open_via(service, endpoint, session, stub.port)

    await asyncio.wait_for(asyncio.shield(tunnel.closed), CLOSE_BOUND_S)
    await asyncio.wait_for(stub.connections[0].closed.wait(), CLOSE_BOUND_S)
    assert tunnel.close_reason == "remote connection lost"


async def test_camera_reset_closes_the_websocket_within_the_bound(
    ca: LocalCA, endpoint: TunnelEndpoint, servers: ThreadLoop, stub: TcpCamera
) -> None:
    service = service_for(ca, stub.port)
    session = await servers.call(endpoint.new_session(handler=sink_handler))
    tunnel = await open_via(service, endpoint, session, stub.port)
    await until(lambda: stub.connections)
    sock = stub.connections[0].writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    stub.connections[0].writer.transport.abort()  # RST

    await asyncio.wait_for(asyncio.shield(tunnel.closed), CLOSE_BOUND_S)
    await servers.call(asyncio.wait_for(session.finished.wait(), CLOSE_BOUND_S))
    assert tunnel.close_reason is not None and tunnel.close_reason.startswith("camera")


async def test_backpressure_bounds_what_waits_in_the_agent(
    ca: LocalCA, endpoint: TunnelEndpoint, servers: ThreadLoop, stub: TcpCamera
) -> None:
    gate = asyncio.Event()  # set from the test loop, waited on the server loop
    server_loop = servers.loop

    async def slow_reader(ws: web.WebSocketResponse, session: Session) -> None:
        while not gate.is_set():
            await asyncio.sleep(0.02)
        await sink_handler(ws, session)

    service = service_for(ca, stub.port)
    session = await servers.call(endpoint.new_session(handler=slow_reader))
    tunnel = await open_via(service, endpoint, session, stub.port)
    await until(lambda: stub.connections)
    writer = stub.connections[0].writer
    total = 64 * 1024 * 1024
    chunk = b"z" * (1024 * 1024)

    async def push() -> None:
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    pusher = asyncio.create_task(push())
    # The far end reads nothing: the WebSocket's buffer fills and the camera is no longer read.
    assert tunnel.ws is not None
    ws_transport = tunnel.ws.underlying_transport
    camera_transport = tunnel.camera.transport
    assert camera_transport is not None
    await until(
        lambda: (
            ws_transport.get_write_buffer_size() >= HIGH_WATER_BYTES
            and not camera_transport.is_reading()
        ),
        EVENT_DEADLINE_S,
    )
    assert ws_transport.get_write_buffer_size() <= WAITING_BOUND_BYTES
    assert tunnel.bytes_to_remote < total // 4  # the camera was stopped, not drained into memory
    assert not pusher.done()

    server_loop.call_soon_threadsafe(gate.set)
    await asyncio.wait_for(pusher, 30)
    await asyncio.wait_for(asyncio.shield(tunnel.closed), 30)
    await servers.call(asyncio.wait_for(session.finished.wait(), 10))
    assert session.counters.to_consumer == total


async def test_backpressure_bounds_what_waits_for_a_camera_that_does_not_read(
    ca: LocalCA, endpoint: TunnelEndpoint, servers: ThreadLoop
) -> None:
    total = 64 * 1024 * 1024
    sent = asyncio.Event()  # set on the server loop, awaited through it

    async def flood(ws: web.WebSocketResponse, session: Session) -> None:
        chunk = b"w" * (64 * 1024)
        for _ in range(total // len(chunk)):
            await ws.send_bytes(chunk)  # waits while the agent does not read
        sent.set()
        async for _ in ws:
            pass

    camera = TcpCamera(hold_reading=True)
    await camera.start()
    try:
        service = service_for(ca, camera.port)
        session = await servers.call(endpoint.new_session(handler=flood))
        tunnel = await open_via(service, endpoint, session, camera.port)
        camera_transport = tunnel.camera.transport
        assert camera_transport is not None and tunnel.ws is not None
        ws_transport = tunnel.ws.underlying_transport
        await until(
            lambda: (
                camera_transport.get_write_buffer_size() >= HIGH_WATER_BYTES
                and not ws_transport.is_reading()
            ),
            EVENT_DEADLINE_S,
        )
        assert camera_transport.get_write_buffer_size() <= WAITING_BOUND_BYTES
        assert tunnel.bytes_to_camera < total // 4
        assert not sent.is_set()

        camera.connections[0].reading.set()
        await servers.call(asyncio.wait_for(sent.wait(), 60))
        await until(lambda: len(camera.connections[0].received) == total, 60)
        tunnel.close("test over")
        await asyncio.wait_for(asyncio.shield(tunnel.closed), CLOSE_BOUND_S)
    finally:
        await camera.stop()


async def test_keepalive_closes_a_dead_link(
    ca: LocalCA, endpoint: TunnelEndpoint, servers: ThreadLoop, stub: TcpCamera
) -> None:
    async def play_dead(ws: web.WebSocketResponse, session: Session) -> None:
        assert session.request is not None and session.request.transport is not None
        session.request.transport.pause_reading()
        with contextlib.suppress(TimeoutError):  # until the agent drops it, or the test is over
            await asyncio.wait_for(ws.receive(), EVENT_DEADLINE_S)

    service = service_for(ca, stub.port, ping_interval=1, ping_timeout=1)
    session = await servers.call(endpoint.new_session(handler=play_dead))
    tunnel = await open_via(service, endpoint, session, stub.port)

    await asyncio.wait_for(asyncio.shield(tunnel.closed), EVENT_DEADLINE_S)
    assert tunnel.close_reason == "keepalive timeout"
    await asyncio.wait_for(stub.connections[0].closed.wait(), CLOSE_BOUND_S)


async def pong_by_hand(ws: web.WebSocketResponse, session: Session) -> None:
    """Count the agent's pings and answer them (the session has autoping off)."""
    async for message in ws:
        if message.type == WSMsgType.PING:
            session.pings += 1
            await ws.pong(message.data)


async def test_keepalive_spares_an_idle_link_that_answers_pings(
    ca: LocalCA, endpoint: TunnelEndpoint, servers: ThreadLoop, stub: TcpCamera
) -> None:
    service = service_for(ca, stub.port, ping_interval=1, ping_timeout=1.5)
    session = await servers.call(endpoint.new_session(handler=pong_by_hand, autoping=False))
    tunnel = await open_via(service, endpoint, session, stub.port)

    # Four pings answered: without the pongs, the link would have been dropped after 1.5 s.
    await until(lambda: session.pings >= 4, EVENT_DEADLINE_S)

    assert tunnel.close_reason is None
    tunnel.close("test over")
    await asyncio.wait_for(asyncio.shield(tunnel.closed), CLOSE_BOUND_S)


async def test_keepalive_spares_a_busy_link_whose_pongs_wait_behind_data(
    ca: LocalCA, endpoint: TunnelEndpoint, servers: ThreadLoop, stub: TcpCamera
) -> None:
    async def slow_sink(ws: web.WebSocketResponse, session: Session) -> None:
        unpaced = 0
        async for message in ws:  # pings are only answered when the reader gets to them
            if message.type == WSMsgType.PING:
                session.pings += 1
                await ws.pong(message.data)
            elif isinstance(message.data, bytes):  # 256 KiB per 50 ms, whatever the frames' size
                session.counters.to_consumer += len(message.data)
                unpaced += len(message.data)
                if unpaced >= 262144:
                    unpaced -= 262144
                    await asyncio.sleep(0.05)

    service = service_for(ca, stub.port, ping_interval=1, ping_timeout=1)
    session = await servers.call(endpoint.new_session(handler=slow_sink, autoping=False))
    tunnel = await open_via(service, endpoint, session, stub.port)
    await until(lambda: stub.connections)
    writer = stub.connections[0].writer

    async def push() -> None:
        while True:
            writer.write(b"b" * 65536)
            await writer.drain()

    pusher = asyncio.create_task(push())
    try:
        # Four pings reached the slow reader behind the data: well past the 1 s ping timeout.
        await until(lambda: session.pings >= 4, EVENT_DEADLINE_S)
        assert tunnel.close_reason is None
        assert session.counters.to_consumer > 1_000_000
    finally:
        pusher.cancel()
        tunnel.close("test over")
        await asyncio.wait_for(asyncio.shield(tunnel.closed), CLOSE_BOUND_S)


async def test_idle_timeout_and_max_lifetime(
    ca: LocalCA, endpoint: TunnelEndpoint, servers: ThreadLoop, stub: TcpCamera
) -> None:
    idle_service = service_for(ca, stub.port, idle_timeout=0.5)
    idle_session = await servers.call(endpoint.new_session(handler=sink_handler))
    idle = await open_via(idle_service, endpoint, idle_session, stub.port)
    await asyncio.wait_for(asyncio.shield(idle.closed), EVENT_DEADLINE_S)
    assert idle.close_reason == "idle timeout"

    # The close reason is only given once the lifetime has passed: no earlier close is possible.
    life_service = service_for(ca, stub.port, max_lifetime=1.0)
    life_session = await servers.call(endpoint.new_session(handler=sink_handler))
    life = await open_via(life_service, endpoint, life_session, stub.port)
    await asyncio.wait_for(asyncio.shield(life.closed), EVENT_DEADLINE_S)
    assert life.close_reason == "max lifetime reached"
    await servers.call(asyncio.wait_for(life_session.finished.wait(), CLOSE_BOUND_S))
    assert life_session.close_code == 1001


async def test_a_close_right_after_the_handshake_closes_everything(
    ca: LocalCA, endpoint: TunnelEndpoint, servers: ThreadLoop, stub: TcpCamera
) -> None:
    """The CLOSE can arrive in the same read as the upgrade answer, before the tunnel starts."""

    async def close_at_once(ws: web.WebSocketResponse, session: Session) -> None:
        await ws.close(code=1000)

    service = service_for(ca, stub.port)
    tunnels = []
    for _ in range(10):
        session = await servers.call(endpoint.new_session(handler=close_at_once))
        tunnels.append(await open_via(service, endpoint, session, stub.port))

    for tunnel in tunnels:
        await asyncio.wait_for(asyncio.shield(tunnel.closed), CLOSE_BOUND_S)
        assert tunnel.ws is not None and tunnel.ws.is_disconnected
    assert service.registry.open_tunnels == []
    assert await stub.all_closed(CLOSE_BOUND_S)


async def test_the_agent_runs_tls_on_the_socket_and_bounds_each_read(
    ca: LocalCA, endpoint: TunnelEndpoint, servers: ThreadLoop, stub: TcpCamera
) -> None:
    """No memory BIOs in front of a wss tunnel (its memory), and picows is handed bounded reads
    (the backpressure tests above hold on the socket BIO because of it)."""
    service = service_for(ca, stub.port)
    session = await servers.call(endpoint.new_session(handler=sink_handler))
    tunnel = await open_via(service, endpoint, session, stub.port)
    assert tunnel.ws is not None
    ws_transport = tunnel.ws.underlying_transport
    assert ws_transport.get_extra_info("ssl_incoming_use_membio") is False
    assert ws_transport.get_extra_info("ssl_outgoing_use_membio") is False
    assert ws_transport.get_extra_info("cipher") is not None
    reads = ws_transport.get_protocol()
    assert isinstance(reads, BoundedReads)
    assert len(reads.get_buffer(-1)) <= READ_LIMIT_BYTES
    tunnel.close("test over")
    await asyncio.wait_for(asyncio.shield(tunnel.closed), CLOSE_BOUND_S)


async def test_a_camera_backlog_leaves_in_frames_of_one_tls_record_at_most(
    ca: LocalCA, endpoint: TunnelEndpoint, servers: ThreadLoop, stub: TcpCamera
) -> None:
    """A camera's backlog (here 128 KiB, read in one go or a few) leaves as frames of one TLS
    record at most: the cloud's WebSocket reader keeps a buffer the size of the largest frame it
    ever held."""
    sizes: list[int] = []

    async def sizes_handler(ws: web.WebSocketResponse, session: Session) -> None:
        async for message in ws:
            if isinstance(message.data, bytes):
                sizes.append(len(message.data))
                session.counters.to_consumer += len(message.data)

    service = service_for(ca, stub.port)
    session = await servers.call(endpoint.new_session(handler=sizes_handler))
    tunnel = await open_via(service, endpoint, session, stub.port)
    await until(lambda: stub.connections)
    payload = b"b" * (128 * 1024)

    stub.connections[0].writer.write(payload)
    stub.connections[0].writer.close()

    await asyncio.wait_for(asyncio.shield(tunnel.closed), EVENT_DEADLINE_S)
    await servers.call(asyncio.wait_for(session.finished.wait(), EVENT_DEADLINE_S))
    assert session.counters.to_consumer == len(payload)
    assert max(sizes) <= MAX_SEND_FRAME_BYTES
    assert len(sizes) >= len(payload) // MAX_SEND_FRAME_BYTES
