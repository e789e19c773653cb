"""The Device Provisioning Service, emulated over MQTT as the SDK speaks it.

The front door has already checked the client's attestation against an enrollment (access.py).
The device publishes ``$dps/registrations/PUT/iotdps-register/?$rid=n`` with ``{"registrationId",
"payload"}``; DPS answers 202 ``assigning`` with an operation id, the device polls
``iotdps-get-operationstatus`` and gets 200 ``assigned`` with the hub and the device id. The device
is created (or updated) in the hub's registry with the same credentials, so it can connect at once,
and the ``modelId`` of the payload is kept on its twin, as a PnP device's is.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from tunnel_agent.cloud.devhub.access import derive_device_key, registration_namespace
from tunnel_agent.cloud.devhub.broker_client import BrokerClient, BrokerUnavailable
from tunnel_agent.cloud.devhub.registry import DeviceRegistry, RegistryError, now_iso
from tunnel_agent.cloud.devhub.topics import json_or_none, topic_query
from tunnel_agent.cloud.devhub.twins import TwinStore
from tunnel_agent.logs import EventLogger

REGISTER = "$dps/registrations/PUT/iotdps-register/"
POLL = "$dps/registrations/GET/iotdps-get-operationstatus/"
RETRY_AFTER_S = 1


@dataclass
class Registration:
    registration_id: str
    device_id: str
    payload: Any
    operation_id: str = field(default_factory=lambda: secrets.token_hex(8))
    created: str = field(default_factory=now_iso)


class DpsService:
    def __init__(
        self,
        registry: DeviceRegistry,
        twins: TwinStore,
        client: BrokerClient,
        assigned_hub: str,
        enrollment_of: dict[str, str],
    ) -> None:
        self.registry = registry
        self.twins = twins
        self.client = client
        self.assigned_hub = assigned_hub
        self.enrollment_of = enrollment_of  # registration id -> the enrollment that let it in
        self.registrations: dict[str, Registration] = {}
        self.log = EventLogger("tunnel_agent.devhub.dps")
        self._operations: dict[str, Registration] = {}

    async def handle(self, registration_id: str, topic: str, payload: bytes) -> None:
        rid = topic_query(topic).get("$rid", "")
        if topic.startswith(REGISTER):
            await self._register(registration_id, rid, json_or_none(payload))
        elif topic.startswith(POLL):
            registration = self._operations.get(topic_query(topic).get("operationId", ""))
            if registration is None or registration.registration_id != registration_id:
                await self._answer(registration_id, 404, rid, {"message": "unknown operation"})
            else:
                await self._answer(registration_id, 200, rid, self._assigned(registration))

    async def _register(self, registration_id: str, rid: str, body: Any) -> None:
        claimed = body.get("registrationId") if isinstance(body, dict) else None
        enrollment_key = self.enrollment_of.get(registration_id)
        if claimed != registration_id or enrollment_key is None:
            self.log.warning("dps.registration_refused", registration=registration_id[:128])
            await self._answer(
                registration_id, 401, rid, {"errorCode": 401002, "message": "Unauthorized"}
            )
            return
        payload = body.get("payload") if isinstance(body, dict) else None
        try:
            device_id = self._provision(registration_id, enrollment_key, payload)
        except RegistryError as exc:
            self.log.warning(
                "dps.provisioning_failed", registration=registration_id, error=str(exc)
            )
            await self._answer(
                registration_id, 400, rid, {"errorCode": 400004, "message": str(exc)}
            )
            return
        registration = Registration(registration_id, device_id, payload)
        self.registrations[registration_id] = registration
        self._operations[registration.operation_id] = registration
        self.log.info("dps.registering", registration=registration_id, device=device_id)
        await self._answer(
            registration_id,
            202,
            rid,
            {"operationId": registration.operation_id, "status": "assigning"},
            extra=f"&retry-after={RETRY_AFTER_S}",
        )

    def _provision(self, registration_id: str, enrollment_key: str, payload: Any) -> str:
        """Register the device on the hub with the credentials that attested it."""
        enrollment = self.registry.enrollment(enrollment_key)
        if enrollment is None:
            raise RegistryError(404, "EnrollmentNotFound", "enrollment was removed")
        device_id = registration_id
        if not enrollment.get("group") and enrollment.get("deviceId"):
            device_id = str(enrollment["deviceId"])
        if enrollment.get("attestation") == "x509":
            authentication: dict[str, Any] = {
                "type": "selfSigned",
                "x509Thumbprint": {"primaryThumbprint": enrollment["thumbprint"]},
            }
        else:
            keys = [enrollment["primaryKey"], enrollment["secondaryKey"]]
            if enrollment.get("group"):
                keys = [derive_device_key(key, registration_id) for key in keys]
            authentication = {
                "type": "sas",
                "symmetricKey": {"primaryKey": keys[0], "secondaryKey": keys[1]},
            }
        body = {"deviceId": device_id, "authentication": authentication}
        if self.registry.get(device_id) is None:
            self.registry.put(device_id, body, None)
        else:
            self.registry.put(device_id, body, "*")
        model_id = payload.get("modelId") if isinstance(payload, dict) else None
        if isinstance(model_id, str) and model_id:
            twin = self.twins.get(device_id)
            twin.model_id = model_id
            self.twins.save(device_id)
        return str(device_id)

    def _assigned(self, registration: Registration) -> dict[str, Any]:
        return {
            "operationId": registration.operation_id,
            "status": "assigned",
            "registrationState": {
                "registrationId": registration.registration_id,
                "createdDateTimeUtc": registration.created,
                "assignedHub": self.assigned_hub,
                "deviceId": registration.device_id,
                "status": "assigned",
                "substatus": "initialAssignment",
                "lastUpdatedDateTimeUtc": registration.created,
                "payload": registration.payload,
            },
        }

    async def _answer(
        self, registration_id: str, status: int, rid: str, body: Any, extra: str = ""
    ) -> None:
        topic = f"{registration_namespace(registration_id)}$dps/registrations/res/{status}/"
        topic += f"?$rid={rid}{extra}"
        try:
            await self.client.publish(topic, json.dumps(body).encode(), qos=1)
        except (BrokerUnavailable, TimeoutError):
            self.log.warning("dps.answer_lost", registration=registration_id)
