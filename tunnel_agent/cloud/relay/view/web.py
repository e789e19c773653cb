"""The view's HTTP surface: pages, static files, the live WebSocket and ``snapshot.jpg``.

``/v1/sessions/<id>/view#token=<token>``: the token sits in the fragment, which browsers never
send, so it is in no request line and no log. The page sends it as the first WebSocket message of
``/v1/sessions/<id>/live``; until that message checks out nothing else happens (no tunnel, no
``tunnelOpen``). ``snapshot.jpg`` takes the same token as ``Authorization: Bearer``. Who may watch
is the ``SessionDirectory``'s decision (the relay's own session check, in extension.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from tunnel_agent.cloud.relay.view.segments import SnapshotFailed
from tunnel_agent.cloud.relay.view.watch import (
    Ending,
    OpenCamera,
    SessionEnded,
    Viewer,
    ViewLimits,
    Watch,
    WatchTarget,
)
from tunnel_agent.logs import EventLogger

STATIC_DIR = Path(__file__).parent / "static"
CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "media-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
AUTH_TIMEOUT_S = 10.0
MAX_VIEWER_MESSAGE_BYTES = 4096

# WebSocket close codes the page understands (4000-4999 are the application's).
CLOSE_REFUSED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_AUTH_TIMEOUT = 4408
CLOSE_ENDED = 4410
CLOSE_FULL = 4429
CLOSE_TOO_SLOW = 4008
CLOSE_GOING_AWAY = 1001


@dataclass(frozen=True)
class ViewSession:
    """What the view needs of a session whose token checked out."""

    target: WatchTarget
    open_camera: OpenCamera
    ended: SessionEnded  # asked once a second while the session is watched


@dataclass(frozen=True)
class Refusal:
    code: str
    message: str
    close_code: int
    http_status: int

    @property
    def ending(self) -> Ending:
        return Ending(self.code, self.message, self.close_code)


REFUSED = Refusal(
    "refused",
    "This view link is not valid: the token was refused or the session does not exist.",
    CLOSE_REFUSED,
    401,
)
EXPIRED = Refusal(
    "expired", "This session has expired. Create a new one for a new link.", CLOSE_ENDED, 401
)
REVOKED = Refusal("revoked", "This session was ended by its owner (revoked).", CLOSE_ENDED, 401)
FORBIDDEN_SOURCE = Refusal(
    "forbidden", "This session may not be watched from your address.", CLOSE_FORBIDDEN, 403
)
BLOCKED = Refusal(
    "blocked",
    "Too many failed attempts from your address; try again in a minute.",
    CLOSE_FULL,
    429,
)


class SessionDirectory(Protocol):
    """Who may watch which session (implemented by the relay extension)."""

    def admit(self, session_id: str, token: str | None, source: str) -> ViewSession | Refusal:
        """The session, if ``token`` opens it for ``source`` now; else why not."""


class ViewService:
    """Watches by session id, created on a session's first viewer and closed after the last."""

    def __init__(self, sessions: SessionDirectory, limits: ViewLimits) -> None:
        self.sessions = sessions
        self.limits = limits
        self.watches: dict[str, Watch] = {}
        self.log = EventLogger("tunnel_agent.relay.view")

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.index_page)
        app.router.add_get("/v1/sessions/{session_id}/view", self.view_page)
        app.router.add_get("/v1/sessions/{session_id}/live", self.live)
        app.router.add_get("/v1/sessions/{session_id}/snapshot.jpg", self.snapshot)
        app.router.add_get("/static/view/{name}", self.static)

    async def close(self) -> None:
        for watch in list(self.watches.values()):
            await watch.close("relay stopping")

    # -- pages ---------------------------------------------------------------------------------

    async def index_page(self, request: web.Request) -> web.StreamResponse:
        return _file_response("index.html")

    async def view_page(self, request: web.Request) -> web.StreamResponse:
        return _file_response("view.html")

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in _static_names() or name.endswith(".html"):
            raise web.HTTPNotFound()
        return _file_response(name)

    # -- watches -------------------------------------------------------------------------------

    async def _watch_for(self, session: ViewSession) -> Watch:
        target = session.target
        watch = self.watches.get(target.session_id)
        if watch is None or watch.closed:
            watch = Watch(target, session.open_camera, session.ended, self.limits, self._forget)
            self.watches[target.session_id] = watch
            await watch.start()
        return watch

    def _forget(self, watch: Watch) -> None:
        session_id = watch.target.session_id
        if self.watches.get(session_id) is watch:
            del self.watches[session_id]

    # -- the live WebSocket ----------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.StreamResponse:
        session_id = request.match_info["session_id"]
        # compress=False: browsers offer permessage-deflate, and deflating video (which does not
        # shrink) cost more CPU than the rest of a viewer's path (1.5 % of a core per 4 Mbit/s).
        ws = web.WebSocketResponse(
            max_msg_size=MAX_VIEWER_MESSAGE_BYTES, heartbeat=20.0, compress=False
        )
        if not _same_origin(request):
            await ws.prepare(request)
            await _refuse(ws, "origin", "Cross-site viewing is not allowed.", CLOSE_FORBIDDEN)
            return ws
        await ws.prepare(request)
        token = await _first_token(ws)
        if token is None:
            await _refuse(ws, "refused", "No token arrived.", CLOSE_AUTH_TIMEOUT)
            return ws
        verdict = self.sessions.admit(session_id, token, request.remote or "")
        if isinstance(verdict, Refusal):
            self.log.warning("view.viewer_refused", session=session_id, reason=verdict.code)
            await _refuse(ws, verdict.code, verdict.message, verdict.close_code)
            return ws
        _limit_send_buffer(request, self.limits.socket_send_buffer_bytes)
        watch = await self._watch_for(verdict)
        viewer = Viewer(secrets.token_hex(4), self.limits)
        if not watch.add_viewer(viewer):
            await _refuse(
                ws,
                "full",
                f"This session already has {self.limits.max_viewers} viewers.",
                CLOSE_FULL,
            )
            return ws
        sender = asyncio.get_running_loop().create_task(_send(ws, viewer, self.limits))
        reason = "viewer closed"
        try:
            reason = await _until_gone(ws, sender, viewer)
            if reason == "socket stalled" and request.transport is not None:
                request.transport.abort()
        finally:
            watch.remove_viewer(viewer, reason)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
            await _close_for(ws, viewer.closing, viewer.ending)
        return ws

    # -- snapshot.jpg --------------------------------------------------------------------------

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        session_id = request.match_info["session_id"]
        authorization = request.headers.get("Authorization", "")
        token = authorization[7:] if authorization.startswith("Bearer ") else None
        verdict = self.sessions.admit(session_id, token, request.remote or "")
        if isinstance(verdict, Refusal):
            return web.json_response(
                {"error": verdict.code, "message": verdict.message},
                status=verdict.http_status,
                headers={"WWW-Authenticate": "Bearer", **SECURITY_HEADERS},
            )
        watch = await self._watch_for(verdict)
        try:
            jpeg, _, _ = await watch.snapshot()
        except TimeoutError:
            message = watch.reason or "no picture arrived from the camera in time"
            return web.json_response(
                {"error": "unavailable", "message": message}, status=503, headers=SECURITY_HEADERS
            )
        except SnapshotFailed as exc:
            return web.json_response(
                {"error": "unavailable", "message": str(exc)}, status=503, headers=SECURITY_HEADERS
            )
        return web.Response(body=jpeg, content_type="image/jpeg", headers=SECURITY_HEADERS)


async def _first_token(ws: web.WebSocketResponse) -> str | None:
    """The token of the page's first message (``{"type": "auth", "token": ...}``), if in time."""
    try:
        async with asyncio.timeout(AUTH_TIMEOUT_S):
            message = await ws.receive()
    except TimeoutError:
        return None
    if message.type != WSMsgType.TEXT:
        return None
    try:
        body = json.loads(message.data)
    except ValueError:
        return None
    token = body.get("token") if isinstance(body, dict) else None
    return token if isinstance(token, str) and 0 < len(token) <= 512 else None


async def _refuse(ws: web.WebSocketResponse, code: str, message: str, close_code: int) -> None:
    with contextlib.suppress(Exception):
        await ws.send_str(json.dumps({"type": "error", "code": code, "message": message}))
        await ws.close(code=close_code, message=code.encode())


async def _send(ws: web.WebSocketResponse, viewer: Viewer, limits: ViewLimits) -> None:
    """Write the viewer's queue to its socket; each write waits for the socket to drain."""
    while viewer.closing is None:
        await viewer.wake.wait()
        viewer.wake.clear()
        while viewer.closing is None and (item := viewer.queue.pop()) is not None:
            async with asyncio.timeout(limits.send_stall_s):
                if isinstance(item, str):
                    await ws.send_str(item)
                else:
                    await ws.send_bytes(item)
                    viewer.bytes_sent += len(item)


async def _until_gone(ws: web.WebSocketResponse, sender: asyncio.Task[None], viewer: Viewer) -> str:
    """Read (and ignore) what the page sends until it leaves or the sender stops."""
    receiving = asyncio.ensure_future(_drain_incoming(ws))
    try:
        done, _ = await asyncio.wait({receiving, sender}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        receiving.cancel()
    if sender in done:
        error = sender.exception() if not sender.cancelled() else None
        if isinstance(error, TimeoutError):
            return "socket stalled"
        return viewer.closing or "sender stopped"
    return "viewer closed"


async def _drain_incoming(ws: web.WebSocketResponse) -> None:
    async for message in ws:
        if message.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            return


async def _close_for(ws: web.WebSocketResponse, reason: str | None, ending: Ending | None) -> None:
    if ws.closed:
        return
    code = CLOSE_GOING_AWAY
    message = {"type": "error", "code": "closed", "message": reason or "closed"}
    if ending is not None:
        code = ending.close_code
        message = {"type": "error", "code": ending.code, "message": ending.message}
    elif reason == "too slow":
        code = CLOSE_TOO_SLOW
        message["code"] = "slow"
        message["message"] = "This viewer fell too far behind and was disconnected."
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2.0):
            await ws.send_str(json.dumps(message))
            await ws.close(code=code, message=message["code"].encode())


def _limit_send_buffer(request: web.Request, size_bytes: int) -> None:
    """Cap the kernel's send buffer for a viewer: its memory stays bounded, and a viewer that
    stops reading shows up as a stalled write within seconds, not after megabytes."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size_bytes)


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:  # not a browser: the token is what counts
        return True
    return urlsplit(origin).netloc == request.host


def _static_names() -> frozenset[str]:
    return frozenset(p.name for p in STATIC_DIR.iterdir() if p.is_file())


def _file_response(name: str) -> web.StreamResponse:
    path = STATIC_DIR / name
    body = path.read_bytes()
    content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
    return web.Response(
        body=body, content_type=content_type, charset="utf-8", headers=SECURITY_HEADERS
    )
