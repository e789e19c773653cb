"""MQTT over WebSockets, as IoT Hub serves it on port 443 at ``/$iothub/websocket``.

The SDKs' ``websockets=True`` speaks MQTT inside binary WebSocket messages (subprotocol ``mqtt``),
which need not line up with MQTT packets: each message's bytes feed the same front-door session
as a TLS connection's bytes do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from aiohttp import WSMsgType, web

from tunnel_agent.cloud.devhub.front_door import Authenticate, FrontDoor

SEND_QUEUE_PACKETS = 1000


class _WebSocketClient:
    """ClientLink over an aiohttp WebSocket: writes are queued and sent in order."""

    def __init__(self, socket: web.WebSocketResponse) -> None:
        self.socket = socket
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(SEND_QUEUE_PACKETS)
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)

    def pause_reading(self) -> None:
        """Reading is paced by the handler loop; a full queue closes the client instead."""

    def resume_reading(self) -> None:
        """See pause_reading."""

    async def send_all(self) -> None:
        while (data := await self.queue.get()) is not None:
            await self.socket.send_bytes(data)
        await self.socket.close()


def websocket_app(door: FrontDoor, path: str, authenticate: Authenticate) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        socket = web.WebSocketResponse(protocols=("mqtt",), max_msg_size=1024 * 1024)
        await socket.prepare(request)
        client = _WebSocketClient(socket)
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None

        def peer() -> bytes | None:
            if isinstance(ssl_object, ssl.SSLObject):
                return ssl_object.getpeercert(binary_form=True)
            return None

        session = door.session(client, peer, authenticate, "websocket")
        sender = asyncio.get_running_loop().create_task(client.send_all())
        try:
            async for message in socket:
                if message.type == WSMsgType.BINARY:
                    session.client_data(message.data)
                elif message.type in (WSMsgType.TEXT, WSMsgType.ERROR):
                    break
                if client.closed:
                    break
        finally:
            session.client_lost()
            client.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sender, 5)
        return socket

    app = web.Application()
    app.router.add_get(path, handle)
    return app
