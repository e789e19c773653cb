"""IoT Hub stand-in for tests: a device broker (mosquitto, TLS) and the service-side link."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path
from typing import Any

from tests.support.net import fresh_loopback_ip
from tests.support.threadloop import ThreadLoop
from tunnel_agent.cloud.devhub.broker import BrokerSpec, MosquittoBroker
from tunnel_agent.cloud.devhub.certs import LocalCA
from tunnel_agent.cloud.devhub.service_link import DeviceServiceLink


class HubHarness:
    def __init__(
        self,
        folder: Path,
        ca: LocalCA,
        loop: ThreadLoop,
        device_id: str = "cam1",
        *,
        require_client_cert: bool = False,
    ) -> None:
        self.loop = loop
        self.ca = ca
        self.device_id = device_id
        self.host = fresh_loopback_ip()
        pair = ca.issue(f"broker-{self.host}", [self.host])
        self.shared_access_key = base64.b64encode(secrets.token_bytes(32)).decode()
        self.broker = MosquittoBroker(
            BrokerSpec(
                self.host,
                folder / f"broker-{self.host}",
                ca.cert_file,
                pair.cert_file,
                pair.key_file,
                require_client_cert=require_client_cert,
            )
        )
        loop.run(self.broker.start())
        service_cert = None
        if require_client_cert:
            service = ca.issue(f"service-{self.host}", ["devhub-service"])
            service_cert = (service.cert_file, service.key_file)
        self.link = DeviceServiceLink(
            device_id, self.host, 8883, ca.cert_file, client_cert=service_cert
        )
        loop.spawn(self.link.run())
        try:
            loop.run(self.link.wait_ready(15))
        except BaseException:
            loop.run(self.broker.stop())  # a harness that failed to start leaves nothing running
            raise

    @property
    def connection_string(self) -> str:
        return (
            f"HostName={self.host};DeviceId={self.device_id};"
            f"SharedAccessKey={self.shared_access_key}"
        )

    def hub_config(self) -> dict[str, Any]:
        return {"connection_string": self.connection_string, "ca_file": str(self.ca.cert_file)}

    async def invoke(self, method: str, payload: Any, timeout_s: float = 30.0) -> tuple[int, Any]:
        return await self.loop.call(self.link.invoke(method, payload, timeout_s))

    async def tunnel_open(self, endpoint: str, token: str, port: int) -> tuple[int, Any]:
        payload = {"remoteEndpoint": endpoint, "remoteAuthorizationToken": token, "localPort": port}
        return await self.invoke("tunnelOpen", payload)

    def wait_device(self, timeout_s: float = 30.0) -> None:
        self.loop.run(self.link.wait_device(timeout_s), timeout=timeout_s + 5)

    def wait_device_gone(self, timeout_s: float = 15.0) -> None:
        async def gone() -> None:
            import asyncio

            async with asyncio.timeout(timeout_s):
                while self.link.device_connected:
                    await asyncio.sleep(0.1)

        self.loop.run(gone(), timeout=timeout_s + 5)

    def stop(self) -> None:
        self.loop.run(self.broker.stop())
