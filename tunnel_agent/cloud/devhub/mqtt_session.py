"""The emulator's own MQTT client on one broker: subscribe, dispatch, reconnect after restarts."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import aiomqtt

RECONNECT_S = 0.5
MessageHandler = Callable[[aiomqtt.Client, str, bytes], Awaitable[None]]


class ServiceSession:
    def __init__(
        self,
        host: str,
        port: int,
        ca_file: Path,
        client_id: str,
        *,
        subscriptions: Sequence[tuple[str, int]],
        on_message: MessageHandler,
        on_lost: Callable[[], None] | None = None,
        client_cert: tuple[Path, Path] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.ca_file = ca_file
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.on_message = on_message
        self.on_lost = on_lost
        self.client_cert = client_cert
        self.client: aiomqtt.Client | None = None
        self.ready = asyncio.Event()

    async def wait_ready(self, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            await self.ready.wait()

    async def run(self) -> None:
        tls = ssl.create_default_context(cafile=str(self.ca_file))
        if self.client_cert is not None:  # brokers that require X.509 from every client
            tls.load_cert_chain(*self.client_cert)
        while True:
            try:
                async with aiomqtt.Client(
                    self.host,
                    self.port,
                    identifier=self.client_id,
                    tls_context=tls,
                    clean_session=True,
                    keepalive=30,
                    timeout=10,
                    socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                ) as client:
                    self.client = client
                    for topic, qos in self.subscriptions:
                        await client.subscribe(topic, qos=qos)
                    self.ready.set()
                    async for message in client.messages:
                        await self.on_message(client, str(message.topic), payload_bytes(message))
            except aiomqtt.MqttError:
                pass
            finally:
                self.client = None
                self.ready.clear()
                if self.on_lost is not None:
                    self.on_lost()
            await asyncio.sleep(RECONNECT_S)


def topic_query(topic: str) -> dict[str, str]:
    """The ``?$rid=..&..`` part of an IoT Hub or DPS topic as a dict."""
    _, _, query = topic.partition("?")
    return {key: values[-1] for key, values in parse_qs(query).items()}


def payload_bytes(message: aiomqtt.Message) -> bytes:
    payload = message.payload
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return str(payload if payload is not None else "").encode()


def json_or_none(payload: bytes) -> Any:
    try:
        return json.loads(payload) if payload else None
    except (ValueError, UnicodeDecodeError):
        return None
