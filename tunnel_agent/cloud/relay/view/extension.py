"""The browser view as a relay extension: its pages on the relay's own port, ``viewUrl`` in every
session answer, the relay's session check for every viewer, and the relay's tunnels to the camera.

- A viewer's token is checked by ``relay.check_session``, the same check (and the same per-source
  count of failures) as for any consumer; so are its source and the session's expiry.
- The camera is reached through ``relay.open_tunnel``: a tunnel (``tunnelOpen`` to the device,
  counted against the tunnel limits) whose near end is joined in memory (``pipe``) to the view's
  RTSP client, which reads ``<rtspPath>`` through it with interleaved TCP.
- When the tunnel fails, the relay knows why (device offline, refused, never connected): that
  reason, not "the camera closed the connection", is what viewers read.
- A watched session that ends (expired, revoked) is noticed within a second: its viewers are told
  and the watch closes; its camera fields are forgotten.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tunnel_agent.cloud.relay.sessions import Session, Verdict
from tunnel_agent.cloud.relay.view import pipe
from tunnel_agent.cloud.relay.view.camera_source import CameraSource, parse_camera_source
from tunnel_agent.cloud.relay.view.watch import (
    CameraLink,
    Ending,
    TunnelUnavailable,
    ViewLimits,
    WatchTarget,
)
from tunnel_agent.cloud.relay.view.web import (
    BLOCKED,
    EXPIRED,
    FORBIDDEN_SOURCE,
    REFUSED,
    REVOKED,
    Refusal,
    ViewService,
    ViewSession,
)
from tunnel_agent.logs import SECRETS
from tunnel_agent.tunnel.pump import StreamEnd

if TYPE_CHECKING:
    from tunnel_agent.cloud.relay.core import Relay
    from tunnel_agent.cloud.relay.tunnels import RelayTunnel

REFUSALS = {
    Verdict.UNKNOWN: REFUSED,
    Verdict.WRONG_TOKEN: REFUSED,
    Verdict.EXPIRED: EXPIRED,
    Verdict.REVOKED: REVOKED,
    Verdict.SOURCE: FORBIDDEN_SOURCE,
}


def view_base_url(public_url: str) -> str:
    """``https://host:port`` of the relay, from its ``wss://host:port`` public URL."""
    scheme, _, rest = public_url.partition("://")
    return ("https" if scheme == "wss" else "http") + "://" + rest


def tunnel_failure(close_reason: str | None, failed: bool, started: bool) -> str | None:
    """What viewers are told about a tunnel that could not carry the camera (None: it could, or
    it has not been asked yet: the camera itself is then the one to blame)."""
    if failed and close_reason:
        if close_reason.startswith("device not reachable"):
            return "the device is offline: the hub cannot reach it"
        if close_reason.startswith("device answered"):
            answer = close_reason.removeprefix("device ")
            return f"the device refused to open the tunnel ({answer})"
        if close_reason.startswith("device refused"):
            return "the device refused to open the tunnel"
        if close_reason.startswith("device did not connect"):
            return "the device accepted the tunnel but never connected back to the relay"
        return close_reason
    if not started:
        return close_reason or "the device did not open the tunnel in time"
    return None


class RelayCameraLink:
    """One tunnel of the relay: the way to the camera for one remuxer run."""

    def __init__(self, relay: Relay, entry: Session) -> None:
        self._relay = relay
        self._entry = entry
        self._tunnel: RelayTunnel | None = None

    def connect(self, protocol: asyncio.Protocol) -> None:
        near = StreamEnd("consumer")
        near_transport, _ = pipe.join(near, protocol)
        try:
            self._tunnel = self._relay.open_tunnel(self._entry, near)
        except ConnectionRefusedError as exc:
            near_transport.close()
            raise TunnelUnavailable(f"the relay cannot open another tunnel now ({exc})") from None

    def failure(self) -> str | None:
        tunnel = self._tunnel
        if tunnel is None:
            return None
        return tunnel_failure(tunnel.close_reason, tunnel.failed, tunnel.started)

    def close(self) -> None:
        if self._tunnel is not None:
            self._tunnel.close("closed by the relay")


class ViewExtension:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        settings = relay.settings
        self.base_url = view_base_url(settings.public_url)
        self.cameras: dict[str, CameraSource] = {}  # by session id; memory only
        limits = ViewLimits(
            max_viewers=settings.max_viewers_per_session, grace_s=settings.view_grace_period
        )
        self.service = ViewService(self, limits)

    # -- RelayExtension -------------------------------------------------------------------------

    def register(self, app: web.Application) -> None:
        self.service.add_routes(app)

    def check_session_body(self, body: dict[str, Any]) -> None:
        parse_camera_source(body)

    def session_created(self, session: Session, body: dict[str, Any]) -> None:
        for session_id in [s for s in self.cameras if s not in self.relay.sessions.sessions]:
            self._forget(session_id)
        camera = parse_camera_source(body)
        SECRETS.add(camera.password)
        self.cameras[session.id] = camera

    def session_fields(self, session: Session, token: str | None) -> dict[str, Any]:
        url = f"{self.base_url}/v1/sessions/{session.id}/view"
        if token is not None:
            url += f"#token={token}"
        camera = self.cameras.get(session.id, CameraSource())
        return {"viewUrl": url, "rtspPath": camera.path}

    async def close(self) -> None:
        await self.service.close()

    # -- SessionDirectory -----------------------------------------------------------------------

    def admit(self, session_id: str, token: str | None, source: str) -> ViewSession | Refusal:
        if self.relay.auth_failures.blocked(source, time.monotonic()):
            self.relay.refusals.refused("too many failed attempts", source, session=session_id)
            return BLOCKED
        verdict, session = self.relay.check_session(session_id, token, source)
        if verdict is not Verdict.ACCEPTED or session is None:
            return REFUSALS.get(verdict, REFUSED)
        camera = self.cameras.get(session.id, CameraSource())
        target = WatchTarget(
            session.id,
            session.device_id,
            session.local_port,
            camera.path,
            camera.username,
            camera.password,
        )

        async def open_camera() -> CameraLink:
            if session.id not in self.relay.sessions.sessions:
                raise TunnelUnavailable("the session has ended")
            return RelayCameraLink(self.relay, session)

        return ViewSession(target, open_camera, lambda: self.ended(session.id))

    def ended(self, session_id: str) -> Ending | None:
        """None while the session lives; once it has ended, why (expired, revoked)."""
        if session_id in self.relay.sessions.sessions:
            return None
        self._forget(session_id)
        verdict, _ = self.relay.sessions.check(session_id, None, "", time.monotonic())
        return REFUSALS.get(verdict, REFUSED).ending

    def _forget(self, session_id: str) -> None:
        camera = self.cameras.pop(session_id, None)
        if camera is not None:
            SECRETS.discard(camera.password)
