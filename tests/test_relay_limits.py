"""The relay's limits against abuse, each refusal counted and logged once.

Each test starts a relay of its own with the limit it checks set low, against the module's devhub,
agent and fake device. Sources are distinct loopback addresses (127.0.0.x) so that one test's
"attacker" and "user" are different sources, as on the internet.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import psutil
import pytest

from tests.support.camera import RtspCamera
from tests.support.net import free_port
from tests.support.relay_bed import (
    AGENT_DEVICE,
    FAKE_DEVICE,
    RelayBed,
    call_api,
    create_session,
    start_bed,
    wait_closed,
)
from tests.support.threadloop import ThreadLoop
from tests.support.waiting import until
from tests.test_tunnel_video import decode_frames
from tunnel_agent.cloud.relay.front import fill_limit
from tunnel_agent.cloud.relay.hub_service import KEPT_CONNECTIONS
from tunnel_agent.cloud.relay.runner import RunningRelay

OPTIONS = b"OPTIONS rtsp://camera/test RTSP/1.0\r\nCSeq: 1\r\n\r\n"
StartRelay = Callable[..., RunningRelay]


@pytest.fixture(scope="module")
def bed(
    tmp_path_factory: pytest.TempPathFactory, servers: ThreadLoop, camera: RtspCamera
) -> Iterator[RelayBed]:
    bed = start_bed(tmp_path_factory.mktemp("limits"), servers, {"plain": camera})
    yield bed
    bed.close()


@pytest.fixture
def start(bed: RelayBed) -> Iterator[StartRelay]:
    """Start relays for this test only; each is stopped at its end."""
    started: list[RunningRelay] = []

    def start_relay(**settings: Any) -> RunningRelay:
        relay = bed.start_relay(**settings)
        started.append(relay)
        return relay

    yield start_relay
    for relay in started:
        bed.stop_relay(relay)


def route(bed: RelayBed, device: str = AGENT_DEVICE, **extra: Any) -> dict[str, Any]:
    port = bed.camera_port() if device == AGENT_DEVICE else 554
    return {"listen": f"127.0.0.1:{free_port()}", "device_id": device, "local_port": port, **extra}


def route_port(relay: RunningRelay, index: int = 0) -> int:
    return list(relay.relay.routes.values())[index].port


async def open_rtsp(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, Any]:
    """A consumer that asked the camera for OPTIONS and got its answer: its tunnel is open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(OPTIONS)
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    assert answer.startswith(b"RTSP/1.0 200 OK"), answer
    return reader, writer


async def refused_at_once(port: int, source: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    assert await wait_closed(reader, 5) == b""
    writer.close()


def refusal_lines(bed: RelayBed, reason: str, source: str) -> list[str]:
    return [
        line
        for line in bed.records.events("relay.refused")
        if f"'reason': '{reason}'" in line and f"'source': '{source}'" in line
    ]


async def test_a_route_admits_only_its_allowed_sources(bed: RelayBed, start: StartRelay) -> None:
    relay = start(routes=[route(bed, allowed_sources=["127.0.0.1/32"])])
    port = route_port(relay)
    calls = bed.device_calls()

    for _ in range(5):
        await refused_at_once(port, "127.0.0.4")

    assert relay.relay.refusals.counts["source not allowed"] == 5
    assert len(refusal_lines(bed, "source not allowed", "127.0.0.4")) == 1  # logged once
    _, writer = await open_rtsp(port)
    writer.close()
    await until(lambda: bed.device_calls() == calls + 1, timeout_s=10)  # the allowed one only


async def test_an_idle_consumer_is_closed_and_a_busy_one_is_not(
    bed: RelayBed, start: StartRelay
) -> None:
    relay = start(routes=[route(bed)], consumer_idle_timeout=1.5)
    port = route_port(relay)

    sizes = await asyncio.to_thread(decode_frames, f"rtsp://127.0.0.1:{port}/test", 45)  # 3 s
    assert sizes == [(640, 360)] * 45

    reader, writer = await open_rtsp(port)
    started = time.monotonic()
    await wait_closed(reader, 10)
    writer.close()
    assert 1.4 <= time.monotonic() - started < 6
    await until(lambda: any(r.reason == "idle timeout" for r in relay.relay.history))


async def test_open_connections_per_source_are_capped(bed: RelayBed, start: StartRelay) -> None:
    relay = start(routes=[route(bed)], max_connections_per_source=2)
    port = route_port(relay)
    first = await open_rtsp(port, "127.0.0.10")
    second = await open_rtsp(port, "127.0.0.10")

    await refused_at_once(port, "127.0.0.10")

    assert relay.relay.refusals.counts["too many connections from this source"] == 1
    other = await open_rtsp(port, "127.0.0.11")  # another source has its own allowance
    first[1].close()
    await until(lambda: relay.relay.connection_limits.open.get("127.0.0.10") == 1)
    again = await open_rtsp(port, "127.0.0.10")
    for _, writer in (second, other, again):
        writer.close()


async def test_new_connections_are_rate_limited_per_source(
    bed: RelayBed, start: StartRelay
) -> None:
    relay = start(routes=[route(bed)], new_connections_burst=3, new_connections_per_second=0.05)
    port = route_port(relay)
    calls = bed.device_calls()
    for _ in range(3):
        _, writer = await open_rtsp(port, "127.0.0.12")
        writer.close()

    await refused_at_once(port, "127.0.0.12")

    assert relay.relay.refusals.counts["new connections too fast"] == 1
    _, writer = await open_rtsp(port, "127.0.0.13")
    writer.close()
    await until(lambda: bed.device_calls() == calls + 4, timeout_s=10)


async def act_as_device(relay_tls: Any, payload: dict[str, Any]) -> Any:
    """Connect the way the agent would, with the token the fake device was given."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=relay_tls))
    headers = {
        "Authorization": f"Bearer {payload['remoteAuthorizationToken']}",
        "TunnelConnectionSource": "PnpDevice",
    }
    ws = await session.ws_connect(payload["remoteEndpoint"], headers=headers, max_msg_size=0)
    return session, ws


async def test_an_oversize_device_message_closes_only_its_tunnel(
    bed: RelayBed, start: StartRelay
) -> None:
    relay = start(
        routes=[route(bed), route(bed, FAKE_DEVICE, protocol="tcp")], max_message_bytes=65536
    )
    camera_reader, camera_writer = await open_rtsp(route_port(relay, 0))
    reader, writer = await asyncio.open_connection("127.0.0.1", route_port(relay, 1))
    call = await bed.servers.call(bed.fake.next_call())
    http, ws = await act_as_device(bed.tls(), call.payload)
    try:
        await bed.servers.call(bed.fake.answer(call, 200, {"tunnelId": "fake"}))
        await ws.send_bytes(b"fits" * 1000)
        assert await asyncio.wait_for(reader.readexactly(4000), 10) == b"fits" * 1000

        await ws.send_bytes(b"x" * 70_000)

        message = await asyncio.wait_for(ws.receive(), 10)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code in (1009, 1006)  # 1009 sent, then the connection is cut at once
        assert await wait_closed(reader, 5) == b""  # not one byte of the oversize frame
        await until(
            lambda: any(
                r.reason and "broke the WebSocket protocol" in r.reason for r in relay.relay.history
            )
        )
    finally:
        await ws.close()
        await http.close()
        writer.close()
    camera_writer.write(OPTIONS.replace(b"CSeq: 1", b"CSeq: 2"))  # the other tunnel goes on
    answer = await asyncio.wait_for(camera_reader.readuntil(b"\r\n\r\n"), 10)
    assert answer.startswith(b"RTSP/1.0 200 OK") and b"CSeq: 2" in answer
    camera_writer.close()


async def test_a_slowloris_client_does_not_stop_new_consumers(
    bed: RelayBed, start: StartRelay
) -> None:
    relay = start(header_timeout=2.0, max_handshakes_per_source=8, max_connections=64)
    slow: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(30):  # TCP only: never a complete TLS handshake, let alone a request
        slow.append(
            await asyncio.open_connection("127.0.0.1", relay.port, local_addr=("127.0.0.14", 0))
        )
        slow[-1][1].write(b"\x16\x03\x01")
    started = time.monotonic()

    session = await create_session(bed, relay)  # a user from another source, meanwhile
    connector = aiohttp.TCPConnector(ssl=bed.tls())
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.ws_connect(
            session["connectUrl"], headers={"Authorization": f"Bearer {session['token']}"}
        ) as ws,
    ):
        await ws.send_bytes(OPTIONS)
        answer = await asyncio.wait_for(ws.receive(), 15)
        assert answer.data.startswith(b"RTSP/1.0 200 OK")
    assert time.monotonic() - started < 5

    for reader, writer in slow:
        await wait_closed(reader, 10)
        writer.close()
    assert time.monotonic() - started < 2.0 + 5
    counts = relay.relay.refusals.counts
    assert counts["too many handshakes from this source"] == 22
    assert counts["request head not received in time"] == 8


async def closed_but_watched() -> list[int]:
    """Descriptors the running loop's selector still watches although they are closed."""
    watched = asyncio.get_running_loop()._selector.get_map()  # type: ignore[attr-defined]
    closed = []
    for fd in list(watched):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
    return closed


async def test_connections_refused_at_the_door_leave_the_relay_able_to_accept(
    bed: RelayBed, start: StartRelay
) -> None:
    # A connection refused as it is accepted is closed before its transport has registered its
    # reader; a stale registration would break the next connection that gets the same
    # descriptor number, on the relay's own loop (the devhub and other relays share it here).
    relay = start(max_handshakes_per_source=1, header_timeout=10.0)
    source = "127.0.0.17"
    holder = await asyncio.open_connection("127.0.0.1", relay.port, local_addr=(source, 0))
    counts = relay.relay.refusals.counts
    for refused in range(1, 6):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", relay.port, local_addr=(source, 0)
        )
        await wait_closed(reader, 10)
        writer.close()
        assert counts["too many handshakes from this source"] == refused

    assert await bed.servers.call(closed_but_watched()) == []
    for _ in range(10):  # each a new connection from another source, one after the other
        status, listed = await call_api(bed, relay, "GET", "/v1/sessions")
        assert status == 200, listed
    holder[1].close()


async def test_wrong_api_keys_are_rate_limited_per_source(bed: RelayBed, start: StartRelay) -> None:
    relay = start()
    body = {"deviceId": AGENT_DEVICE, "localPort": bed.camera_port()}
    for _ in range(10):
        status, _ = await call_api(
            bed, relay, "POST", "/v1/sessions", body=body, token="wrong" * 4, source="127.0.0.15"
        )
        assert status == 401

    status, _ = await call_api(bed, relay, "POST", "/v1/sessions", body=body, source="127.0.0.15")

    assert status == 429  # even the right key, from there, for now
    assert len(refusal_lines(bed, "wrong API key", "127.0.0.15")) == 1
    status, _ = await call_api(bed, relay, "POST", "/v1/sessions", body=body, source="127.0.0.16")
    assert status == 201


async def test_max_sessions(bed: RelayBed, start: StartRelay) -> None:
    relay = start(max_sessions=2)
    await create_session(bed, relay)
    await create_session(bed, relay)
    body = {"deviceId": AGENT_DEVICE, "localPort": bed.camera_port()}

    status, answer = await call_api(bed, relay, "POST", "/v1/sessions", body=body)

    assert (status, answer["error"]) == (429, "at most 2 sessions")


async def test_max_tunnels_and_max_tunnels_per_device(bed: RelayBed, start: StartRelay) -> None:
    relay = start(
        routes=[route(bed, FAKE_DEVICE), route(bed)], max_tunnels=2, max_tunnels_per_device=1
    )
    fake_port, agent_port = route_port(relay, 0), route_port(relay, 1)
    _, first = await asyncio.open_connection("127.0.0.1", fake_port)
    pending = await bed.servers.call(bed.fake.next_call())  # held: the tunnel stays open(ing)
    seen = len(bed.fake.seen)

    await refused_at_once(fake_port, "127.0.0.1")  # the fake device has its one tunnel
    _, second = await open_rtsp(agent_port)  # the agent's device has room: two in all now
    await refused_at_once(agent_port, "127.0.0.1")  # the relay is full

    counts = relay.relay.refusals.counts
    assert counts["device tunnel limit reached"] == 1 and counts["tunnel limit reached"] == 1
    assert len(bed.fake.seen) == seen  # the refused one never became a call
    await bed.servers.call(bed.fake.answer(pending, 400, {"message": "no"}))
    first.close()
    second.close()


async def test_a_device_that_answers_but_never_connects(bed: RelayBed, start: StartRelay) -> None:
    relay = start(routes=[route(bed, FAKE_DEVICE)], device_connect_timeout=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", route_port(relay))
    call = await bed.servers.call(bed.fake.next_call())
    await bed.servers.call(bed.fake.answer(call, 200, {"tunnelId": "never"}))
    answered = time.monotonic()

    assert await wait_closed(reader, 10) == b""

    writer.close()
    assert 0.9 <= time.monotonic() - answered < 5
    assert bed.records.events("relay.tunnel_failed")
    assert any(
        "device answered 200 but never connected" in line
        for line in bed.records.events("relay.tunnel_failed")
    )


async def test_a_burst_of_tunnel_opens_leaves_only_the_kept_hub_connections(
    bed: RelayBed, start: StartRelay
) -> None:
    """Calls beyond the kept connections do not wait for one (a slow device must not hold up
    the others): they go out on connections of their own, which close with their answers."""
    burst = KEPT_CONNECTIONS + 4
    relay = start(routes=[route(bed, FAKE_DEVICE)])
    hub_port = int(bed.devhub.hub_name.rsplit(":", 1)[1])

    def hub_connections() -> int:
        connections = psutil.Process().net_connections("tcp")
        return sum(1 for c in connections if c.raddr and c.raddr.port == hub_port)

    writers = []
    for _ in range(burst):
        _, writer = await asyncio.open_connection("127.0.0.1", route_port(relay))
        writers.append(writer)
    calls = [await bed.servers.call(bed.fake.next_call()) for _ in range(burst)]
    assert hub_connections() >= burst  # every call in flight at once, none queued
    for call in calls:
        await bed.servers.call(bed.fake.answer(call, 404, {"message": "no camera here"}))
    await until(lambda: relay.relay.tunnels == {}, 10)
    await until(lambda: hub_connections() <= KEPT_CONNECTIONS, 10)
    for writer in writers:
        writer.close()


async def test_a_closed_tunnel_is_freed_at_once_not_by_the_cycle_collector(
    bed: RelayBed, start: StartRelay
) -> None:
    """A closed tunnel holds its TLS transport and picows buffers: kept in reference cycles, 50
    closed tunnels held ~24 MB until a full GC pass. With the collector off, reference counting
    alone must free the tunnel, its ends, the device's WebSocket and its TLS transport."""
    relay = start(routes=[route(bed)])
    gc.collect()
    gc.disable()
    try:
        _, writer = await open_rtsp(route_port(relay))
        (tunnel,) = relay.relay.tunnels.values()
        ws = tunnel.device.ws
        assert ws is not None
        kept = [tunnel, tunnel.device, tunnel.consumer, ws, ws.underlying_transport]
        refs = [weakref.ref(thing) for thing in kept]
        del tunnel, ws, kept
        writer.close()
        await until(lambda: len(relay.relay.history) == 1, timeout_s=10)
        await until(lambda: all(ref() is None for ref in refs), timeout_s=5)
    finally:
        gc.enable()


async def test_the_device_side_runs_tls_on_the_socket_and_bounds_each_read(
    bed: RelayBed, start: StartRelay
) -> None:
    """A device's WebSocket has no memory BIOs in front of it, and picows is handed bounded
    reads that keep its read buffer under its growth threshold (tests/test_relay_read_buffer.py)."""
    relay = start(routes=[route(bed)])
    _, writer = await open_rtsp(route_port(relay))

    async def device_transport() -> tuple[object, object, object, int, int]:
        (tunnel,) = relay.relay.tunnels.values()  # read on the relay's own loop
        ws = tunnel.device.ws
        assert ws is not None
        transport = ws.underlying_transport
        return (
            transport.get_extra_info("ssl_incoming_use_membio"),
            transport.get_extra_info("ssl_outgoing_use_membio"),
            transport.get_extra_info("cipher"),
            len(transport.get_protocol().get_buffer(-1)),
            transport.get_protocol().buffer_bytes,
        )

    incoming_membio, outgoing_membio, cipher, read_bytes, buffer_bytes = await bed.servers.call(
        device_transport()
    )
    assert incoming_membio is False and outgoing_membio is False
    assert cipher is not None
    assert 0 < read_bytes <= fill_limit(buffer_bytes)
    writer.close()
    await until(lambda: len(relay.relay.history) == 1, timeout_s=10)
