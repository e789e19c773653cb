"""The hub's side of one device's MQTT session: direct methods out, twin requests answered.

This is what IoT Hub does on the device's behalf: publish ``$iothub/methods/POST/<name>/?$rid=n``
and wait for ``$iothub/methods/res/<status>/?$rid=n``; answer ``$iothub/twin/GET`` and reported
property PATCHes from a stored twin; send desired-property patches.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from tunnel_agent.cloud.devhub.mqtt_session import ServiceSession, json_or_none, topic_query
from tunnel_agent.logs import EventLogger

METHOD_REQUEST = "$iothub/methods/POST/{method}/?$rid={rid}"
METHOD_RESPONSES = "$iothub/methods/res/#"
TWIN_REQUESTS = "$iothub/twin/#"
TWIN_RESPONSE = "$iothub/twin/res/{status}/?$rid={rid}{extra}"
DESIRED_PATCH = "$iothub/twin/PATCH/properties/desired/?$version={version}"
CLIENTS_CONNECTED = "$SYS/broker/clients/connected"
SERVICE_CLIENT_ID = "devhub-service"


class DeviceNotConnected(Exception):
    """The device has no MQTT session on its broker."""


class MethodTimeout(Exception):
    """The device did not answer the direct method in time."""


@dataclass
class Twin:
    """A device twin as IoT Hub keeps it: desired and reported properties with versions."""

    desired: dict[str, Any] = field(default_factory=lambda: {"$version": 1})
    reported: dict[str, Any] = field(default_factory=lambda: {"$version": 1})

    def document(self) -> dict[str, Any]:
        return {"desired": self.desired, "reported": self.reported}

    def patch_reported(self, patch: dict[str, Any]) -> int:
        merge_patch(self.reported, patch)
        self.reported["$version"] = int(self.reported.get("$version", 1)) + 1
        return int(self.reported["$version"])

    def patch_desired(self, patch: dict[str, Any]) -> int:
        merge_patch(self.desired, patch)
        self.desired["$version"] = int(self.desired.get("$version", 1)) + 1
        return int(self.desired["$version"])


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """JSON merge patch as twins apply it: ``null`` deletes, objects merge, the rest replaces."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = value


class DeviceServiceLink:
    """Runs (``run``) as long as the emulator; reconnects to the broker if it restarts."""

    def __init__(
        self,
        device_id: str,
        host: str,
        port: int,
        ca_file: Path,
        *,
        twin: Twin | None = None,
        on_twin_change: Callable[[Twin], None] | None = None,
        client_cert: tuple[Path, Path] | None = None,
    ) -> None:
        self.device_id = device_id
        self.host = host
        self.port = port
        self.ca_file = ca_file
        self.twin = twin or Twin()
        self.on_twin_change = on_twin_change
        self.log = EventLogger("tunnel_agent.devhub", device=device_id)
        self._session = ServiceSession(
            host,
            port,
            ca_file,
            f"{SERVICE_CLIENT_ID}-{device_id}",
            subscriptions=[(METHOD_RESPONSES, 1), (TWIN_REQUESTS, 1), (CLIENTS_CONNECTED, 0)],
            on_message=self._on_message,
            on_lost=self._on_lost,
            client_cert=client_cert,
        )
        self._rids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[tuple[int, Any]]] = {}
        self._clients_connected = 0
        self._device_present = asyncio.Event()

    @property
    def device_connected(self) -> bool:
        """Whether a client besides this one is connected to the device's broker."""
        return self._session.ready.is_set() and self._clients_connected > 1

    async def wait_ready(self, timeout_s: float) -> None:
        await self._session.wait_ready(timeout_s)

    def _on_lost(self) -> None:
        self._clients_connected = 0
        self._device_present.clear()

    async def wait_device(self, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            await self._device_present.wait()

    async def run(self) -> None:
        await self._session.run()

    async def invoke(self, method: str, payload: Any, timeout_s: float) -> tuple[int, Any]:
        """Call a direct method; (status, payload) or DeviceNotConnected / MethodTimeout."""
        client = self._session.client
        if client is None or not self.device_connected:
            raise DeviceNotConnected(self.device_id)
        rid = str(next(self._rids))
        future: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            await client.publish(
                METHOD_REQUEST.format(method=method, rid=rid), json.dumps(payload), qos=1
            )
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise MethodTimeout(self.device_id) from None
        finally:
            self._pending.pop(rid, None)

    async def send_desired(self, patch: dict[str, Any]) -> int:
        version = self.twin.patch_desired(patch)
        if self.on_twin_change:
            self.on_twin_change(self.twin)
        client = self._session.client
        if client is not None:
            body = {**patch, "$version": version}
            await client.publish(DESIRED_PATCH.format(version=version), json.dumps(body), qos=1)
        return version

    async def _on_message(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        if topic == CLIENTS_CONNECTED:
            with contextlib.suppress(ValueError):
                self._clients_connected = int(payload)
            if self.device_connected:
                self._device_present.set()
            else:
                self._device_present.clear()
            return
        if topic.startswith("$iothub/methods/res/"):
            status_text = topic.split("/")[3]
            future = self._pending.get(topic_query(topic).get("$rid", ""))
            if future is not None and not future.done() and status_text.isdigit():
                future.set_result((int(status_text), json_or_none(payload)))
            return
        if topic.startswith("$iothub/twin/GET/"):
            rid = topic_query(topic).get("$rid", "")
            await client.publish(
                TWIN_RESPONSE.format(status=200, rid=rid, extra=""),
                json.dumps(self.twin.document()),
                qos=0,
            )
            return
        if topic.startswith("$iothub/twin/PATCH/properties/reported/"):
            rid = topic_query(topic).get("$rid", "")
            patch = json_or_none(payload)
            if not isinstance(patch, dict):
                await client.publish(
                    TWIN_RESPONSE.format(status=400, rid=rid, extra=""), b"", qos=0
                )
                return
            version = self.twin.patch_reported(patch)
            if self.on_twin_change:
                self.on_twin_change(self.twin)
            await client.publish(
                TWIN_RESPONSE.format(status=204, rid=rid, extra=f"&$version={version}"), b"", qos=0
            )
