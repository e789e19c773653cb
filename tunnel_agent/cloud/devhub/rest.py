"""The emulator's service REST API, as IoT Hub answers it for ``api-version=2021-04-12``.

* the registry: ``PUT``/``GET``/``DELETE /devices/{id}`` (etags, ``If-Match``), ``GET /devices``,
  ``POST /devices/query``;
* twins: ``GET``, ``PATCH`` and ``PUT /twins/{id}``;
* direct methods: ``POST /twins/{id}/methods``.

Every call needs a SAS made from the service policy key, checked for signature, expiry and key
name. Errors have IoT Hub's shapes: registry and twin errors ``{"Message": "ErrorCode:<name>;..",
"ExceptionMessage": ..}``, direct-method errors a JSON document with ``errorCode`` in ``Message``.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tunnel_agent.cloud.devhub.query import QueryError, parse_query
from tunnel_agent.cloud.devhub.registry import DeviceRegistry, RegistryError, etag_matches
from tunnel_agent.cloud.devhub.service import DeviceNotConnected, HubService, MethodTimeout, iso
from tunnel_agent.cloud.sas import InvalidSignature, verify_sas
from tunnel_agent.logs import EventLogger

MIN_TIMEOUT_S, MAX_TIMEOUT_S, DEFAULT_TIMEOUT_S = 5, 300, 30
MAX_QUERY_PAGE = 1000
BODY_LIMIT_BYTES = 256 * 1024


def _tracking() -> str:
    return f"{secrets.token_hex(16)}-G:0-TimeStamp:{datetime.now(UTC):%m/%d/%Y %H:%M:%S}"


def iothub_error(status: int, code: int, message: str) -> web.Response:
    """A direct-method error: IoT Hub puts a JSON document in ``Message``."""
    inner = {
        "errorCode": code,
        "trackingId": secrets.token_hex(8),
        "message": message,
        "timestampUtc": datetime.now(UTC).isoformat(),
    }
    return web.json_response({"Message": json.dumps(inner), "ExceptionMessage": ""}, status=status)


def registry_error(status: int, code: str, message: str) -> web.Response:
    """A registry or twin error, in IoT Hub's ``ErrorCode:<name>;<message>`` shape."""
    body = {"Message": f"ErrorCode:{code};{message}", "ExceptionMessage": _tracking()}
    return web.json_response(body, status=status, headers={"iothub-errorcode": code})


class HubRestApi:
    def __init__(
        self,
        hub_names: set[str],
        registry: DeviceRegistry,
        service: HubService,
        on_device_changed: Callable[[str], None],
    ) -> None:
        self.hub_names = hub_names
        self.registry = registry
        self.service = service
        self.on_device_changed = on_device_changed
        self.log = EventLogger("tunnel_agent.devhub")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=BODY_LIMIT_BYTES, middlewares=[self._authenticate])
        app.router.add_post("/twins/{device_id}/methods", self.invoke_method)
        app.router.add_get("/twins/{device_id}", self.get_twin)
        app.router.add_patch("/twins/{device_id}", self.patch_twin)
        app.router.add_put("/twins/{device_id}", self.replace_twin)
        app.router.add_get("/devices", self.list_devices)
        app.router.add_post("/devices/query", self.query)
        app.router.add_get("/devices/{device_id}", self.get_device)
        app.router.add_put("/devices/{device_id}", self.put_device)
        app.router.add_delete("/devices/{device_id}", self.delete_device)
        return app

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            verify_sas(
                request.headers.get("Authorization", ""),
                self.hub_names,
                {"service": base64.b64decode(self.registry.service_key)},
                time.time(),
            )
        except InvalidSignature as exc:
            self.log.warning("devhub.unauthorized", path=request.path[:200], reason=str(exc))
            return iothub_error(401, 401002, f"IotHubUnauthorizedAccess: {exc}")
        try:
            response: web.StreamResponse = await handler(request)
        except RegistryError as exc:
            return registry_error(exc.status, exc.code, str(exc))
        return response

    # -- devices --------------------------------------------------------------------------------

    def device_document(self, device: dict[str, Any]) -> dict[str, Any]:
        state = self.service.states.get(device["deviceId"])
        connected = state is not None and state.connected
        document = {k: v for k, v in device.items() if k != "version"}
        document["connectionState"] = "Connected" if connected else "Disconnected"
        document["connectionStateUpdatedTime"] = iso(state.state_changed_at if state else None)
        document["lastActivityTime"] = iso(state.last_activity_at if state else None)
        return document

    def _device(self, device_id: str) -> dict[str, Any]:
        device = self.registry.get(device_id)
        if device is None:
            raise RegistryError(404, "DeviceNotFound", f"Device {device_id[:128]} not registered")
        return device

    async def get_device(self, request: web.Request) -> web.Response:
        device = self._device(request.match_info["device_id"])
        return web.json_response(self.device_document(device))

    async def list_devices(self, request: web.Request) -> web.Response:
        top = _int(request.query.get("top"), MAX_QUERY_PAGE)
        devices = list(self.registry.devices().values())[:top]
        return web.json_response([self.device_document(d) for d in devices])

    async def put_device(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        body = await _json_object(request)
        device = self.registry.put(device_id, body, request.headers.get("If-Match"))
        self.log.info("devhub.device_saved", device=device_id, status=device["status"])
        self.on_device_changed(device_id)
        return web.json_response(self.device_document(device))

    async def delete_device(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        self.registry.delete(device_id, request.headers.get("If-Match"))
        self.log.info("devhub.device_deleted", device=device_id)
        self.on_device_changed(device_id)
        return web.Response(status=204)

    async def query(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        text = body.get("query")
        if not isinstance(text, str):
            raise RegistryError(400, "ArgumentInvalid", 'body must be {"query": "SELECT ..."}')
        try:
            parsed = parse_query(text)
        except QueryError as exc:
            raise RegistryError(400, "BadRequest", f"query: {exc}") from None
        twins = [self.twin_document(d) for d in self.registry.devices().values()]
        found = [t for t in twins if parsed.matches(t)]
        page = _int(request.headers.get("x-ms-max-item-count"), MAX_QUERY_PAGE)
        start = _int(request.headers.get("x-ms-continuation"), 0)
        headers = {"x-ms-item-type": "Twin"}
        if start + page < len(found):
            headers["x-ms-continuation"] = str(start + page)
        return web.json_response(found[start : start + page], headers=headers)

    # -- twins ----------------------------------------------------------------------------------

    def twin_document(self, device: dict[str, Any]) -> dict[str, Any]:
        device_id = device["deviceId"]
        twin = self.service.twin(device_id)
        state = self.service.states.get(device_id)
        auth = device.get("authentication") or {}
        return {
            "deviceId": device_id,
            "etag": twin.etag,
            "deviceEtag": device["etag"],
            "status": device["status"],
            "statusReason": device.get("statusReason"),
            "statusUpdateTime": device.get("statusUpdatedTime"),
            "connectionState": "Connected" if state and state.connected else "Disconnected",
            "lastActivityTime": iso(state.last_activity_at if state else None),
            "cloudToDeviceMessageCount": 0,
            "authenticationType": auth.get("type", "sas"),
            "x509Thumbprint": auth.get("x509Thumbprint"),
            "modelId": twin.model_id,
            "version": twin.version,
            "tags": twin.tags,
            "properties": {"desired": twin.desired, "reported": twin.reported},
            "capabilities": device.get("capabilities", {"iotEdge": False}),
        }

    def _twin_precondition(self, request: web.Request, device_id: str) -> None:
        if not etag_matches(request.headers.get("If-Match"), self.service.twin(device_id).etag):
            raise RegistryError(412, "PreconditionFailed", "Precondition failed: twin etag")

    async def get_twin(self, request: web.Request) -> web.Response:
        device = self._device(request.match_info["device_id"])
        return web.json_response(self.twin_document(device))

    async def patch_twin(self, request: web.Request) -> web.Response:
        device = self._device(request.match_info["device_id"])
        device_id = device["deviceId"]
        tags, desired = _twin_parts(await _json_object(request))
        self._twin_precondition(request, device_id)
        twin = self.service.twin(device_id)
        if tags is not None:
            twin.patch_tags(tags)
            self.service.twins.save(device_id)
        if desired is not None:
            await self.service.send_desired(device_id, desired)
        return web.json_response(self.twin_document(device))

    async def replace_twin(self, request: web.Request) -> web.Response:
        device = self._device(request.match_info["device_id"])
        device_id = device["deviceId"]
        tags, desired = _twin_parts(await _json_object(request))
        self._twin_precondition(request, device_id)
        twin = self.service.twin(device_id)
        twin.replace_tags(tags or {})
        patch = twin.replace_desired(desired or {})
        self.service.twins.save(device_id)
        await self.service.push_desired(device_id, {**patch, "$version": twin.desired["$version"]})
        return web.json_response(self.twin_document(device))

    # -- direct methods -------------------------------------------------------------------------

    async def invoke_method(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        if self.registry.get(device_id) is None:
            return iothub_error(404, 404001, f"DeviceNotFound: {device_id[:128]}")
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
            status, payload = await self.service.invoke(
                device_id, method, body.get("payload"), timeout
            )
        except DeviceNotConnected:
            self.log.info("devhub.method_device_offline", device=device_id, method=method[:64])
            return iothub_error(
                404, 404103, "DeviceNotOnline: Timed out waiting for device to connect."
            )
        except MethodTimeout:
            self.log.info("devhub.method_timeout", device=device_id, method=method[:64])
            return iothub_error(
                504, 504101, "GatewayTimeout: Timed out waiting for the response from device."
            )
        self.log.info(
            "devhub.method",
            device=device_id,
            method=method[:64],
            status=status,
            took_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return web.json_response({"status": status, "payload": payload})


def _int(text: str | None, default: int) -> int:
    if text is None or not text.strip().isdigit():
        return default
    return max(0, min(int(text), 1_000_000))


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise RegistryError(400, "ArgumentInvalid", "body must be JSON") from None
    if not isinstance(body, dict):
        raise RegistryError(400, "ArgumentInvalid", "body must be a JSON object")
    return body


def _twin_parts(body: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(tags, desired) of a twin body; at least one must be there, each an object."""
    tags = body.get("tags")
    properties = body.get("properties")
    desired = properties.get("desired") if isinstance(properties, dict) else None
    if tags is None and desired is None:
        raise RegistryError(
            400, "ArgumentInvalid", "expected tags or {properties: {desired: {...}}}"
        )
    if tags is not None and not isinstance(tags, dict):
        raise RegistryError(400, "ArgumentInvalid", "tags must be an object")
    if desired is not None and not isinstance(desired, dict):
        raise RegistryError(400, "ArgumentInvalid", "desired must be an object")
    return tags, desired
