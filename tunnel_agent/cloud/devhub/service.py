"""What IoT Hub does on the devices' behalf: direct methods out, twin requests answered.

One session on the broker serves every device (topics under ``d/<device id>/``). The front door
reports each device's connections and subscriptions here, which is how the hub knows whether a
device is online, as IoT Hub's ``connectionState`` says, and whether it listens for methods.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tunnel_agent.cloud.devhub.access import DEVICE_PREFIX, REGISTRATION_PREFIX, Principal
from tunnel_agent.cloud.devhub.broker_client import BrokerClient, BrokerUnavailable
from tunnel_agent.cloud.devhub.registry import NEVER
from tunnel_agent.cloud.devhub.topics import json_or_none, topic_query
from tunnel_agent.cloud.devhub.twins import Twin, TwinStore
from tunnel_agent.logs import EventLogger

SERVICE_CLIENT_ID = "devhub-service"
METHODS_FILTER = "$iothub/methods/POST/#"
SUBSCRIPTIONS = [
    (f"{DEVICE_PREFIX}+/$iothub/methods/res/#", 1),
    (f"{DEVICE_PREFIX}+/$iothub/twin/GET/#", 1),
    (f"{DEVICE_PREFIX}+/$iothub/twin/PATCH/properties/reported/#", 1),
    (f"{REGISTRATION_PREFIX}+/$dps/registrations/#", 1),
]

RegistrationHandler = Callable[[str, str, bytes], Awaitable[None]]


class DeviceNotConnected(Exception):
    """The device has no session, or is not subscribed to direct methods."""


class MethodTimeout(Exception):
    """The device did not answer the direct method in time."""


def iso(timestamp: float | None) -> str:
    if timestamp is None:
        return NEVER
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class DeviceState:
    """A device's connection as the front door sees it (kept in memory only)."""

    sessions: int = 0
    state_changed_at: float | None = None
    last_activity_at: float | None = None
    methods_subscribed: bool = False
    listening: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def connected(self) -> bool:
        return self.sessions > 0

    def update(self) -> None:
        if self.connected and self.methods_subscribed:
            self.listening.set()
        else:
            self.listening.clear()


class HubService:
    def __init__(self, socket_path: str, twins: TwinStore) -> None:
        self.twins = twins
        self.log = EventLogger("tunnel_agent.devhub")
        self.states: dict[str, DeviceState] = {}
        self.on_registration: RegistrationHandler | None = None
        self.registration_enrollments: dict[str, str] = {}
        self.client = BrokerClient(socket_path, SERVICE_CLIENT_ID, SUBSCRIPTIONS, self._on_message)
        self._rids = itertools.count(1)
        self._pending: dict[tuple[str, str], asyncio.Future[tuple[int, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        await self.client.run()

    def state(self, device_id: str) -> DeviceState:
        state = self.states.get(device_id)
        if state is None:
            state = self.states[device_id] = DeviceState()
        return state

    # -- what the front door reports (DoorEvents) -------------------------------------------

    def session_opened(self, principal: Principal, session_present: bool) -> None:
        if principal.kind == "registration":
            if principal.enrollment is not None:
                self.registration_enrollments[principal.name] = principal.enrollment
            return
        state = self.state(principal.name)
        if not session_present:
            state.methods_subscribed = False
        elif not state.connected and state.state_changed_at is None:
            # A session the broker kept from before this devhub started: it had subscribed.
            state.methods_subscribed = True
        state.sessions += 1
        state.state_changed_at = state.last_activity_at = time.time()
        state.update()
        if principal.model_id:
            twin = self.twins.get(principal.name)
            if twin.model_id != principal.model_id:
                twin.model_id = principal.model_id
                self.twins.save(principal.name)

    def session_closed(self, principal: Principal) -> None:
        if principal.kind != "device":
            return
        state = self.state(principal.name)
        state.sessions = max(0, state.sessions - 1)
        if not state.connected:
            state.state_changed_at = time.time()
        state.update()

    def subscribed(self, principal: Principal, filters: list[str]) -> None:
        if principal.kind == "device" and METHODS_FILTER in filters:
            state = self.state(principal.name)
            state.methods_subscribed = True
            state.update()

    def activity(self, principal: Principal) -> None:
        if principal.kind == "device":
            self.state(principal.name).last_activity_at = time.time()

    def forget(self, device_id: str) -> None:
        self.states.pop(device_id, None)
        self.twins.forget(device_id)

    # -- the service's calls -------------------------------------------------------------------

    def connected(self, device_id: str) -> bool:
        state = self.states.get(device_id)
        return state is not None and state.connected

    def listening(self, device_id: str) -> bool:
        state = self.states.get(device_id)
        return state is not None and state.listening.is_set()

    async def wait_listening(self, device_id: str, timeout_s: float) -> None:
        """Until a direct method can reach the device: it listens, and the service's own link
        to the broker is up (after a broker restart the device may be back before it)."""
        async with asyncio.timeout(timeout_s):
            await self.state(device_id).listening.wait()
            await self.client.ready.wait()

    async def invoke(
        self, device_id: str, method: str, payload: Any, timeout_s: float
    ) -> tuple[int, Any]:
        """Call a direct method; (status, payload), or DeviceNotConnected / MethodTimeout."""
        if not self.listening(device_id):
            raise DeviceNotConnected(device_id)
        rid = str(next(self._rids))
        key = (device_id, rid)
        future: asyncio.Future[tuple[int, Any]] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        topic = f"{DEVICE_PREFIX}{device_id}/$iothub/methods/POST/{method}/?$rid={rid}"
        try:
            # QoS 0, as a request that only a connected device can answer in time needs.
            await self.client.publish(topic, json.dumps(payload).encode(), qos=0)
            async with asyncio.timeout(timeout_s):
                return await future
        except BrokerUnavailable:
            raise DeviceNotConnected(device_id) from None
        except TimeoutError:
            raise MethodTimeout(device_id) from None
        finally:
            self._pending.pop(key, None)

    async def send_desired(self, device_id: str, patch: dict[str, Any]) -> int:
        twin = self.twins.get(device_id)
        version = twin.patch_desired(patch)
        self.twins.save(device_id)
        await self.push_desired(device_id, {**patch, "$version": version})
        return version

    async def push_desired(self, device_id: str, patch: dict[str, Any]) -> None:
        """Tell the device (QoS 1: the broker keeps it for a persistent session)."""
        topic = f"{DEVICE_PREFIX}{device_id}/$iothub/twin/PATCH/properties/desired/"
        topic += f"?$version={patch.get('$version', '')}"
        try:
            await self.client.publish(topic, json.dumps(patch).encode(), qos=1)
        except (BrokerUnavailable, TimeoutError):
            self.log.warning("devhub.desired_not_sent", device=device_id)

    def twin(self, device_id: str) -> Twin:
        return self.twins.get(device_id)

    # -- from the broker -----------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        prefix, name, rest = [*topic.split("/", 2), "", ""][:3]
        if f"{prefix}/" == REGISTRATION_PREFIX:
            if self.on_registration is not None:
                self._spawn(self.on_registration(name, rest, payload))
            return
        if rest.startswith("$iothub/methods/res/"):
            status_text = rest.split("/")[3]
            future = self._pending.get((name, topic_query(rest).get("$rid", "")))
            if future is not None and not future.done() and status_text.isdigit():
                future.set_result((int(status_text), json_or_none(payload)))
        elif rest.startswith("$iothub/twin/GET/"):
            rid = topic_query(rest).get("$rid", "")
            body = json.dumps(self.twins.get(name).document()).encode()
            self._answer_twin(name, 200, rid, body)
        elif rest.startswith("$iothub/twin/PATCH/properties/reported/"):
            rid = topic_query(rest).get("$rid", "")
            patch = json_or_none(payload)
            if not isinstance(patch, dict):
                self._answer_twin(name, 400, rid, b"")
                return
            version = self.twins.get(name).patch_reported(patch)
            self.twins.save(name)
            self._answer_twin(name, 204, rid, b"", f"&$version={version}")

    def _answer_twin(
        self, device_id: str, status: int, rid: str, body: bytes, extra: str = ""
    ) -> None:
        topic = f"{DEVICE_PREFIX}{device_id}/$iothub/twin/res/{status}/?$rid={rid}{extra}"
        self._spawn(self._publish_quietly(topic, body))

    async def _publish_quietly(self, topic: str, body: bytes) -> None:
        try:
            await self.client.publish(topic, body, qos=0)
        except BrokerUnavailable:
            self.log.warning("devhub.answer_lost", topic=topic[:120])

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
