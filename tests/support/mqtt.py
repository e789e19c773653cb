"""A plain MQTT 5 broker (mosquitto) for media tests, and a subscriber that keeps what it gets."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from tests.support.net import free_port, wait_port
from tests.support.processes import ManagedProcess


class MediaBroker:
    def __init__(self, folder: Path, *, max_packet_bytes: int | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.config = folder / f"mosquitto-{self.port}.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
        if max_packet_bytes:
            lines.append(f"max_packet_size {max_packet_bytes}")
        self.config.write_text("\n".join(lines) + "\n")
        self.process: ManagedProcess | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = ManagedProcess(
            ["mosquitto", "-c", str(self.config)], self.folder / f"mosquitto-{self.port}.log"
        )
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


class Subscriber:
    """Collects messages on ``topic`` in the test's event loop."""

    def __init__(self, port: int, topic: str) -> None:
        self.port, self.topic = port, topic
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
                    "127.0.0.1", self.port, protocol=aiomqtt.ProtocolVersion.V5
                ) as client:
                    await client.subscribe(self.topic, qos=1)
                    self._ready.set()
                    async for message in client.messages:
                        payload = message.payload if isinstance(message.payload, bytes) else b""
                        self.messages.append(
                            Received(
                                str(message.topic), payload, message.properties, time.monotonic()
                            )
                        )
            except aiomqtt.MqttError:
                await asyncio.sleep(0.5)

    async def wait_count(self, count: int, timeout_s: float = 30) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.messages) < count:
                await asyncio.sleep(0.05)
