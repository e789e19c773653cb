"""The relay's HTTP surface: device WebSockets, the session API (bearer key), and health."""

from __future__ import annotations

import hmac
import json
import ssl

from aiohttp import web

from tunnel_agent.cloud.relay.core import Relay, RouteFull
from tunnel_agent.cloud.relay.settings import RelayServerSettings

MAX_API_BODY_BYTES = 4096


def build_app(relay: Relay) -> web.Application:
    app = web.Application(client_max_size=MAX_API_BODY_BYTES)
    app.router.add_get("/v1/tunnels/{tunnel_id}", relay.accept_device)
    app.router.add_get("/healthz", _healthz)
    api = SessionApi(relay)
    app.router.add_post("/v1/sessions", api.create)
    app.router.add_get("/v1/sessions", api.list)
    app.router.add_delete("/v1/sessions/{session_id}", api.delete)
    return app


def server_tls(settings: RelayServerSettings) -> ssl.SSLContext | None:
    if settings.cert_file is None or settings.key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


class SessionApi:
    """``POST/GET /v1/sessions``, ``DELETE /v1/sessions/{id}``; all need ``Bearer <api_key>``."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def _authorized(self, request: web.Request) -> bool:
        key = self.relay.settings.api_key
        presented = request.headers.get("Authorization", "")
        if key is None or not presented.startswith("Bearer "):
            return False
        return hmac.compare_digest(presented[7:].encode(), key.get_secret_value().encode())

    def _refuse(self, request: web.Request) -> web.Response:
        status = 404 if self.relay.settings.api_key is None else 401
        return web.json_response(
            {"error": "unauthorized" if status == 401 else "session API disabled"}, status=status
        )

    async def create(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._refuse(request)
        try:
            body = await request.json()
        except (ValueError, json.JSONDecodeError):
            return _bad("body must be JSON")
        if not isinstance(body, dict):
            return _bad("body must be a JSON object")
        device_id, local_port = body.get("deviceId"), body.get("localPort")
        if not isinstance(device_id, str) or not 0 < len(device_id) <= 128:
            return _bad("deviceId must be a non-empty string")
        if (
            isinstance(local_port, bool)
            or not isinstance(local_port, int)
            or not 0 < local_port < 65536
        ):
            return _bad("localPort must be an integer between 1 and 65535")
        try:
            route = await self.relay.open_session(device_id, local_port)
        except RouteFull as exc:
            return web.json_response({"error": str(exc)}, status=429)
        return web.json_response(route.describe(), status=201)

    async def list(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._refuse(request)
        routes = [r.describe() | {"dynamic": r.dynamic} for r in self.relay.routes.values()]
        return web.json_response({"sessions": routes})

    async def delete(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._refuse(request)
        route = self.relay.routes.get(request.match_info["session_id"])
        if route is None or not route.dynamic:
            return web.json_response({"error": "no such session"}, status=404)
        await self.relay.close_route(route.id)
        return web.Response(status=204)


def _bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)
