"""Publishing snapshots to an MQTT broker, so that a slow or absent broker never stalls a camera.

Messages wait in a bounded queue; when it is full the oldest is dropped and counted. The publisher
reconnects by itself with backoff. With MQTT 5 each message carries its expiry (``ttl``), a content
type and user properties (capture time, sequence, camera, stream), and messages larger than the
broker's maximum packet size are counted and logged instead of being sent to be refused.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter, deque
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tunnel_agent.logs import SECRETS, EventLogger
from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.messages import OutgoingMessage
from tunnel_agent.media.settings import MqttSettings


class _Client(aiomqtt.Client):
    """aiomqtt's client, keeping the CONNACK properties (they hold the broker's limits)."""

    connack_properties: Properties | None = None

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, rc: Any, properties: Any = None
    ) -> None:
        self.connack_properties = properties
        super()._on_connect(client, userdata, flags, rc, properties)


class MqttPublisher:
    def __init__(self, settings: MqttSettings, backoff: Backoff) -> None:
        self.settings = settings
        self.log = EventLogger("tunnel_agent.media.mqtt")
        self.counters: Counter[str] = Counter()
        self.connected = False
        self.max_packet_bytes: int | None = None
        self._queue: deque[OutgoingMessage] = deque()
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backoff = backoff
        if settings.password is not None:
            SECRETS.add(settings.password.get_secret_value())

    # -- any thread -----------------------------------------------------------------------------

    def offer(self, message: OutgoingMessage) -> None:
        """Queue a message from any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._enqueue, message)

    # -- the event loop -------------------------------------------------------------------------

    def _enqueue(self, message: OutgoingMessage) -> None:
        if self.max_packet_bytes is not None and message.size_bytes() > self.max_packet_bytes:
            self.counters["dropped_too_large"] += 1
            self.log.warning(
                "media.mqtt_message_too_large",
                topic=message.topic,
                bytes=len(message.payload),
                broker_max_bytes=self.max_packet_bytes,
            )
            return
        if len(self._queue) >= self.settings.queue_size:
            self._queue.popleft()
            self.counters["dropped_queue_full"] += 1
        self._queue.append(message)
        self._wakeup.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            started = self._loop.time()
            delay = self._backoff.initial_s
            try:
                await self._session()
            except (aiomqtt.MqttError, OSError, ssl.SSLError) as exc:
                event = "media.mqtt_disconnected" if self.connected else "media.mqtt_connect_failed"
                self.counters[event.removeprefix("media.mqtt_")] += 1
                self._backoff.ran_for(self._loop.time() - started)
                delay = self._backoff.next_delay()
                self.log.warning(
                    event, error=f"{type(exc).__name__}: {exc}", retry_in_s=round(delay, 1)
                )
            finally:
                self.connected = False
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        host, port = self.settings.host_port
        async with self._client(host, port) as client:
            self.connected = True
            self.counters["connects"] += 1
            self.max_packet_bytes = _max_packet_size(client.connack_properties)
            self.log.info(
                "media.mqtt_connected",
                broker=f"{host}:{port}",
                protocol=self.settings.protocol,
                max_packet_bytes=self.max_packet_bytes,
                queued=len(self._queue),
            )
            while True:
                while not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                message = self._queue[0]
                await client.publish(
                    message.topic,
                    message.payload,
                    qos=message.qos,
                    retain=message.retain,
                    properties=self._properties(message),
                    timeout=30,
                )
                if self._queue and self._queue[0] is message:
                    self._queue.popleft()
                self.counters["published"] += 1

    def _client(self, host: str, port: int) -> _Client:
        settings = self.settings
        tls = None
        if settings.tls:
            tls = ssl.create_default_context(
                cafile=str(settings.ca_file) if settings.ca_file else None
            )
            if settings.cert_file is not None and settings.key_file is not None:
                tls.load_cert_chain(settings.cert_file, settings.key_file)
        protocol = (
            aiomqtt.ProtocolVersion.V5 if settings.protocol == 5 else aiomqtt.ProtocolVersion.V311
        )
        return _Client(
            host,
            port,
            username=settings.username,
            password=settings.password.get_secret_value() if settings.password else None,
            identifier=settings.client_id,
            protocol=protocol,
            tls_context=tls,
            keepalive=settings.keepalive,
            timeout=15,
        )

    def _properties(self, message: OutgoingMessage) -> Properties | None:
        if self.settings.protocol != 5:
            return None
        properties = Properties(PacketTypes.PUBLISH)
        if message.expiry_s:
            properties.MessageExpiryInterval = message.expiry_s
        properties.ContentType = message.content_type
        properties.UserProperty = list(message.user_properties)
        return properties


def _max_packet_size(properties: Properties | None) -> int | None:
    value = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
    return int(value) if isinstance(value, int) else None
