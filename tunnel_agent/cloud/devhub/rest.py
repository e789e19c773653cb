"""The emulator's service REST API: the parts of IoT Hub's that the relay and operators use.

``POST /twins/{id}/methods`` (direct methods), ``GET /twins/{id}`` and ``PATCH /twins/{id}``
(desired properties). Every call needs a SAS from the service policy key, checked for signature,
expiry and key name as IoT Hub does; errors have IoT Hub's shape (``Message`` holding a JSON
document with ``errorCode``).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tunnel_agent.cloud.devhub.service_link import (
    DeviceNotConnected,
    DeviceServiceLink,
    MethodTimeout,
)
from tunnel_agent.cloud.sas import InvalidSignature, verify_sas
from tunnel_agent.logs import EventLogger

MIN_TIMEOUT_S, MAX_TIMEOUT_S, DEFAULT_TIMEOUT_S = 5, 300, 30


def iothub_error(status: int, code: int, message: str) -> web.Response:
    inner = {
        "errorCode": code,
        "trackingId": secrets.token_hex(8),
        "message": message,
        "timestampUtc": datetime.now(UTC).isoformat(),
    }
    return web.json_response({"Message": json.dumps(inner), "ExceptionMessage": ""}, status=status)


class HubRestApi:
    def __init__(
        self,
        hub_name: str,
        service_keys: Callable[[], dict[str, bytes]],
        links: Callable[[], dict[str, DeviceServiceLink]],
    ) -> None:
        self.hub_name = hub_name
        self.service_keys = service_keys
        self.links = links
        self.log = EventLogger("tunnel_agent.devhub")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024, middlewares=[self._authenticate])
        app.router.add_post("/twins/{device_id}/methods", self.invoke_method)
        app.router.add_get("/twins/{device_id}", self.get_twin)
        app.router.add_patch("/twins/{device_id}", self.patch_twin)
        return app

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            verify_sas(
                request.headers.get("Authorization", ""),
                self.hub_name,
                self.service_keys(),
                time.time(),
            )
        except InvalidSignature as exc:
            self.log.warning("devhub.unauthorized", path=request.path, reason=str(exc))
            return iothub_error(401, 401002, f"IotHubUnauthorizedAccess: {exc}")
        response: web.StreamResponse = await handler(request)
        return response

    def _link(self, request: web.Request) -> DeviceServiceLink | web.Response:
        device_id = request.match_info["device_id"]
        link = self.links().get(device_id)
        if link is None:
            return iothub_error(404, 404001, f"DeviceNotFound: {device_id[:128]}")
        return link

    async def invoke_method(self, request: web.Request) -> web.Response:
        link = self._link(request)
        if isinstance(link, web.Response):
            return link
        try:
            body = await request.json()
        except ValueError:
            return iothub_error(400, 400004, "ArgumentInvalid: body must be JSON")
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("methodName"), str)
            or not body["methodName"]
        ):
            return iothub_error(400, 400004, "ArgumentInvalid: methodName is required")
        timeout = body.get("responseTimeoutInSeconds", DEFAULT_TIMEOUT_S)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int)
            or not MIN_TIMEOUT_S <= timeout <= MAX_TIMEOUT_S
        ):
            return iothub_error(
                400, 400027, f"responseTimeoutInSeconds must be {MIN_TIMEOUT_S}-{MAX_TIMEOUT_S}"
            )
        method = body["methodName"]
        started = time.monotonic()
        try:
            status, payload = await link.invoke(method, body.get("payload"), timeout)
        except DeviceNotConnected:
            self.log.info("devhub.method_device_offline", device=link.device_id, method=method[:64])
            return iothub_error(
                404, 404103, "DeviceNotOnline: Timed out waiting for device to connect."
            )
        except MethodTimeout:
            self.log.info("devhub.method_timeout", device=link.device_id, method=method[:64])
            return iothub_error(
                504, 504101, "GatewayTimeout: Timed out waiting for the response from device."
            )
        self.log.info(
            "devhub.method",
            device=link.device_id,
            method=method[:64],
            status=status,
            took_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return web.json_response({"status": status, "payload": payload})

    async def get_twin(self, request: web.Request) -> web.Response:
        link = self._link(request)
        if isinstance(link, web.Response):
            return link
        return web.json_response(_twin_document(link))

    async def patch_twin(self, request: web.Request) -> web.Response:
        link = self._link(request)
        if isinstance(link, web.Response):
            return link
        try:
            body = await request.json()
            desired = body["properties"]["desired"]
        except (ValueError, KeyError, TypeError):
            return iothub_error(
                400, 400004, "ArgumentInvalid: expected {properties: {desired: {...}}}"
            )
        if not isinstance(desired, dict):
            return iothub_error(400, 400004, "ArgumentInvalid: desired must be an object")
        await link.send_desired(desired)
        return web.json_response(_twin_document(link))


def _twin_document(link: DeviceServiceLink) -> dict[str, Any]:
    return {
        "deviceId": link.device_id,
        "connectionState": "Connected" if link.device_connected else "Disconnected",
        "properties": {"desired": link.twin.desired, "reported": link.twin.reported},
    }
