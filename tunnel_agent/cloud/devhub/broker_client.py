"""The hub's own MQTT session on its mosquitto, over the private unix socket.

The service side (direct methods, twins, DPS) is one subscriber for every device: it sees each
device's topics under ``d/<device id>/`` (see access.py). A small client on the project's own codec,
since the broker is reached on a unix socket, which the MQTT libraries at hand do not speak.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Sequence

from tunnel_agent.cloud.devhub import mqtt_codec as mqtt

RECONNECT_S = 0.5
KEEPALIVE_S = 30
ACK_TIMEOUT_S = 10.0

MessageHandler = Callable[[str, bytes], None]


class BrokerUnavailable(Exception):
    """The hub's session on the broker is down (mosquitto restarting or stopped)."""


class BrokerClient:
    def __init__(
        self,
        socket_path: str,
        client_id: str,
        subscriptions: Sequence[tuple[str, int]],
        on_message: MessageHandler,
    ) -> None:
        self.socket_path = socket_path
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.on_message = on_message
        self.ready = asyncio.Event()
        self._transport: asyncio.Transport | None = None
        self._ids = itertools.cycle(range(1, 65536))
        self._acks: dict[int, asyncio.Future[bytes]] = {}
        self._lost: asyncio.Future[None] | None = None

    async def wait_ready(self, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            await self.ready.wait()

    async def run(self) -> None:
        """Keeps a session up, reconnecting whenever the broker goes away."""
        while True:
            with contextlib.suppress(OSError, TimeoutError, mqtt.ProtocolError):
                await self._session()
            self.ready.clear()
            await asyncio.sleep(RECONNECT_S)

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        self._lost = loop.create_future()
        protocol = _Protocol(self)
        transport, _ = await loop.create_unix_connection(lambda: protocol, self.socket_path)
        self._transport = transport
        try:
            connack = self._expect(0)
            transport.write(mqtt.encode_connect(mqtt.Connect(self.client_id, True, KEEPALIVE_S)))
            async with asyncio.timeout(ACK_TIMEOUT_S):
                _, code = mqtt.parse_connack(await connack)
            if code != 0:
                raise mqtt.ProtocolError(f"broker refused the hub's session ({code})")
            packet_id = next(self._ids)
            suback = self._expect(packet_id)
            transport.write(mqtt.encode_subscribe(packet_id, self.subscriptions))
            async with asyncio.timeout(ACK_TIMEOUT_S):
                await suback
            self.ready.set()
            while True:
                try:
                    async with asyncio.timeout(KEEPALIVE_S / 2):
                        await asyncio.shield(self._lost)
                    return
                except TimeoutError:
                    transport.write(mqtt.PINGREQ_BYTES)
        finally:
            self.ready.clear()
            self._transport = None
            transport.close()
            for future in self._acks.values():
                if not future.done():
                    future.set_exception(BrokerUnavailable())
            self._acks.clear()

    def _expect(self, key: int) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._acks[key] = future
        return future

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Publish; with QoS 1, wait until the broker has it."""
        transport = self._transport
        if transport is None or not self.ready.is_set():
            raise BrokerUnavailable()
        if qos == 0:
            transport.write(mqtt.encode_publish(mqtt.Publish(topic, payload)))
            return
        packet_id = next(self._ids)
        ack = self._expect(packet_id)
        transport.write(mqtt.encode_publish(mqtt.Publish(topic, payload, 1, packet_id=packet_id)))
        try:
            async with asyncio.timeout(ACK_TIMEOUT_S):
                await ack
        finally:
            self._acks.pop(packet_id, None)

    def _packet(self, packet: mqtt.Packet) -> None:
        if packet.kind == mqtt.PUBLISH:
            publish = mqtt.parse_publish(packet.flags, packet.body)
            if publish.qos == 1 and publish.packet_id is not None and self._transport is not None:
                self._transport.write(mqtt.encode_puback(publish.packet_id))
            self.on_message(publish.topic, publish.payload)
        elif packet.kind == mqtt.CONNACK:
            self._resolve(0, packet.body)
        elif packet.kind in (mqtt.PUBACK, mqtt.SUBACK):
            self._resolve(mqtt.packet_id_of(packet.body), packet.body)

    def _resolve(self, key: int, body: bytes) -> None:
        future = self._acks.pop(key, None)
        if future is not None and not future.done():
            future.set_result(body)

    def _connection_lost(self) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)


class _Protocol(asyncio.Protocol):
    def __init__(self, client: BrokerClient) -> None:
        self.client = client
        self.reader = mqtt.PacketReader(mqtt.MAX_REMAINING_LENGTH)

    def data_received(self, data: bytes) -> None:
        try:
            for packet in self.reader.feed(data):
                self.client._packet(packet)
        except mqtt.ProtocolError:
            transport = self.client._transport
            if transport is not None:
                transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._connection_lost()
