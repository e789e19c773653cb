"""``tunnel-agent devhub``: the local IoT Hub emulator, assembled.

One CA in the state folder signs every broker and the REST endpoint; each registered device gets
its own mosquitto (see broker.py) and a service-side link; the REST API answers the relay. Devices
added while it runs (``devhub add-device``) are picked up within a second.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from tunnel_agent.cloud.devhub.broker import BrokerSpec, MosquittoBroker
from tunnel_agent.cloud.devhub.certs import LocalCA
from tunnel_agent.cloud.devhub.registry import SERVICE_POLICY, Device, DeviceRegistry
from tunnel_agent.cloud.devhub.rest import HubRestApi
from tunnel_agent.cloud.devhub.service_link import DeviceServiceLink, Twin
from tunnel_agent.config.base import split_host_port
from tunnel_agent.logs import SECRETS, EventLogger

REGISTRY_POLL_S = 1.0
LINK_READY_S = 15.0


class DevHub:
    def __init__(
        self, state: Path, rest_listen: str = "127.0.0.1:8444", address_block: str | None = None
    ) -> None:
        self.state = state
        self.rest_host, self.rest_port = split_host_port(rest_listen)
        self.registry = DeviceRegistry(state, address_block)
        self.ca = LocalCA(state / "ca")
        self.log = EventLogger("tunnel_agent.devhub")
        self.brokers: dict[str, MosquittoBroker] = {}
        self.links: dict[str, DeviceServiceLink] = {}
        self.devices: dict[str, Device] = {}
        self._service_key = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._registry_mtime = 0.0

    @property
    def hub_name(self) -> str:
        return f"{self.rest_host}:{self.rest_port}"

    @property
    def rest_url(self) -> str:
        return f"https://{self.hub_name}"

    @property
    def service_connection_string(self) -> str:
        return (
            f"HostName={self.hub_name};SharedAccessKeyName={SERVICE_POLICY};"
            f"SharedAccessKey={self._service_key}"
        )

    async def start(self) -> None:
        try:
            await self._start_rest()
            await self._sync_devices()
        except BaseException:
            await self.stop()
            raise
        self._spawn(self._watch_registry())
        self.log.info(
            "devhub.started",
            rest=self.rest_url,
            ca=str(self.ca.cert_file),
            devices=",".join(self.devices) or "-",
        )

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for broker in self.brokers.values():
            await broker.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def add_device(self, device_id: str) -> Device:
        device = self.registry.add(device_id)
        await self._sync_devices()
        return device

    # -- internals --------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_rest(self) -> None:
        pair = self.ca.issue("rest", sorted({self.rest_host, "127.0.0.1", "localhost"}))
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(pair.cert_file, pair.key_file)
        api = HubRestApi(self.hub_name, self._service_keys, lambda: self.links)
        self._runner = web.AppRunner(
            api.app(), handle_signals=False, access_log=None, shutdown_timeout=2
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.rest_host, self.rest_port, ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(
                exc.errno, f"devhub REST endpoint {self.hub_name}: {exc.strerror}"
            ) from None

    def _service_keys(self) -> dict[str, bytes]:
        return {SERVICE_POLICY: base64.b64decode(self._service_key)}

    async def _sync_devices(self) -> None:
        self._registry_mtime = self.registry.mtime()
        self._service_key, devices = self.registry.load()
        SECRETS.add(self._service_key)
        for device in devices.values():
            SECRETS.add(device.key)
            if device.device_id not in self.brokers:
                await self._start_device(device)
        self.devices = devices

    async def _start_device(self, device: Device) -> None:
        pair = self.ca.issue(f"broker-{device.device_id}", [device.address])
        broker = MosquittoBroker(
            BrokerSpec(
                device.address,
                self.state / "brokers" / device.device_id,
                self.ca.cert_file,
                pair.cert_file,
                pair.key_file,
            )
        )
        await broker.start()
        self.brokers[device.device_id] = broker
        twin_file = self.state / "twins" / f"{device.device_id}.json"
        link = DeviceServiceLink(
            device.device_id,
            device.address,
            broker.spec.port,
            self.ca.cert_file,
            twin=_load_twin(twin_file),
            on_twin_change=lambda twin: _save_twin(twin_file, twin),
        )
        self.links[device.device_id] = link
        self._spawn(link.run())
        await link.wait_ready(LINK_READY_S)
        self.log.info("devhub.device_ready", device=device.device_id, mqtt=broker.address)

    async def _watch_registry(self) -> None:
        while True:
            await asyncio.sleep(REGISTRY_POLL_S)
            if self.registry.mtime() != self._registry_mtime:
                try:
                    await self._sync_devices()
                except Exception as exc:
                    self.log.error("devhub.registry_sync_failed", error=str(exc))


def _load_twin(path: Path) -> Twin:
    with contextlib.suppress(OSError, ValueError, KeyError):
        document = json.loads(path.read_text())
        return Twin(desired=document["desired"], reported=document["reported"])
    return Twin()


def _save_twin(path: Path, twin: Twin) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(twin.document()))
    temporary.replace(path)
