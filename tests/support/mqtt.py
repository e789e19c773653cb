"""An MQTT broker (mosquitto, plain or TLS) for media tests, and a subscriber keeping messages."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from tests.support.net import free_port, wait_port
from tests.support.processes import ManagedProcess
from tunnel_agent.cloud.devhub.certs import CertPair


class MediaBroker:
    """mosquitto on a free loopback port; with ``tls`` it serves MQTT over TLS only.

    ``log_all`` logs every packet (``Received PUBLISH from <client> (... 'topic' ...)``).
    """

    def __init__(
        self,
        folder: Path,
        *,
        max_packet_bytes: int | None = None,
        tls: CertPair | None = None,
        log_all: bool = False,
    ) -> None:
        self.folder = folder
        self.port = free_port()
        self.tls = tls
        self.config = folder / f"mosquitto-{self.port}.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"user {getpass.getuser()}",  # keeps reading the test's private key files
        ]
        if max_packet_bytes:
            lines.append(f"max_packet_size {max_packet_bytes}")
        if tls is not None:
            lines += [f"certfile {tls.cert_file}", f"keyfile {tls.key_file}"]
        if log_all:
            lines.append("log_type all")
        self.config.write_text("\n".join(lines) + "\n")
        self.process: ManagedProcess | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.folder / f"mosquitto-{self.port}.log"

    def log(self) -> str:
        """Everything the broker logged, over all its runs."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def start(self) -> None:
        self.process = ManagedProcess(["mosquitto", "-c", str(self.config)], self.log_file)
        wait_port("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


@dataclass
class Received:
    topic: str
    payload: bytes
    properties: Any
    at: float
    qos: int
    retain: bool


class Subscriber:
    """Collects messages on ``topic`` in the test's event loop."""

    def __init__(
        self,
        port: int,
        topic: str,
        *,
        tls_context: ssl.SSLContext | None = None,
        protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V5,
    ) -> None:
        self.port, self.topic = port, topic
        self.tls_context, self.protocol = tls_context, protocol
        self.messages: list[Received] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, protocol=self.protocol, tls_context=self.tls_context
                ) as client:
                    await client.subscribe(self.topic, qos=1)
                    self._ready.set()
                    async for message in client.messages:
                        payload = message.payload if isinstance(message.payload, bytes) else b""
                        self.messages.append(
                            Received(
                                str(message.topic),
                                payload,
                                message.properties,
                                time.monotonic(),
                                message.qos,
                                message.retain,
                            )
                        )
            except aiomqtt.MqttError:
                await asyncio.sleep(0.5)

    async def wait_count(self, count: int, timeout_s: float = 30) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.messages) < count:
                await asyncio.sleep(0.05)
