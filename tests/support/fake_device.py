"""A device that speaks IoT Hub's MQTT topics but lets the test decide every answer.

Used where the test must hold the tunnelOpen payload itself (to present wrong or reused tokens to
the relay) or must not answer at all.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from tunnel_agent.cloud.devhub.topics import topic_query
from tunnel_agent.cloud.sas import generate_sas
from tunnel_agent.hub.connection_string import DEVICE_REQUIRED, parse_connection_string

SAS_LIFETIME_S = 3600


@dataclass
class MethodCall:
    rid: str
    name: str
    payload: Any


class FakeDevice:
    def __init__(self, connection_string: str, ca_file: Path) -> None:
        fields = parse_connection_string(connection_string, DEVICE_REQUIRED)
        self.host, self.device_id = fields["HostName"], fields["DeviceId"]
        self.key, self.ca_file = fields["SharedAccessKey"], ca_file
        self.calls: asyncio.Queue[MethodCall] = asyncio.Queue()
        self.seen: list[MethodCall] = []
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)

    async def _run(self) -> None:
        tls = ssl.create_default_context(cafile=str(self.ca_file))
        resource = f"{self.host}/devices/{self.device_id}"
        async with aiomqtt.Client(
            self.host,
            8883,
            identifier=self.device_id,
            username=f"{self.host}/{self.device_id}/?api-version=2021-04-12",
            password=generate_sas(resource, self.key, None, int(time.time()) + SAS_LIFETIME_S),
            tls_context=tls,
        ) as client:
            self._client = client
            await client.subscribe("$iothub/methods/POST/#", qos=1)
            self._ready.set()
            async for message in client.messages:
                topic = str(message.topic)
                name = topic.split("/")[3]
                payload = json.loads(message.payload) if message.payload else None  # type: ignore[arg-type]
                call = MethodCall(topic_query(topic)["$rid"], name, payload)
                self.seen.append(call)
                await self.calls.put(call)

    async def next_call(self, timeout_s: float = 15) -> MethodCall:
        return await asyncio.wait_for(self.calls.get(), timeout_s)

    async def answer(self, call: MethodCall, status: int, payload: Any) -> None:
        assert self._client is not None
        await self._client.publish(
            f"$iothub/methods/res/{status}/?$rid={call.rid}", json.dumps(payload), qos=1
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
