"""The relay's HTTP surface on aiohttp: the session API, the probes, and the extensions' routes.

``POST /v1/sessions``, ``GET /v1/sessions`` and ``DELETE /v1/sessions/{id}`` need the API key
(``Authorization: Bearer <api_key>``); ``GET /v1/sessions/{id}`` also accepts that session's own
consumer token, which is how ``tunnel-agent connect`` checks a session before it listens. Wrong
keys and tokens count against the caller's source: after a burst, it gets 429 for a while.
"""

from __future__ import annotations

import hmac
import json
import ssl
import time
from typing import Any

from aiohttp import web

from tunnel_agent.cloud.relay.core import Relay
from tunnel_agent.cloud.relay.extensions import RelayExtension
from tunnel_agent.cloud.relay.sessions import (
    InvalidSessionRequest,
    Session,
    SessionLimit,
    Verdict,
    parse_session_request,
)
from tunnel_agent.cloud.relay.settings import RelayServerSettings
from tunnel_agent.cloud.relay.tokens import bearer_token

MAX_API_BODY_BYTES = 4096


def build_app(relay: Relay, extensions: list[RelayExtension]) -> web.Application:
    app = web.Application(client_max_size=MAX_API_BODY_BYTES)
    probes = Probes(relay)
    app.router.add_get("/healthz", probes.healthz)
    app.router.add_get("/readyz", probes.readyz)
    api = SessionApi(relay, extensions)
    app.router.add_post("/v1/sessions", api.create)
    app.router.add_get("/v1/sessions", api.list)
    app.router.add_get("/v1/sessions/{session_id}", api.get)
    app.router.add_delete("/v1/sessions/{session_id}", api.delete)
    app.router.add_get("/v1/sessions/{session_id}/connect", _websocket_only)
    app.router.add_get("/v1/tunnels/{tunnel_id}", _websocket_only)
    for extension in extensions:
        extension.register(app)
    return app


def server_tls(settings: RelayServerSettings) -> ssl.SSLContext | None:
    if settings.cert_file is None or settings.key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


def session_answer(
    relay: Relay, session: Session, extensions: list[RelayExtension], token: str | None = None
) -> dict[str, Any]:
    """The one place a session answer is built (creation, listing, look-up)."""
    answer = session.describe()
    answer["connectUrl"] = f"{relay.settings.public_url}/v1/sessions/{session.id}/connect"
    if token is not None:
        answer["token"] = token
    for extension in extensions:
        answer.update(extension.session_fields(session, token))
    return answer


class Probes:
    """``/healthz``: the process answers. ``/readyz``: and the hub's REST API is reachable."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        hub = self.relay.hub
        if hub.reachable:
            return web.json_response({"status": "ready"})
        return web.json_response(
            {"status": "not ready", "reason": hub.unreachable_reason}, status=503
        )


class SessionApi:
    def __init__(self, relay: Relay, extensions: list[RelayExtension]) -> None:
        self.relay = relay
        self.extensions = extensions

    def _refusal(self, request: web.Request) -> web.Response | None:
        """None if the request carries the API key; else the answer to give."""
        source = request.remote or ""
        now = time.monotonic()
        key = self.relay.settings.api_key
        if key is None:
            return web.json_response({"error": "session API disabled"}, status=404)
        if self.relay.auth_failures.blocked(source, now):
            self.relay.refusals.refused("too many failed attempts", source, api=request.path)
            return web.json_response({"error": "too many failed attempts"}, status=429)
        presented = bearer_token(request.headers.get("Authorization"))
        if presented is not None and hmac.compare_digest(
            presented.encode(), key.get_secret_value().encode()
        ):
            return None
        self.relay.auth_failures.failed(source, now)
        self.relay.refusals.refused("wrong API key", source, api=request.path)
        return web.json_response({"error": "unauthorized"}, status=401)

    async def create(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        try:
            body = await request.json()
        except (ValueError, json.JSONDecodeError):
            return _bad("body must be JSON")
        try:
            session_request = parse_session_request(body)
            for extension in self.extensions:
                extension.check_session_body(body)
        except InvalidSessionRequest as exc:
            return _bad(str(exc))
        try:
            session, token = await self.relay.create_session(session_request, request.remote or "")
        except SessionLimit as exc:
            return web.json_response({"error": str(exc)}, status=429)
        for extension in self.extensions:
            extension.session_created(session, body)
        answer = session_answer(self.relay, session, self.extensions, token)
        return web.json_response(answer, status=201)

    async def list(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        sessions = [
            session_answer(self.relay, s, self.extensions)
            for s in self.relay.sessions.sessions.values()
        ]
        routes = [r.describe() for r in self.relay.routes.values()]
        return web.json_response({"sessions": sessions, "routes": routes})

    async def get(self, request: web.Request) -> web.Response:
        session_id = request.match_info["session_id"]
        presented = bearer_token(request.headers.get("Authorization"))
        key = self.relay.settings.api_key
        by_key = (
            key is not None
            and presented is not None
            and hmac.compare_digest(presented.encode(), key.get_secret_value().encode())
        )
        if by_key:
            session = self.relay.sessions.sessions.get(session_id)
            if session is None:
                return web.json_response({"error": Verdict.UNKNOWN.reason}, status=404)
            return web.json_response(session_answer(self.relay, session, self.extensions))
        source = request.remote or ""
        if self.relay.auth_failures.blocked(source, time.monotonic()):
            self.relay.refusals.refused("too many failed attempts", source, api=request.path)
            return web.json_response({"error": "too many failed attempts"}, status=429)
        verdict, session = self.relay.check_session(session_id, presented, source)
        if verdict is not Verdict.ACCEPTED or session is None:
            return web.json_response({"error": verdict.reason}, status=verdict.status)
        return web.json_response(session_answer(self.relay, session, self.extensions))

    async def delete(self, request: web.Request) -> web.Response:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        if not self.relay.end_session(request.match_info["session_id"], Verdict.REVOKED):
            return web.json_response({"error": Verdict.UNKNOWN.reason}, status=404)
        return web.Response(status=204)


async def _websocket_only(request: web.Request) -> web.Response:
    """A plain request, or an upgrade on a reused connection: tunnel WebSockets must be the first
    request of their connection, since the front door routes connections, not requests."""
    response = web.json_response(
        {"error": "WebSocket endpoint: open it as the first request of a new connection"},
        status=426,
    )
    response.force_close()
    return response


def _bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)
