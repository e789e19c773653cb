"""The relay's device-side WebSocket reader: picows's read buffer stays small at camera rate.

A real picows client (as the agent's) sends frames of one TLS record to the relay's server-side
protocol over loopback TLS, on aiofastnet with TLS on the socket as the relay's port runs it.
picows reports its read buffer's size in its debug log; that log, not the relay's own count, is
what the tests read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl

import aiofastnet
import picows
import pytest

from tunnel_agent.cloud.devhub.certs import LocalCA
from tunnel_agent.cloud.relay.front import (
    PICOWS_READ_BUFFER_BYTES,
    PICOWS_SPARE_BYTES,
    ServerWebSocket,
    WebSocketRoute,
    fill_limit,
    picows_server_protocol,
)
from tunnel_agent.cloud.relay.tunnels import DeviceEnd
from tunnel_agent.tunnel.pump import MAX_SEND_FRAME_BYTES

CAMERA_RATE_BUFFER_BYTES = 24 * 1024
_TOTAL = re.compile(r"total=(\d+)")


class Collector(picows.WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.received = bytearray()
        self.frames = 0

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.BINARY:
            self.received += frame.get_payload_as_bytes()
            self.frames += 1


class BufferSizes(logging.Handler):
    """picows's own report of its read buffer, from each ``get_buffer`` debug line."""

    def __init__(self) -> None:
        super().__init__(picows.PICOWS_DEBUG_LL)
        self.sizes: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = _TOTAL.search(record.getMessage())
        if record.getMessage().startswith("get_buffer") and match:
            self.sizes.append(int(match.group(1)))


async def carry(
    ca: LocalCA, frames: list[bytes], listener: picows.WSListener | None = None
) -> tuple[Collector, ServerWebSocket, list[int]]:
    """Serve one WebSocket with the relay's protocol, send ``frames`` to it, return what came
    (to ``listener`` if given, which must also collect into ``received``)."""
    logger = logging.getLogger("picows.relay")
    sizes = BufferSizes()
    logger.addHandler(sizes)
    old_level = logger.level
    logger.setLevel(picows.PICOWS_DEBUG_LL)
    collector = listener if listener is not None else Collector()
    protocols: list[ServerWebSocket] = []

    def factory() -> asyncio.Protocol:
        protocol = picows_server_protocol(WebSocketRoute(lambda _: collector, 4 << 20), 10.0)
        assert isinstance(protocol, ServerWebSocket)
        protocols.append(protocol)
        return protocol

    pair = ca.issue("relay-read-buffer", ["127.0.0.1"])
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pair.cert_file, pair.key_file)
    tls._aiofastnet_force_socket_bio = True  # type: ignore[attr-defined]
    client_tls = ssl.create_default_context(cafile=str(ca.cert_file))
    loop = asyncio.get_running_loop()
    server = await aiofastnet.create_server(loop, factory, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        transport, _ = await picows.ws_connect(
            picows.WSListener, f"wss://127.0.0.1:{port}/", ssl_context=client_tls
        )
        for frame in frames:
            transport.send(picows.WSMsgType.BINARY, frame)
        expected = sum(len(f) for f in frames)
        async with asyncio.timeout(15):
            while len(collector.received) < expected:
                await asyncio.sleep(0.01)
        transport.disconnect()
    finally:
        server.close()
        logger.removeHandler(sizes)
        logger.setLevel(old_level)
    return collector, protocols[0], sizes.sizes


async def test_a_camera_backlog_in_one_record_frames_leaves_the_buffer_at_20_kib(
    ca: LocalCA,
) -> None:
    """A 256 KiB backlog (sent at once) then paced frames: every byte arrives in order, and
    picows's buffer never passes the size whose threshold holds one record's frame."""
    payload = os.urandom(256 * 1024 + 20_000 * 10)
    frames = [
        payload[i : i + MAX_SEND_FRAME_BYTES] for i in range(0, len(payload), MAX_SEND_FRAME_BYTES)
    ]
    collector, protocol, sizes = await carry(ca, frames)
    assert bytes(collector.received) == payload
    assert sizes, "picows's debug log said nothing: is its logger still picows.relay?"
    assert max(sizes) == CAMERA_RATE_BUFFER_BYTES
    assert protocol.buffer_bytes == max(sizes)  # the relay's count follows picows's own
    assert fill_limit(CAMERA_RATE_BUFFER_BYTES) >= MAX_SEND_FRAME_BYTES + 8


async def test_an_idle_websocket_keeps_the_first_buffer(ca: LocalCA) -> None:
    collector, protocol, sizes = await carry(ca, [b"rtsp answer"])
    assert bytes(collector.received) == b"rtsp answer"
    assert max(sizes) == PICOWS_READ_BUFFER_BYTES - PICOWS_SPARE_BYTES
    assert protocol.buffer_bytes == max(sizes)


@pytest.mark.parametrize("frame_bytes", [64 * 1024, 256 * 1024, 1024 * 1024])
async def test_bulk_frames_grow_the_buffer_and_arrive_whole(ca: LocalCA, frame_bytes: int) -> None:
    payload = os.urandom(4 * frame_bytes)
    frames = [payload[i : i + frame_bytes] for i in range(0, len(payload), frame_bytes)]
    collector, protocol, sizes = await carry(ca, frames)
    assert bytes(collector.received) == payload
    assert collector.frames == 4
    assert protocol.buffer_bytes == max(sizes) >= frame_bytes


class CollectingDeviceEnd(DeviceEnd):
    def __init__(self) -> None:
        super().__init__("device")
        self.received = bytearray()
        self.writes: list[int] = []
        self.forward = self._collect

    def _collect(self, data: bytes) -> None:
        self.received += data
        self.writes.append(len(data))


async def test_a_camera_chunk_cut_into_records_leaves_the_device_end_as_one_write(
    ca: LocalCA,
) -> None:
    """The agent cuts a 20,000-byte camera read into a frame of one record and the rest; the
    relay's reads end inside the second frame, yet the consumer gets one write per chunk."""
    chunks = [os.urandom(20_000) for _ in range(20)]
    frames = []
    for chunk in chunks:
        frames += [chunk[:MAX_SEND_FRAME_BYTES], chunk[MAX_SEND_FRAME_BYTES:]]
    end = CollectingDeviceEnd()
    _, _, sizes = await carry(ca, frames, end)
    assert bytes(end.received) == b"".join(chunks)
    assert max(sizes) == CAMERA_RATE_BUFFER_BYTES
    assert len(end.writes) <= len(chunks), end.writes


async def test_a_lone_record_sized_frame_is_not_held_back(ca: LocalCA) -> None:
    """A frame of exactly one record with nothing behind it still leaves (in the same loop
    turn as its read, after the read cycle), not when some later frame comes."""
    payload = os.urandom(MAX_SEND_FRAME_BYTES)
    end = CollectingDeviceEnd()
    await carry(ca, [payload], end)
    assert bytes(end.received) == payload
    assert end.writes == [MAX_SEND_FRAME_BYTES]
