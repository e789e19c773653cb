"""The Device Provisioning Service, emulated over MQTT as the SDK speaks it.

A device publishes ``$dps/registrations/PUT/iotdps-register/?$rid=n`` with ``{"registrationId",
"payload"}``; DPS answers 202 ``assigning`` with an operation id, the device polls
``iotdps-get-operationstatus`` and gets 200 ``assigned`` with the hub and device id. The payload the
device sent (for a PnP device: ``{"modelId": ...}``) is kept for inspection, as DPS keeps it for
custom allocation.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from tunnel_agent.cloud.devhub.mqtt_session import ServiceSession, json_or_none, topic_query
from tunnel_agent.logs import EventLogger

REGISTER = "$dps/registrations/PUT/iotdps-register/"
POLL = "$dps/registrations/GET/iotdps-get-operationstatus/"
RESPONSE = "$dps/registrations/res/{status}/?$rid={rid}{extra}"
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Enrollment:
    """Where DPS sends a registration: the hub's host name and the device id there."""

    assigned_hub: str
    device_id: str


@dataclass
class Registration:
    registration_id: str
    payload: Any
    operation_id: str = field(default_factory=lambda: secrets.token_hex(8))


class DpsEmulator:
    def __init__(
        self, host: str, port: int, ca_file: Path, enrollments: dict[str, Enrollment]
    ) -> None:
        self.enrollments = enrollments
        self.registrations: dict[str, Registration] = {}
        self.log = EventLogger("tunnel_agent.devhub.dps")
        self._operations: dict[str, Registration] = {}
        self._session = ServiceSession(
            host,
            port,
            ca_file,
            "devhub-dps",
            subscriptions=[("$dps/registrations/#", 1)],
            on_message=self._on_message,
        )

    async def run(self) -> None:
        await self._session.run()

    async def wait_ready(self, timeout_s: float) -> None:
        await self._session.wait_ready(timeout_s)

    async def _on_message(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        rid = topic_query(topic).get("$rid", "")
        if topic.startswith(REGISTER):
            await self._register(client, rid, json_or_none(payload))
        elif topic.startswith(POLL):
            registration = self._operations.get(topic_query(topic).get("operationId", ""))
            if registration is None:
                await self._answer(client, 404, rid, {"message": "unknown operation"})
            else:
                await self._answer(client, 200, rid, self._assigned(registration))

    async def _register(self, client: aiomqtt.Client, rid: str, body: Any) -> None:
        registration_id = body.get("registrationId") if isinstance(body, dict) else None
        if not isinstance(registration_id, str) or registration_id not in self.enrollments:
            self.log.warning("dps.unknown_registration")
            await self._answer(client, 401, rid, {"errorCode": 401002, "message": "Unauthorized"})
            return
        registration = Registration(registration_id, body.get("payload"))
        self.registrations[registration_id] = registration
        self._operations[registration.operation_id] = registration
        self.log.info("dps.registering", registration=registration_id)
        await self._answer(
            client,
            202,
            rid,
            {"operationId": registration.operation_id, "status": "assigning"},
            extra=f"&retry-after={RETRY_AFTER_S}",
        )

    def _assigned(self, registration: Registration) -> dict[str, Any]:
        enrollment = self.enrollments[registration.registration_id]
        return {
            "operationId": registration.operation_id,
            "status": "assigned",
            "registrationState": {
                "registrationId": registration.registration_id,
                "assignedHub": enrollment.assigned_hub,
                "deviceId": enrollment.device_id,
                "status": "assigned",
                "substatus": "initialAssignment",
                "payload": registration.payload,
            },
        }

    @staticmethod
    async def _answer(
        client: aiomqtt.Client, status: int, rid: str, body: Any, extra: str = ""
    ) -> None:
        topic = RESPONSE.format(status=status, rid=rid, extra=extra)
        await client.publish(topic, json.dumps(body), qos=1)
