"""IoT Hub for tests: the devhub itself, one authenticated MQTT endpoint with real SAS keys.

Each harness listens on a loopback address of its own (the SDK's MQTT port, 8883, cannot be
changed, so parallel sessions and hubs must not share an address), with the REST API on a free
port of the same host. Devices connect with the usual connection string and are checked for
signature, expiry and resource, exactly as the devhub users run does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.support.net import free_port, fresh_loopback_ip
from tests.support.threadloop import ThreadLoop
from tunnel_agent.cloud.devhub.broker import MosquittoBroker
from tunnel_agent.cloud.devhub.certs import LocalCA
from tunnel_agent.cloud.devhub.hub import DevHub
from tunnel_agent.cloud.devhub.twins import Twin


class DeviceLink:
    """One device as the service side sees it (its twin, methods, desired properties)."""

    def __init__(self, devhub: DevHub, device_id: str) -> None:
        self.devhub = devhub
        self.device_id = device_id

    @property
    def twin(self) -> Twin:
        return self.devhub.service.twin(self.device_id)

    @property
    def device_connected(self) -> bool:
        return self.devhub.service.connected(self.device_id)

    async def invoke(self, method: str, payload: Any, timeout_s: float) -> tuple[int, Any]:
        return await self.devhub.service.invoke(self.device_id, method, payload, timeout_s)

    async def send_desired(self, patch: dict[str, Any]) -> int:
        return await self.devhub.service.send_desired(self.device_id, patch)

    async def wait_device(self, timeout_s: float) -> None:
        await self.devhub.wait_device(self.device_id, timeout_s)


class HubHarness:
    def __init__(
        self,
        folder: Path,
        ca: LocalCA,
        loop: ThreadLoop,
        device_id: str = "cam1",
        *,
        websocket_port: int | None = None,
        dps: bool = False,
    ) -> None:
        self.loop = loop
        self.ca = ca
        self.device_id = device_id
        self.host = fresh_loopback_ip()
        self.devhub = DevHub(
            folder / f"devhub-{self.host}",
            f"{self.host}:{free_port(self.host)}",
            websocket_port=websocket_port,
            dps_listen=self.host if dps else None,
            ca=ca,
        )
        loop.run(self.devhub.start())
        try:
            device = self.devhub.add_device(device_id)
        except BaseException:
            loop.run(self.devhub.stop())  # a harness that failed to start leaves nothing running
            raise
        self.shared_access_key: str = device["authentication"]["symmetricKey"]["primaryKey"]
        self.link = DeviceLink(self.devhub, device_id)

    @property
    def broker(self) -> MosquittoBroker:
        """The mosquitto behind the front door (stop or restart it to make a hub outage)."""
        return self.devhub.broker

    @property
    def connection_string(self) -> str:
        return self.devhub.connection_string(self.device_id)

    def hub_config(self) -> dict[str, Any]:
        return {"connection_string": self.connection_string, "ca_file": str(self.ca.cert_file)}

    def add_device(self, device_id: str) -> str:
        """Register another device; its connection string."""
        self.devhub.add_device(device_id)
        return self.devhub.connection_string(device_id)

    def device_link(self, device_id: str) -> DeviceLink:
        return DeviceLink(self.devhub, device_id)

    async def invoke(self, method: str, payload: Any, timeout_s: float = 30.0) -> tuple[int, Any]:
        return await self.loop.call(self.link.invoke(method, payload, timeout_s))

    async def tunnel_open(self, endpoint: str, token: str, port: int) -> tuple[int, Any]:
        payload = {"remoteEndpoint": endpoint, "remoteAuthorizationToken": token, "localPort": port}
        return await self.invoke("tunnelOpen", payload)

    def wait_device(self, timeout_s: float = 30.0, device_id: str | None = None) -> None:
        """Until the device is connected and subscribed to direct methods."""
        wanted = device_id or self.device_id
        self.loop.run(self.devhub.wait_device(wanted, timeout_s), timeout=timeout_s + 5)

    def wait_device_gone(self, timeout_s: float = 15.0, device_id: str | None = None) -> None:
        wanted = device_id or self.device_id

        async def gone() -> None:
            async with asyncio.timeout(timeout_s):
                while self.devhub.service.connected(wanted):
                    await asyncio.sleep(0.05)

        self.loop.run(gone(), timeout=timeout_s + 5)

    def stop(self) -> None:
        self.loop.run(self.devhub.stop())
